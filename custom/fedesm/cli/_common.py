"""Argument groups shared by several subcommands (LoRA and training settings, data locations)."""

from __future__ import annotations

import argparse
from pathlib import Path

from fedesm.model import DEFAULT_LORA_TARGETS, LoraSettings
from fedesm.train import TrainConfig


def add_lora_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("LoRA")
    g.add_argument("--lora-r", type=int, default=16, help="LoRA rank (default 16, as in the paper)")
    g.add_argument("--lora-alpha", type=int, default=32, help="LoRA alpha; scaling is alpha/r (default 32)")
    g.add_argument("--lora-dropout", type=float, default=0.05, help="dropout on the LoRA input (default 0.05)")
    g.add_argument("--lora-targets", default=",".join(DEFAULT_LORA_TARGETS),
                   help="comma-separated module names to adapt (default q_proj,k_proj,v_proj)")


def lora_from_args(args) -> LoraSettings:
    return LoraSettings(r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout,
                        targets=tuple(t.strip() for t in args.lora_targets.split(",") if t.strip()))


def add_train_args(p: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    g = p.add_argument_group("training")
    g.add_argument("--rounds", type=int, default=3, help="rounds R (default 3)")
    g.add_argument("--steps-per-round", type=int, default=100, help="optimizer steps N per round (default 100)")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help=f"sequences per step (default {d.batch_size})")
    g.add_argument("--lr", type=float, default=d.lr, help=f"peak AdamW learning rate (default {d.lr})")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay")
    g.add_argument("--warmup-steps", type=int, default=None, help="linear warm-up steps (default 5%% of all steps)")
    g.add_argument("--schedule", choices=["cosine", "linear", "constant"], default=d.schedule,
                   help="decay after warm-up (default cosine)")
    g.add_argument("--grad-clip", type=float, default=d.grad_clip, help="gradient-norm clip, 0 disables (default 1.0)")
    g.add_argument("--class-weights", default="balanced",
                   help="loss class weights: 'balanced' (default: from the training data's positive rate), "
                   "'none' (plain cross-entropy) or 'w0,w1'")
    g.add_argument("--focal-gamma", type=float, default=0.0,
                   help="focal loss (1-p_t)^gamma x CE, e.g. 2; default 0 = plain cross-entropy")
    g.add_argument("--max-len", type=int, default=d.max_len,
                   help="context in residues: longer sequences are random-cropped in training, tiled in evaluation")
    g.add_argument("--grad-noise", type=float, default=0.0, help="Gaussian gradient-noise std per step (paper: 1e-4)")
    g.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    g.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    g.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="auto = bf16 autocast on CUDA, fp32 on CPU")


def parse_class_weights(text):
    """--class-weights: 'balanced', 'none' (plain cross-entropy) or 'w0,w1'."""
    if text in (None, "", "none"):
        return None
    if text == "balanced":
        return text
    return [float(x) for x in text.split(",")]


def train_config_from_args(args) -> TrainConfig:
    cw = parse_class_weights(args.class_weights)
    return TrainConfig(steps_per_round=args.steps_per_round, rounds=args.rounds, batch_size=args.batch_size,
                       lr=args.lr, weight_decay=args.weight_decay, warmup_steps=args.warmup_steps,
                       schedule=args.schedule, grad_clip=args.grad_clip, class_weights=cw, max_len=args.max_len,
                       focal_gamma=args.focal_gamma,
                       grad_noise_std=args.grad_noise, seed=args.seed, device=args.device, precision=args.precision)


def load_data(uri: str, cache_dir=None):
    """Records from a local file or an s3:// object (validated; a DataError names file, record and line)."""
    from fedesm.data.validate import load_dataset

    if uri.startswith("s3://"):
        from fedesm import storage

        uri = str(storage.fetch(uri, Path(cache_dir or Path.home() / ".cache" / "fedesm")))
    return load_dataset(uri)
