"""`fedesm demo`: the whole federated path on a tiny model and synthetic data (what `make demo` runs)."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("demo", help="run a small FRA-LoRA federated fine-tuning in the NVFLARE simulator (CPU)",
                       description="Generate SYNTHETIC binding-site data for N sites, write a tiny random-init "
                       "ESM-2 checkpoint, export the esm2_fra_lora job with small settings, run it with `nvflare "
                       "simulator`, print a per-round table of each site's accuracy/precision/recall/F1 and write "
                       "plots. Random weights and synthetic data: it shows the system works, not biology.")
    p.add_argument("--out", default="demo_out", help="output folder (default demo_out)")
    p.add_argument("--rounds", type=int, default=4, help="federated rounds (default 4)")
    p.add_argument("--steps-per-round", type=int, default=80, help="local steps per round (default 80)")
    p.add_argument("--sites", type=int, default=2, help="number of sites (default 2)")
    p.add_argument("--arch", default="esm2_t2_tiny", help="random-init architecture (default esm2_t2_tiny)")
    p.add_argument("--strategy", default="fra", choices=["fra", "fra-ef", "fedit", "ffa"],
                   help="aggregation strategy (default fra)")
    p.add_argument("--seed", type=int, default=0, help="seed for data and init (default 0)")
    p.set_defaults(func=_demo)


def _demo(args) -> int:
    from fedesm.experiments.demo import run_demo

    run_demo(args.out, rounds=args.rounds, steps_per_round=args.steps_per_round, sites=args.sites, arch=args.arch,
             strategy=args.strategy, seed=args.seed)
    return 0
