"""Fused vs stock attention (and activation checkpointing) in the client's training loop, side by side.

Each comparison builds one `LocalTrainer` per arm on separate copies of the same seeded random-init
ESM-2 weights (LoRA r=16 on q, k, v, AdamW, the trainer's loss) and feeds every arm the same fixed
batch: `batch_size` chains of `length` residues, the last one shorter (75%) so the padding mask is
exercised. Arms: `stock` (fair-esm's attention), `fused` (scaled_dot_product_attention, the
default) and optionally `fused+ckpt` (fused with `training.activation_checkpointing`). Repetitions
of one optimizer step each are interleaved, the order reversed every other repetition; residues/s
= labelled residues / wall seconds, medians; ratio = arm / stock. Before timing, the arms' logits
on the batch are compared (same weights, so any difference is the kernel's).

Peak memory: on CUDA `torch.cuda.max_memory_allocated` around each arm's steps (in process); on CPU
each arm runs once more in its own subprocess, which reports its peak resident set size above what
was resident before its first step (VmHWM - VmRSS; the model, the batch and torch itself excluded).

    python bench/bench_attention.py [--archs esm2_t6_8M_UR50D] [--lengths 256 1000] [--device cpu] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # run as a script: the sibling bench modules
    sys.path.insert(0, str(HERE))

from bench_throughput import _load, _sync, with_threads  # noqa: E402
ARMS = ("stock", "fused", "fused+ckpt")


@dataclass
class AttentionSettings:
    arch: str = "esm2_t6_8M_UR50D"
    device: str = "cpu"
    length: int = 256  # residues of the longest chain in the batch
    batch_size: int = 2
    reps: int = 5  # timed optimizer steps per arm, interleaved
    warmup: int = 1
    threads: int | None = None  # torch CPU threads (default: leave torch's)
    arms: tuple = ("stock", "fused")
    memory: bool = True  # CPU: peak RSS per arm in a subprocess
    lora_r: int = 16
    seed: int = 0
    extra: dict = field(default_factory=dict)


def _batch(alphabet, s: AttentionSettings):
    """One fixed batch: `batch_size` random chains, the last at 75% length (padded)."""
    import numpy as np

    from fedesm.data.batching import Tokenizer

    rng = np.random.default_rng(s.seed)
    lengths = [s.length] * (s.batch_size - 1) + [max(1, int(0.75 * s.length))] if s.batch_size > 1 else [s.length]
    amino = np.array(list("ACDEFGHIKLMNPQRSTVWY"))
    items = [("".join(rng.choice(amino, n)), (rng.random(n) < 0.1).astype(np.int64)) for n in lengths]
    return Tokenizer(alphabet).collate(items)


class _FixedBatches:
    def __init__(self, batch):
        self.batch = batch
        self.bucket = False

    def next_batch(self):
        return self.batch


def _trainer(arm: str, s: AttentionSettings):
    """A LocalTrainer of `arm` on fresh seeded weights, fed the comparison's fixed batch."""
    import numpy as np

    from fedesm.data.records import Record
    from fedesm.model.adapters import build_lora_model
    from fedesm.model.backbone import load_backbone
    from fedesm.settings import LoraSettings, TrainConfig
    from fedesm.training.trainer import LocalTrainer

    backbone = load_backbone(f"random:{s.arch}")
    model = build_lora_model(backbone, LoraSettings(r=s.lora_r), seed=s.seed,
                             attention="stock" if arm == "stock" else "fused")
    config = TrainConfig(steps_per_round=1000, rounds=1, batch_size=s.batch_size, max_len=1022, seed=s.seed,
                         device=s.device, schedule="constant", warmup_steps=0, class_weights=None,
                         activation_checkpointing=arm.endswith("+ckpt"))
    records = [Record("unused", "ACDE", np.zeros(4, np.uint8))]  # the trainer needs records; batches are fixed
    trainer = LocalTrainer(model, backbone.alphabet, records, config)
    trainer.sampler = _FixedBatches(_batch(backbone.alphabet, s))
    return trainer


def compare(s: AttentionSettings) -> dict:
    """Residues/s of each arm (interleaved), the logits' agreement, and peak memory per arm."""
    return with_threads(s.threads, _compare, s)


def _compare(s: AttentionSettings) -> dict:
    device = torch.device(s.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("CUDA requested but not available")
    trainers = {arm: _trainer(arm, s) for arm in s.arms}
    tokens, labels = trainers[s.arms[0]].sampler.batch
    residues = int((labels != -100).sum())
    with torch.no_grad():  # same weights: the arms differ only in the kernel
        outs = {}
        for arm, t in trainers.items():
            t.model.eval()
            with torch.autocast(device.type, dtype=t.autocast_dtype, enabled=t.autocast_dtype is not None):
                outs[arm] = t.model(tokens.to(device)).float()
        max_diff = max(float((outs[a] - outs["stock"]).abs().max()) for a in outs) if "stock" in outs else None
        del outs
    memory = {}
    for arm, t in trainers.items():
        _sync(device)
        if device.type == "cuda":
            resident = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        t.train_steps(s.warmup)
        _sync(device)
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device)
            memory[arm] = {"peak_mib": peak / 2**20, "peak_above_resident_mib": (peak - resident) / 2**20}
    times = {arm: [] for arm in s.arms}
    for rep in range(s.reps):
        for arm in (s.arms if rep % 2 == 0 else s.arms[::-1]):
            _sync(device)
            t0 = time.perf_counter()
            trainers[arm].train_steps(1)
            _sync(device)
            times[arm].append(time.perf_counter() - t0)
    if device.type == "cpu" and s.memory:
        for arm in s.arms:
            memory[arm] = cpu_peak_rss(arm, s)
    rps = {arm: [residues / x for x in xs] for arm, xs in times.items()}
    med = {arm: statistics.median(v) for arm, v in rps.items()}
    row = {
        "arch": s.arch, "device": str(device), "length": s.length, "batch_size": s.batch_size,
        "tokens_per_batch": int(tokens.numel()), "residues_per_batch": residues,
        "precision": "bf16 autocast" if trainers[s.arms[0]].autocast_dtype is not None else "fp32",
        "threads": s.threads or torch.get_num_threads(), "reps": s.reps, "arms": list(s.arms),
        "residues_per_s": med, "residues_per_s_all": rps,
        "spread": {arm: (max(v) - min(v)) / statistics.median(v) for arm, v in rps.items()},
        "max_abs_logit_diff_vs_stock": max_diff, "load_average": _load(),
    }
    if "stock" in med:
        row["ratio_vs_stock"] = {arm: med[arm] / med["stock"] for arm in s.arms if arm != "stock"}
        row["pair_ratios_median"] = {arm: statistics.median(a / b for a, b in zip(rps[arm], rps["stock"]))
                                     for arm in s.arms if arm != "stock"}
    if memory:
        row["memory"] = memory
        key = "peak_above_resident_mib"
        if "stock" in memory and memory["stock"].get(key):
            row["memory_ratio_vs_stock"] = {arm: memory[arm][key] / memory["stock"][key] for arm in memory
                                            if arm != "stock"}
    return row


def cpu_peak_rss(arm: str, s: AttentionSettings) -> dict:
    """Peak RSS of `arm`'s training steps above what was resident before them, in a fresh process."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--peak-rss-child", arm, "--settings",
           json.dumps(asdict(s))]
    env = dict(os.environ, OMP_NUM_THREADS=str(s.threads or torch.get_num_threads()))
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if res.returncode != 0:
        raise RuntimeError(f"peak-RSS child for {arm} failed: {res.stderr.strip().splitlines()[-1:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _status_mib(field_name: str) -> float:
    """VmRSS (resident now) or VmHWM (peak resident) of this process, from /proc/self/status, in MiB.

    Not ``getrusage``: its ru_maxrss survives exec, so a child forked from a large parent reports the
    parent's size."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"no {field_name} in /proc/self/status")


def _peak_rss_child(arm: str, s: AttentionSettings) -> dict:
    if s.threads:
        torch.set_num_threads(s.threads)
    trainer = _trainer(arm, s)
    resident = _status_mib("VmRSS")
    trainer.train_steps(max(1, s.warmup))
    peak = _status_mib("VmHWM")
    return {"resident_mib": resident, "peak_rss_mib": peak, "peak_above_resident_mib": max(0.0, peak - resident)}


def run(cpu_rows=(), cuda_rows=(), echo=None) -> list[dict]:
    """CPU comparisons (dicts of AttentionSettings fields), then CUDA ones (a skipped row each without a GPU)."""
    rows = []
    for spec in cpu_rows:
        rows.append(compare(AttentionSettings(**{"device": "cpu", **spec})))
        if echo:
            echo(format_table(rows[-1:], header=False))
    for spec in cuda_rows:
        if not torch.cuda.is_available():
            rows.append({"arch": spec["arch"], "device": "cuda", "length": spec.get("length"),
                         "skipped": "no CUDA device"})
            continue
        rows.append(compare(AttentionSettings(**{"device": "cuda", "memory": False, **spec})))
        if echo:
            echo(format_table(rows[-1:], header=False))
    return rows


def format_table(rows: list[dict], header: bool = True) -> str:
    head = (f"{'arch':<20} {'dev':<5} {'len':>5} {'batch':>5} {'thr':>3} | {'arm':<10} {'res/s':>9} "
            f"{'x stock':>7} {'spread':>6} | {'peak MiB':>9} {'x stock':>7} | {'max|dlogit|':>11}")
    lines = [head, "-" * len(head)] if header else []
    for r in rows:
        if "skipped" in r:
            lines.append(f"{r['arch']:<20} {r['device']:<5} {r.get('length') or '':>5} skipped: {r['skipped']}")
            continue
        for arm in r["arms"]:
            mem = r.get("memory", {}).get(arm, {}).get("peak_above_resident_mib")
            mem_ratio = r.get("memory_ratio_vs_stock", {}).get(arm)
            ratio = r.get("ratio_vs_stock", {}).get(arm)
            lines.append(
                f"{r['arch']:<20} {r['device'][:5]:<5} {r['length']:>5} {r['batch_size']:>5} {r['threads']:>3} | "
                f"{arm:<10} {r['residues_per_s'][arm]:>9.1f} {_x(ratio):>7} {r['spread'][arm]:>6.2f} | "
                f"{_f(mem, 0):>9} {_x(mem_ratio):>7} | "
                f"{_f(r['max_abs_logit_diff_vs_stock'], None):>11}")
    return "\n".join(lines)


def _x(v) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _f(v, digits) -> str:
    if v is None:
        return "-"
    return f"{v:.{digits}f}" if digits is not None else f"{v:.1e}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Fused vs stock attention (and activation checkpointing) in the "
                                            "client's training loop: residues/s and peak memory, side by side.")
    p.add_argument("--archs", nargs="+", default=["esm2_t6_8M_UR50D", "esm2_t12_35M_UR50D"])
    p.add_argument("--lengths", type=int, nargs="+", default=[256, 1000], help="residues of the longest chain")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int)
    p.add_argument("--checkpointing", action="store_true", help="also time fused + activation checkpointing")
    p.add_argument("--json", help="also write the rows to this JSON file")
    p.add_argument("--peak-rss-child", help=argparse.SUPPRESS)
    p.add_argument("--settings", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.peak_rss_child:
        s = json.loads(args.settings)
        s["arms"] = tuple(s["arms"])
        print(json.dumps(_peak_rss_child(args.peak_rss_child, AttentionSettings(**s))))
        return 0
    arms = ARMS if args.checkpointing else ("stock", "fused")
    specs = [dict(arch=a, length=n, batch_size=args.batch_size, reps=args.reps, threads=args.threads, arms=arms)
             for a in args.archs for n in args.lengths]
    if args.device == "cpu":
        rows = run(cpu_rows=specs, echo=print)
    else:
        rows = run(cuda_rows=[dict(s, device=args.device) for s in specs], echo=print)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
