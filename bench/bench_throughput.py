"""Local training throughput: the client executor's loop (`LocalTrainer.train_steps`) against a minimal
plain PyTorch + PEFT loop on the same ESM-2 weights, batches, LoRA settings and optimizer.

The plain loop is what a user would write by hand: fair-esm's `ESM2.forward(tokens, repr_layers=[last])`,
a linear head, `peft.get_peft_model` (LoRA r=16 on q, k, v; the head in `modules_to_save`), AdamW and
cross-entropy with `ignore_index`. It draws nothing at run time: its batches are made before timing by a
sampler identical to the trainer's (same seed, so the same crops and lengths), which favours the plain
loop. Ours samples, clips gradients and steps its schedule inside the timed region.

Repetitions are interleaved (ours, plain, plain, ours, ...) after warm-up steps, and the ratio is the
ratio of the medians of residues/s (wall clock). On CPU the same ratio is also given on process CPU time,
which does not count time spent waiting for a core: on a shared machine it is the steadier figure,
above all single-threaded. On CUDA both run under bf16 autocast, with peak memory.

    python bench/bench_throughput.py [--archs esm2_t6_8M_UR50D] [--steps 3] [--reps 8] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from fedesm.data.batching import IGNORE_INDEX, RandomBatchSampler, Tokenizer
from fedesm.data.synth import synth_records
from fedesm.model.adapters import build_lora_model
from fedesm.model.backbone import load_backbone
from fedesm.settings import LoraSettings, TrainConfig
from fedesm.training.trainer import LocalTrainer

MIN_RATIO = 0.95  # ours / plain residues per second must not fall below this


@dataclass
class ThroughputSettings:
    """One comparison: an architecture, a batch shape and how long to time it."""

    arch: str = "esm2_t6_8M_UR50D"
    device: str = "cpu"
    batch_size: int = 4
    min_len: int = 180  # record lengths (residues); every record fits max_len, so no crop varies
    max_len: int = 220
    n_records: int = 64
    steps: int = 3  # optimizer steps per repetition
    reps: int = 8  # repetitions of each loop, interleaved
    warmup: int = 2  # steps of each loop before timing
    lora_r: int = 16
    lr: float = 1e-3
    seed: int = 0
    threads: int | None = None  # torch CPU threads for this comparison (default: leave torch's setting)
    alternate: bool = True  # swap the order in every other repetition (ABBA), so order effects cancel


class PlainTagger(nn.Module):
    """fair-esm ESM2 + dropout + linear head on the last layer's representations."""

    def __init__(self, esm2: nn.Module, num_labels: int = 2, head_dropout: float = 0.1):
        super().__init__()
        self.esm = esm2
        self.dropout = nn.Dropout(head_dropout)
        self.classifier = nn.Linear(esm2.embed_dim, num_labels)  # not "head": PEFT would match "lm_head" too

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        last = self.esm.num_layers
        rep = self.esm(tokens, repr_layers=[last])["representations"][last]
        return self.classifier(self.dropout(rep))


class PlainLoop:
    """The hand-written reference loop; `run(batches)` does one optimizer step per batch."""

    def __init__(self, esm2: nn.Module, lora: LoraSettings, lr: float, weight_decay: float, device: torch.device,
                 autocast_dtype=None, seed: int = 0):
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                            target_modules=list(lora.targets), modules_to_save=["classifier"], bias="none")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.model = get_peft_model(PlainTagger(esm2), config).to(device)
        self.device = device
        self.autocast_dtype = autocast_dtype
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)

    def run(self, batches) -> None:
        self.model.train()
        for tokens, labels in batches:
            tokens = tokens.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
                logits = self.model(tokens)
            loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def with_threads(threads: int | None, fn, *args):
    """``fn(*args)`` with torch's CPU threads set to ``threads`` (when given), restored afterwards."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return fn(*args)
    finally:
        torch.set_num_threads(before)


def compare(s: ThroughputSettings) -> dict:
    """Time both loops on `s.arch`; residues/s per repetition, medians, ratio, and peak memory on CUDA."""
    return with_threads(s.threads, _compare, s)


def _compare(s: ThroughputSettings) -> dict:
    device = torch.device(s.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("CUDA requested but not available")
    lora = LoraSettings(r=s.lora_r)
    records = synth_records(n=s.n_records, n_families=max(1, s.n_records // 4), pos_rate=0.1,
                            min_len=s.min_len, max_len=s.max_len, seed=s.seed)
    max_len = s.max_len  # longer than every record: batches are whole sequences
    total_steps = s.warmup + s.steps * s.reps

    backbone = load_backbone(f"random:{s.arch}")
    ours_model = build_lora_model(backbone, lora, seed=s.seed)
    config = TrainConfig(steps_per_round=total_steps, rounds=1, batch_size=s.batch_size, lr=s.lr,
                         max_len=max_len, seed=s.seed, device=s.device, precision="auto",
                         schedule="constant", warmup_steps=0, class_weights=None)  # the plain loop's loss
    ours = LocalTrainer(ours_model, backbone.alphabet, records, config)

    # Same seeded weights, a separate copy, so the two loops share nothing.
    plain_backbone = load_backbone(f"random:{s.arch}")
    plain = PlainLoop(plain_backbone.model, lora, s.lr, config.weight_decay, device, ours.autocast_dtype, s.seed)
    tokenizer = Tokenizer(plain_backbone.alphabet)
    sampler = RandomBatchSampler(records, tokenizer, s.batch_size, max_len, seed=s.seed, bucket=ours.sampler.bucket)
    plain_batches = [sampler.next_batch() for _ in range(total_steps)]  # same sequence of batches as ours
    residues = [int((labels != IGNORE_INDEX).sum()) for _, labels in plain_batches]

    if _count_trainable(ours.model) != _count_trainable(plain.model):
        raise AssertionError(f"the loops train different parameter counts: {_count_trainable(ours.model)} vs "
                             f"{_count_trainable(plain.model)}")
    memory = {}
    if device.type == "cuda":
        for name, step in (("ours", lambda: ours.train_steps(s.warmup)),
                           ("plain", lambda: plain.run(plain_batches[: s.warmup]))):
            _sync(device)
            resident = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            step()
            _sync(device)
            peak = torch.cuda.max_memory_allocated(device)
            memory[name] = {"peak_mib": peak / 2**20, "peak_above_resident_mib": (peak - resident) / 2**20}
    else:
        ours.train_steps(s.warmup)
        plain.run(plain_batches[: s.warmup])

    ours_rps, plain_rps, ours_cpu, plain_cpu = [], [], [], []
    for rep in range(s.reps):
        lo = s.warmup + rep * s.steps
        chunk = plain_batches[lo : lo + s.steps]
        n = sum(residues[lo : lo + s.steps])
        # ours, plain, plain, ours, ...: neither loop always runs right after the other
        for which in (("ours", "plain") if rep % 2 == 0 or not s.alternate else ("plain", "ours")):
            if which == "ours":
                wall, cpu, stats = _timed(device, lambda: ours.train_steps(s.steps))
                if stats.residues != n:
                    raise AssertionError("the two loops did not see the same batches")
                ours_rps.append(n / wall)
                ours_cpu.append(n / cpu)
            else:
                wall, cpu, _ = _timed(device, lambda: plain.run(chunk))
                plain_rps.append(n / wall)
                plain_cpu.append(n / cpu)

    ours_med, plain_med = statistics.median(ours_rps), statistics.median(plain_rps)
    pair_ratios = [a / b for a, b in zip(ours_rps, plain_rps)]
    cpu_ratio = statistics.median(ours_cpu) / statistics.median(plain_cpu)
    row = {
        "arch": s.arch,
        "device": str(device),
        "precision": "bf16 autocast" if ours.autocast_dtype is not None else "fp32",
        "threads": torch.get_num_threads(),
        "batch_size": s.batch_size,
        "residues_per_batch_mean": sum(residues) / len(residues),
        "steps_per_rep": s.steps,
        "reps": s.reps,
        "warmup_steps": s.warmup,
        "trainable_ours": _count_trainable(ours.model),
        "trainable_plain": _count_trainable(plain.model),
        "ours_residues_per_s": ours_rps,
        "plain_residues_per_s": plain_rps,
        "ours_median": ours_med,
        "plain_median": plain_med,
        "ratio": ours_med / plain_med,
        "median_pair_ratio": statistics.median(pair_ratios),
        "ours_cpu_residues_per_s": ours_cpu,
        "plain_cpu_residues_per_s": plain_cpu,
        "cpu_time_ratio": cpu_ratio,
        "ours_spread": _spread(ours_rps),
        "plain_spread": _spread(plain_rps),
        "min_ratio": MIN_RATIO,
        "ok": ours_med / plain_med >= MIN_RATIO,
        "load_average": _load(),
    }
    if memory:
        row["memory"] = memory
    return row


def _timed(device: torch.device, fn):
    """(wall seconds, process CPU seconds, result) of fn(); CPU time ignores time spent waiting for a core."""
    _sync(device)
    w0, c0 = time.perf_counter(), time.process_time()
    result = fn()
    _sync(device)
    return time.perf_counter() - w0, time.process_time() - c0, result


def _load() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def _spread(values: list[float]) -> float:
    """(max - min) / median: how noisy the repetitions were."""
    med = statistics.median(values)
    return (max(values) - min(values)) / med if med else float("nan")


def run(archs=("esm2_t6_8M_UR50D", "esm2_t12_35M_UR50D"), device: str = "cpu", cuda_archs=None,
        settings: dict | None = None, cuda_settings: dict | None = None, echo=None) -> list[dict]:
    """Comparisons for `archs` on `device`; CUDA ones for `cuda_archs` when a GPU is present (else a skipped row)."""
    rows = []
    for arch in archs:
        rows.append(compare(ThroughputSettings(arch=arch, device=device, **(settings or {}))))
        if echo:
            echo(format_table(rows[-1:], header=False))
    for arch in cuda_archs or ():
        if not torch.cuda.is_available():
            rows.append({"arch": arch, "device": "cuda", "skipped": "no CUDA device"})
            continue
        rows.append(compare(ThroughputSettings(arch=arch, device="cuda", **(cuda_settings or {}))))
        if echo:
            echo(format_table(rows[-1:], header=False))
    return rows


def _cpu_ratio(row: dict) -> str:
    """The CPU-time ratio means something on CPU only (on CUDA it times kernel launches)."""
    return f"{row['cpu_time_ratio']:.3f}" if row["device"] == "cpu" else "-"


def format_table(rows: list[dict], header: bool = True) -> str:
    head = (f"{'arch':<20} {'device':<6} {'prec':<5} {'thr':>3} {'batch':>9} | {'ours res/s':>10} "
            f"{'plain res/s':>11} | {'ratio':>6} {'pairs':>6} {'cpu-t':>6} | {'spread o/p':>11} | {'peak MiB o/p':>13}")
    lines = [head, "-" * len(head)] if header else []
    for r in rows:
        if "skipped" in r:
            lines.append(f"{r['arch']:<20} {r['device']:<6} skipped: {r['skipped']}")
            continue
        mem = r.get("memory")
        mem_s = f"{mem['ours']['peak_mib']:.0f}/{mem['plain']['peak_mib']:.0f}" if mem else "-"
        batch = f"{r['batch_size']}x{r['residues_per_batch_mean'] / r['batch_size']:.0f}"
        lines.append(
            f"{r['arch']:<20} {r['device'][:6]:<6} {r['precision'][:4]:<5} {r['threads']:>3} {batch:>9} | "
            f"{r['ours_median']:>10.1f} {r['plain_median']:>11.1f} | {r['ratio']:>6.3f} "
            f"{r['median_pair_ratio']:>6.3f} {_cpu_ratio(r):>6} | {r['ours_spread']:>5.2f}/{r['plain_spread']:<5.2f} | "
            f"{mem_s:>13}"
            + ("" if r["ok"] else f"  BELOW {r['min_ratio']}")
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Training throughput of fedesm's local loop against a plain "
                                            "PyTorch + PEFT loop on the same model and batches.")
    p.add_argument("--archs", nargs="+", default=["esm2_t6_8M_UR50D", "esm2_t12_35M_UR50D"],
                   help="architectures to time on --device (random init)")
    p.add_argument("--device", default="cpu", help="device for --archs (cpu, cuda, cuda:N)")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per batch")
    p.add_argument("--length", type=int, nargs=2, default=[180, 220], metavar=("MIN", "MAX"),
                   help="residues per sequence")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per repetition")
    p.add_argument("--reps", type=int, default=8, help="repetitions of each loop (interleaved)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps of each loop first")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--json", help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    settings = dict(batch_size=args.batch_size, min_len=args.length[0], max_len=args.length[1],
                    steps=args.steps, reps=args.reps, warmup=args.warmup, threads=args.threads)
    rows = run(args.archs, device=args.device, settings=settings)
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0 if all(r.get("ok", True) for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
