"""`fedesm demo`: the whole federated path on a real shipped set (what `make demo` runs)."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("demo", help="federated FRA-LoRA fine-tuning on a real binding-site set in the NVFLARE "
                       "simulator (CPU, minutes)",
                       description="Split a shipped real binding-site set (GPSite ATP by default; `fedesm data "
                       "list`) at random between N sites, hold out a validation split for the call threshold, "
                       "write a tiny random-init ESM-2 checkpoint (or use --backbone), export the esm2_fra_lora job "
                       "with small settings, run it with `nvflare simulator`, then print per round each site's "
                       "local model and the global model on the set's test split (AUROC, AUPRC, F1/MCC/precision/"
                       "recall at 0.5 and at the threshold tuned on validation) beside a sequence-only logistic-"
                       "regression baseline, and write plots. Random weights cannot be expected to beat the "
                       "baseline: the demo shows the system, pretrained weights bring the accuracy.")
    p.add_argument("--out", default="demo_out", help="output folder (default demo_out)")
    p.add_argument("--dataset", default="ATP",
                   help="shipped set: ATP, HEM, DNA, RNA, PEP, PRO (default ATP), or 'synthetic' (planted motifs)")
    p.add_argument("--rounds", type=int, default=4, help="federated rounds (default 4)")
    p.add_argument("--steps-per-round", type=int, default=80, help="local steps per round (default 80)")
    p.add_argument("--sites", type=int, default=2, help="number of sites (default 2)")
    p.add_argument("--arch", default="esm2_t2_tiny", help="ESM-2 architecture (default esm2_t2_tiny, random init)")
    p.add_argument("--backbone", default=None,
                   help="ESM-2 weights instead of a random init: fair-esm hub name, local .pt or s3:// (give --arch "
                   "to match)")
    p.add_argument("--max-len", type=int, default=512,
                   help="residues per window: longer chains are cropped in training, tiled in scoring (default 512)")
    p.add_argument("--class-weights", default="balanced",
                   help="loss class weights: 'balanced' (default), 'none', or 'w0,w1'")
    p.add_argument("--strategy", default="fra", choices=["fra", "fra-ef", "fedit", "ffa"],
                   help="aggregation strategy (default fra)")
    p.add_argument("--seed", type=int, default=0, help="seed for the split and the init (default 0)")
    p.set_defaults(func=_demo)


def _demo(args) -> int:
    from fedesm.cli._common import parse_class_weights
    from fedesm.experiments.demo import run_demo

    cw = parse_class_weights(args.class_weights)
    run_demo(args.out, dataset=args.dataset, rounds=args.rounds, steps_per_round=args.steps_per_round,
             sites=args.sites, arch=args.arch, backbone=args.backbone, max_len=args.max_len, class_weights=cw,
             strategy=args.strategy, seed=args.seed)
    return 0
