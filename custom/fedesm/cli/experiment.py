"""`fedesm experiment run|report|presets`: the paper's experiments from one YAML config."""

from __future__ import annotations

import sys


def register(sub) -> None:
    p = sub.add_parser("experiment", help="reproduce the paper's experiments (federated arms vs centralized) and "
                       "write a report",
                       description="Run the paper's experiments from one YAML config or preset: experiment 1 (IID "
                       "split, FRA-LoRA in the NVFLARE simulator vs centralized), experiment 2 (label-skewed split "
                       "with gradient noise) and the strategy comparison (fra, fra-ef, fedit, ffa, optional DP-SGD); "
                       "then a markdown report with tables and plots. Presets: cpu (tiny random-init model, "
                       "real GPSite ATP data, 3 seeds, ~1.5-2 h on 2 cores), paper (ESM-2 35M, "
                       "GPSite data; for a GPU), ranks (sites of different LoRA ranks) and loss (loss class "
                       "weights, centralized); `fedesm experiment presets` shows each one's plan.")
    esub = p.add_subparsers(dest="experiment_command", metavar="ACTION")

    q = esub.add_parser("run", help="run a config's experiments and write DIR/report.md",
                        description="Read the data (a shipped GPSite set or your files; synthetic records only "
                        "when a config asks for them), split it per experiment, write or load the "
                        "backbone, run every arm (federated arms through `nvflare simulator`, centralized arms on "
                        "the pooled site training data), evaluate every arm on the same held-out val split after "
                        "each round, and write the report. Progress lines show each round as it finishes.")
    q.add_argument("config", help="preset name (cpu, paper, ranks, loss; see `fedesm experiment presets`) or a YAML "
                   "file")
    q.add_argument("--out", default=None, help="output folder (default experiments_out/<config name>)")
    q.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a config value, e.g. training.rounds=2 or "
                        "experiments.exp1_iid.training.steps_per_round=5 (repeatable; values parsed as YAML)")
    q.add_argument("--only", default=None, metavar="EXP[,EXP]", help="run only these experiments (by id)")
    q.add_argument("--arms", default=None, metavar="ARM[,ARM]", help="run only these arms (by id)")
    q.add_argument("--dry-run", action="store_true",
                   help="print the plan and check data, backbone name and job settings; train nothing")
    q.add_argument("--resume", action="store_true", help="continue a previous run in --out: skip finished arms")
    q.add_argument("--force", action="store_true", help="delete a previous run in --out first")
    q.add_argument("--target-f1", type=float, default=0.5, help="F1 for the report's rounds-to-target column "
                   "(default 0.5)")
    q.set_defaults(func=_run)

    q = esub.add_parser("report", help="(re)build DIR/report.md and its plots from a run folder",
                        description="Read a run folder written by `fedesm experiment run` and write report.md: "
                        "final and best F1/precision/recall/accuracy/AUPRC per arm on the held-out val split and "
                        "on each site's val split, rounds to reach --target-f1, bytes sent per site per round, "
                        "wall time per arm, epsilon spent under DP-SGD, and the plots (PNG) it links.")
    q.add_argument("dir", help="a run folder (holds run.json)")
    q.add_argument("--target-f1", type=float, default=0.5, help="F1 for the rounds-to-target column (default 0.5)")
    q.add_argument("--out", default=None, help="write report.md and its plots to this folder instead of DIR "
                   "(e.g. docs/results/cpu); plots go to OUT/plots")
    q.set_defaults(func=_report)

    q = esub.add_parser("presets", help="list the presets and their plans",
                        description="List the experiment presets shipped with fedesm, with each one's plan.")
    q.set_defaults(func=_presets)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _echo(line: str) -> None:
    print(line, flush=True)


def _split(value):
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def _run(args) -> int:
    from pathlib import Path

    from fedesm.errors import FedesmError
    from fedesm.experiments.config import load_config
    from fedesm.experiments.plan import dry_run
    from fedesm.experiments.run import run_experiments

    cfg = load_config(args.config, args.set)
    if args.dry_run:
        for line in dry_run(cfg):
            print(line)
        return 0
    if not 0 <= args.target_f1 <= 1:
        raise FedesmError(f"--target-f1 must be in [0, 1], got {args.target_f1}")
    out = Path(args.out or Path("experiments_out") / cfg.name)
    run_experiments(cfg, out, only=_split(args.only), arms=_split(args.arms), resume=args.resume, force=args.force,
                    echo=_echo, target_f1=args.target_f1)
    return 0


def _report(args) -> int:
    from fedesm.errors import FedesmError
    from fedesm.experiments.report import build_report

    if not 0 <= args.target_f1 <= 1:
        raise FedesmError(f"--target-f1 must be in [0, 1], got {args.target_f1}")
    path = build_report(args.dir, target_f1=args.target_f1, out_dir=args.out)
    print(f"report: {path}")
    return 0


def _presets(args) -> int:
    from fedesm.experiments.config import list_presets, load_config
    from fedesm.experiments.plan import plan_lines

    for name in list_presets():
        print("\n".join(plan_lines(load_config(name))))
        print()
    sys.stdout.flush()
    return 0
