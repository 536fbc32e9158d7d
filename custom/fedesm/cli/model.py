"""`fedesm make-checkpoint`, `fedesm params`, `fedesm export`."""

from __future__ import annotations

import json

from fedesm.cli._common import CARD, add_lora_args, add_model_args, lora_from_args, model_from_args
from fedesm.architectures import ARCHITECTURES

EXPORT_FORMATS = ("fair-esm", "hf", "peft-hf")


def register(sub) -> None:
    p = sub.add_parser("make-checkpoint", help="write a random-init ESM-2 checkpoint in fair-esm's format",
                       description="Write a random-init ESM-2 checkpoint in fair-esm's own format (plus the "
                       "<stem>-contact-regression.pt file fair-esm's local loader expects). For tests, demos and "
                       "air-gapped dry runs: random weights, not a pretrained model.")
    p.add_argument("--arch", required=True, choices=list(ARCHITECTURES), help="architecture name")
    p.add_argument("--out", required=True, help="output .pt path; the file name must start with 'esm2'")
    p.add_argument("--seed", type=int, default=0, help="init seed (default 0)")
    p.set_defaults(func=_make_checkpoint)

    p = sub.add_parser("params", help="print total and trainable parameter counts (nothing downloaded)",
                       description="Count total and trainable parameters of ESM-2 + LoRA + 2-class head for an "
                       "architecture, on the meta device: nothing is downloaded or allocated. ESM-2 35M with r=16 "
                       "on q,k,v gives 553,922 trainable parameters.")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    add_model_args(p, only=("arch", "num_labels"))
    add_lora_args(p)
    p.set_defaults(func=_params)

    p = sub.add_parser("export", help="write a trained model for use outside fedesm (fair-esm or Hugging Face)",
                       description="Export a trained model folder (PEFT layout + fedesm_model.json, as written by "
                       "`fedesm train` or a federated job). --format fair-esm (default): LoRA merged into the "
                       "ESM-2 backbone, one fair-esm .pt with the head inside. --format hf: LoRA merged, a folder "
                       "that transformers' AutoModelForTokenClassification.from_pretrained and "
                       "AutoTokenizer.from_pretrained load (ESM-2 tokenizer files beside it; the call threshold in "
                       "README.md and config.json). --format peft-hf: the adapters and head in PEFT's layout "
                       "against the Hugging Face module names (query/key/value), for users who keep the base model "
                       "themselves: PeftModel.from_pretrained(AutoModelForTokenClassification.from_pretrained("
                       "BASE, num_labels=2), DIR).")
    p.add_argument("--model", required=True, help="trained model folder (adapters + model card)")
    p.add_argument("--format", default="fair-esm", choices=EXPORT_FORMATS,
                   help="fair-esm (one .pt), hf (transformers folder, LoRA merged) or peft-hf (PEFT adapters on "
                   "HF names); default fair-esm")
    p.add_argument("--out", required=True, help="fair-esm: output .pt path (the file name must start with 'esm2'); "
                   "hf / peft-hf: output folder")
    add_model_args(p, only=("backbone",), defaults_from={"backbone": CARD})
    p.set_defaults(func=_export)


def _make_checkpoint(args) -> int:
    from fedesm.model.checkpoint import make_random_checkpoint

    path = make_random_checkpoint(args.arch, args.out, seed=args.seed)
    print(f"wrote {path} (random init, {args.arch}) and {path.with_name(path.stem + '-contact-regression.pt').name}")
    return 0


def _params(args) -> int:
    from fedesm.model.adapters import parameter_report

    model = model_from_args(args)
    rep = parameter_report(model.arch, lora_from_args(args), num_labels=model.num_labels)
    if args.json:
        print(json.dumps(rep, indent=2))
        return 0
    print(f"architecture        {rep['arch']} ({rep['layers']} layers, embed dim {rep['embed_dim']})")
    print(f"LoRA                r={rep['lora_r']} on {','.join(rep['lora_targets'])}: {rep['lora']:,} parameters")
    print(f"classification head {rep['head']:,} parameters")
    print(f"trainable           {rep['trainable']:,}")
    print(f"total               {rep['total']:,}  ({100 * rep['trainable_fraction']:.2f}% trainable)")
    return 0


def _export(args) -> int:
    from fedesm.model.cards import find_model_dir, load_trained_model, read_adapter_state, read_model_card

    backbone = model_from_args(args).backbone
    if args.format == "peft-hf":  # no backbone needed: the adapters are renamed, not merged
        from fedesm.model.hf import export_peft_hf

        model_dir = find_model_dir(args.model)
        card = read_model_card(model_dir)
        if backbone:
            card.backbone = backbone
        path = export_peft_hf(read_adapter_state(model_dir), card, args.out)
        base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
        print(f"wrote PEFT adapters on Hugging Face names to {path} (base model: "
              f"{base or 'none recorded: load them on the HF form of ' + card.backbone + ', e.g. from --format hf'})")
        return 0
    model, alphabet, card = load_trained_model(find_model_dir(args.model), backbone_source=backbone)
    if args.format == "hf":
        from fedesm.model.hf import export_hf

        path = export_hf(model, args.out, alphabet, threshold=card.threshold, max_len=card.max_len,
                         backbone=backbone or card.backbone, lora=card.lora)
        print(f"wrote Hugging Face model {path} (EsmForTokenClassification, LoRA merged, call threshold "
              f"{card.threshold:.4g})")
        return 0
    from fedesm.model.export import export_merged

    path = export_merged(model, args.out, threshold=card.threshold, max_len=card.max_len)
    print(f"wrote merged checkpoint {path}")
    return 0
