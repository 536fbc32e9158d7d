"""What the CUDA path does on a real GPU: training speed, memory, bf16 vs fp32 agreement, a real-data score.

CI has no GPU, so this runs by hand where one is (`python bench/cuda_check.py --out cuda_check.json`):

  per architecture (random init, LoRA r=16 on q,k,v, batch 8, up to 1,000 residues, bf16 autocast,
  length buckets: the executor's CUDA defaults): residues/s over timed steps, peak GPU memory, loss
  finite; the trainable-parameter count (553,922 for 35M);
  bf16 on CUDA vs fp32 on CPU: probabilities of the same model on the same chains (tiling included);
  fused vs stock attention (bench/bench_attention.py) at batch 8 x 1,000 residues, bf16: residues/s and
  peak memory of each arm, fused + activation checkpointing for 150M and 650M, against the targets
  (650M: >= 1.5x the stock throughput, <= 0.6x its peak memory);
  optionally (--train-steps N): a longer centralized run of one architecture on GPSite ATP, scored on
  the ATP test split beside the sequence-only baseline, to see where a random-init backbone gets.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "custom"))
sys.path.insert(0, str(ROOT / "bench"))

from fedesm.data.validate import load_dataset  # noqa: E402
from fedesm.model.adapters import build_lora_model, count_parameters  # noqa: E402
from fedesm.model.backbone import load_backbone  # noqa: E402
from fedesm.settings import LoraSettings  # noqa: E402
from fedesm.settings import TrainConfig  # noqa: E402
from fedesm.training.inference import predict_proba  # noqa: E402
from fedesm.training.trainer import LocalTrainer  # noqa: E402


def speed(arch: str, records, steps: int = 30, warmup: int = 5) -> dict:
    backbone = load_backbone(f"random:{arch}")
    model = build_lora_model(backbone, LoraSettings(r=16, alpha=32), seed=0)
    total, trainable = count_parameters(model)
    trainer = LocalTrainer(model, backbone.alphabet, records,
                           TrainConfig(steps_per_round=steps, batch_size=8, lr=5e-4, max_len=1000, device="cuda"))
    trainer.train_steps(warmup)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    stats = trainer.train_steps(steps)
    torch.cuda.synchronize()
    row = {"arch": arch, "device": torch.cuda.get_device_name(0), "precision": str(trainer.autocast_dtype),
           "bucketed": trainer.sampler.bucket, "trainable": trainable, "total": total,
           "steps": stats.steps, "residues_per_second": stats.residues_per_second, "loss": stats.loss,
           "loss_finite": bool(np.isfinite(stats.loss)), "peak_mib": torch.cuda.max_memory_allocated() / 2**20}
    del trainer, model
    torch.cuda.empty_cache()
    return row


def agreement(arch: str, records) -> dict:
    """The same LoRA model scored in bf16 on CUDA and in fp32 on CPU (long chains tiled in both)."""
    backbone = load_backbone(f"random:{arch}")
    model = build_lora_model(backbone, LoraSettings(r=16, alpha=32), seed=0)
    from fedesm.data.batching import Tokenizer

    tok = Tokenizer(backbone.alphabet)
    seqs = [r.sequence for r in records]
    cpu = np.concatenate(predict_proba(model, tok, seqs, 1000, torch.device("cpu")))
    model.to("cuda")
    gpu = np.concatenate(predict_proba(model, tok, seqs, 1000, torch.device("cuda"), autocast=torch.bfloat16))
    gpu32 = np.concatenate(predict_proba(model, tok, seqs, 1000, torch.device("cuda")))
    return {"arch": arch, "residues": int(cpu.size), "longest": max(len(s) for s in seqs),
            "max_abs_diff_bf16_vs_cpu_fp32": float(np.abs(cpu - gpu).max()),
            "max_abs_diff_cuda_fp32_vs_cpu_fp32": float(np.abs(cpu - gpu32).max()),
            "pearson_bf16_vs_fp32": float(np.corrcoef(cpu, gpu)[0, 1])}


ATTENTION_TARGETS = {"esm2_t33_650M_UR50D": {"min_throughput_ratio": 1.5, "max_memory_ratio": 0.6}}


def attention(archs, reps: int = 10) -> list[dict]:
    """Fused vs stock (and fused + checkpointing from 150M) in the training loop at batch 8 x 1,000, bf16."""
    import bench_attention

    big = {"esm2_t30_150M_UR50D", "esm2_t33_650M_UR50D", "esm2_t36_3B_UR50D"}
    rows = []
    for arch in archs:
        arms = ("stock", "fused", "fused+ckpt") if arch in big else ("stock", "fused")
        row = bench_attention.compare(bench_attention.AttentionSettings(
            arch=arch, device="cuda", length=1000, batch_size=8, reps=reps, warmup=3, arms=arms, memory=False))
        target = ATTENTION_TARGETS.get(arch)
        if target:
            row["targets"] = target
            row["targets_met"] = (row["ratio_vs_stock"]["fused"] >= target["min_throughput_ratio"]
                                  and row["memory_ratio_vs_stock"]["fused"] <= target["max_memory_ratio"])
        rows.append(row)
        print(bench_attention.format_table([row], header=len(rows) == 1), flush=True)
        torch.cuda.empty_cache()
    return rows


def long_run(arch: str, train, test, steps: int, lr: float) -> dict:
    from fedesm.data.split import split_records
    from fedesm.evaluation.reference import reference_scores
    from fedesm.evaluation.scoring import score

    split = split_records(train, "iid", 1, val_frac=0.1, test_frac=0.0, seed=0, site_val_frac=0.0)
    pool = split.sites["site-1"]
    backbone = load_backbone(f"random:{arch}")
    model = build_lora_model(backbone, LoraSettings(r=16, alpha=32), seed=0)
    trainer = LocalTrainer(model, backbone.alphabet, pool,
                           TrainConfig(steps_per_round=steps, rounds=1, batch_size=8, lr=lr, max_len=1000,
                                       class_weights="balanced", device="cuda"))
    t0 = time.perf_counter()
    curve = []
    for k in range(5):
        trainer.train_steps(steps // 5)
        m = score(split.val, trainer.predict_proba([r.sequence for r in split.val]), test,
                  trainer.predict_proba([r.sequence for r in test]))
        curve.append({"steps": (k + 1) * (steps // 5), "test_auroc": m["test_auroc"], "test_auprc": m["test_auprc"],
                      "test_f1_tuned": m["test_f1_tuned"]})
        print(f"  {arch} {curve[-1]}", flush=True)
    base = reference_scores(pool, split.val, test)
    return {"arch": arch, "steps": steps, "lr": lr, "seconds": time.perf_counter() - t0, "curve": curve,
            "reference": {k: base[k] for k in ("test_auroc", "test_auprc", "test_f1_tuned")}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="JSON file for the results")
    p.add_argument("--archs", nargs="+", default=["esm2_t6_8M_UR50D", "esm2_t12_35M_UR50D", "esm2_t30_150M_UR50D",
                                                  "esm2_t33_650M_UR50D"])
    p.add_argument("--train-arch", default="esm2_t12_35M_UR50D")
    p.add_argument("--train-steps", type=int, default=0, help="steps of the longer real-data run (0: skip)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--no-attention", action="store_true", help="skip the fused vs stock attention comparison")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check", file=sys.stderr)
        return 2
    train, test = load_dataset("gpsite:ATP"), load_dataset("gpsite:ATP:test")
    results = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(0), "speed": [], "agreement": None}
    for arch in args.archs:
        results["speed"].append(speed(arch, train))
        print(json.dumps(results["speed"][-1]), flush=True)
    long_chains = sorted(test, key=len)[-6:] + sorted(test, key=len)[:6]  # incl. chains > 1,000 residues (tiled)
    results["agreement"] = agreement("esm2_t6_8M_UR50D", long_chains)
    print(json.dumps(results["agreement"]), flush=True)
    if not args.no_attention:
        results["attention"] = attention(args.archs)
    if args.train_steps:
        results["long_run"] = long_run(args.train_arch, train, test, args.train_steps, args.lr)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
