"""`fedesm demo`: the whole federated path on a real shipped set (what `make demo` runs)."""

from __future__ import annotations

from fedesm.settings import FederationSettings, LoraSettings, ModelSettings, TrainConfig, add_arguments, from_arguments


def register(sub) -> None:
    from fedesm.experiments.demo import DEMO

    p = sub.add_parser("demo", help="federated FRA-LoRA fine-tuning on a real binding-site set in the NVFLARE "
                       "simulator (CPU, minutes)",
                       description="Split a shipped real binding-site set (GPSite ATP by default; `fedesm data "
                       "list`) at random between N sites, hold out a validation split for the call threshold, "
                       "take pretrained ESM-2 8M weights when they are cached or downloadable, else write a tiny "
                       "random-init ESM-2 checkpoint (or use --backbone), export the esm2_fra_lora job "
                       "with small settings, run it with `nvflare simulator`, then print per round each site's "
                       "local model and the global model on the set's test split (AUROC, AUPRC, F1/MCC/precision/"
                       "recall at 0.5 and at the threshold tuned on validation) beside a sequence-only logistic-"
                       "regression reference, and write plots. Random weights cannot be expected to beat the "
                       "reference: the demo shows the system, pretrained weights bring the accuracy. Every "
                       "training and LoRA setting has a flag; the defaults shown are the demo's.")
    p.add_argument("--out", default="demo_out", help="output folder (default demo_out)")
    p.add_argument("--dataset", default="ATP",
                   help="shipped set: ATP, HEM, DNA, RNA, PEP, PRO (default ATP), or 'synthetic' (planted motifs)")
    p.add_argument("--sites", type=int, default=DEMO.federation.min_clients,
                   help=f"number of sites (default {DEMO.federation.min_clients})")
    add_arguments(p, ModelSettings, title="model", defaults=DEMO.model, only=("arch",))
    # not model.backbone: auto and random choose between the cached pretrained weights and a random init
    p.add_argument("--backbone", default="auto",
                   help="auto (default): pretrained ESM-2 8M weights when they are in the fair-esm/torch hub cache "
                   "or downloadable, else a random init of --arch (one line says which); random: always the random "
                   "init; or any source: fair-esm hub name, local .pt, Hugging Face folder or hf:ID, s3:// (give "
                   "--arch to match)")
    add_arguments(p, TrainConfig, title="training", defaults=DEMO.training,
                  skip=("device", "precision"))
    add_arguments(p, LoraSettings, prefix="lora-", title="LoRA", defaults=DEMO.lora)
    add_arguments(p, FederationSettings, title="federation", defaults=DEMO.federation,
                  skip=("min_clients", "keep_rounds", "train_timeout"))
    p.set_defaults(func=_demo)


def _demo(args) -> int:
    from fedesm.experiments.demo import DEMO, choose_backbone, run_demo

    arch, backbone, line = choose_backbone(args.backbone, from_arguments(args, ModelSettings, base=DEMO.model).arch)
    settings = DEMO.replace(
        model=DEMO.model.replace(arch=arch, backbone=backbone),
        lora=from_arguments(args, LoraSettings, prefix="lora-", base=DEMO.lora),
        training=from_arguments(args, TrainConfig, base=DEMO.training),
        federation=from_arguments(args, FederationSettings, base=DEMO.federation).replace(min_clients=args.sites))
    run_demo(args.out, dataset=args.dataset, settings=settings, backbone_line=line)
    return 0
