"""Site training against what a user would pick instead: Hugging Face `EsmForTokenClassification`
(`attn_implementation="sdpa"`) + PEFT LoRA (query, key, value; r=16; the classifier trained) + AdamW.

Both loops train on the same token batches: GPSite ATP training chains (the shipped set's length
distribution) drawn at random and cropped at `crop` residues, `batch_size` per batch, padded to the
batch's longest (the trainer's own sampler, bucketing off as on CPU). Same random-init ESM-2 weights
of the named shape (no hub), same LoRA rank and targets, same learning rate. fedesm runs its site
loop (`LocalTrainer.train_steps`, default `model.attention`: packed), the peer a plain HF loop.

Repetitions are interleaved (ABBA) after a warm-up step of each; the figure is labelled residues per
second of process CPU time (on a shared machine the steady one), 1 thread by default; the ratio is
the ratio of the medians. `padding_share` is the share of each batch shape's tokens that are padding.

    python bench/bench_peer.py [--archs esm2_t6_8M_UR50D] [--shapes 1000x8 512x32] [--reps 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass

import torch

from fedesm.data.batching import IGNORE_INDEX, RandomBatchSampler, Tokenizer
from fedesm.model.adapters import build_lora_model
from fedesm.model.backbone import load_backbone
from fedesm.settings import LoraSettings, TrainConfig
from fedesm.training.trainer import LocalTrainer

TARGET_RATIO = 1.6  # fedesm / HF peer at 8M and 35M, crop 1,000, batch 8 (issue 25)
MIN_RATIO = 1.0  # at every batch shape
SHAPES = ((1000, 8), (1000, 32), (512, 8), (512, 32))  # (crop, batch size)


@dataclass
class PeerSettings:
    arch: str = "esm2_t6_8M_UR50D"
    crop: int = 1000
    batch_size: int = 8
    reps: int = 3  # timed steps of each loop, interleaved
    warmup: int = 1
    lora_r: int = 16
    lr: float = 1e-3
    seed: int = 0
    threads: int = 1
    dataset: str = "gpsite:ATP"
    attention: str = "packed"  # fedesm's model.attention


class FixedBatches:
    """The trainer's sampler interface over batches made before timing (both loops get the same ones)."""

    def __init__(self, batches):
        self.batches, self.i = batches, 0
        self.records = []

    def next_batch(self):
        b = self.batches[self.i % len(self.batches)]
        self.i += 1
        return b


class HFPeer:
    """The Hugging Face loop a user would write: EsmForTokenClassification (sdpa) + PEFT LoRA + AdamW."""

    def __init__(self, esm2, lora_r: int, lr: float, device="cpu", autocast_dtype=None, seed: int = 0):
        from peft import LoraConfig, get_peft_model
        from transformers import EsmForTokenClassification

        from fedesm.model.hf import _quiet_transformers, esm_model_state, hf_config_for

        _quiet_transformers()
        config = hf_config_for(esm2, num_labels=2, classifier_dropout=0.1)
        config._attn_implementation = "sdpa"
        with torch.random.fork_rng(devices=[]), torch.device(device):  # built where it runs (650M: fast on GPU)
            torch.manual_seed(seed)
            model = EsmForTokenClassification(config)
        model.esm.load_state_dict(esm_model_state(esm2), strict=False)  # the same backbone weights
        model.config._attn_implementation = "sdpa"
        cfg = LoraConfig(r=lora_r, lora_alpha=2 * lora_r, lora_dropout=0.0, target_modules=["query", "key", "value"],
                         modules_to_save=["classifier"])
        self.model = get_peft_model(model, cfg).to(device)
        self.pad = esm2.padding_idx
        self.device = torch.device(device)
        self.autocast_dtype = autocast_dtype
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=0.01)

    def step(self, tokens: torch.Tensor, labels: torch.Tensor) -> float:
        self.model.train()
        tokens, labels = tokens.to(self.device), labels.to(self.device)
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            out = self.model(input_ids=tokens, attention_mask=tokens.ne(self.pad).long(), labels=labels)
        out.loss.backward()
        self.optimizer.step()
        return float(out.loss.detach())


def make_batches(records, alphabet, crop: int, batch_size: int, n: int, seed: int = 0):
    sampler = RandomBatchSampler(records, Tokenizer(alphabet), batch_size, crop, seed=seed, bucket=False)
    return [sampler.next_batch() for _ in range(n)]


def padding_share(batches, pad: int) -> float:
    total = sum(t.numel() for t, _ in batches)
    return float(sum(int(t.eq(pad).sum()) for t, _ in batches) / total) if total else 0.0


def compare(s: PeerSettings, records=None, echo=print) -> dict:
    """One row: fedesm's site loop vs the HF peer on the same batches; residues per CPU-second."""
    from fedesm.data.validate import load_dataset

    old_threads = torch.get_num_threads()
    torch.set_num_threads(s.threads)
    try:
        records = records if records is not None else load_dataset(s.dataset)
        backbone = load_backbone(f"random:{s.arch}")
        n = s.warmup + s.reps
        batches = make_batches(records, backbone.alphabet, s.crop, s.batch_size, n, seed=s.seed)
        peer = HFPeer(backbone.model, s.lora_r, s.lr, seed=s.seed)
        model = build_lora_model(backbone, LoraSettings(r=s.lora_r), seed=s.seed, attention=s.attention)
        config = TrainConfig(device="cpu", lr=s.lr, batch_size=s.batch_size, max_len=s.crop, steps_per_round=n,
                             rounds=1, seed=s.seed, bucket=False)
        trainer = LocalTrainer(model, backbone.alphabet, records[:1], config)
        trainer.sampler = FixedBatches(batches)
        residues = [int((lab != IGNORE_INDEX).sum()) for _, lab in batches]
        ours, theirs = [], []

        def timed(fn):
            c0 = time.process_time()
            fn()
            return time.process_time() - c0

        for i in range(s.warmup):
            trainer.train_steps(1)
            peer.step(*batches[i])
        for k in range(s.reps):
            i = s.warmup + k
            pair = [("ours", lambda: trainer.train_steps(1)), ("peer", lambda i=i: peer.step(*batches[i]))]
            if k % 2:
                pair.reverse()
            for name, fn in pair:
                sec = timed(fn)
                (ours if name == "ours" else theirs).append(residues[i] / sec)
            echo(f"  {s.arch} crop {s.crop} batch {s.batch_size}: rep {k + 1}/{s.reps} "
                 f"fedesm {ours[-1]:.0f} peer {theirs[-1]:.0f} residues/cpu-s")
        o, t = statistics.median(ours), statistics.median(theirs)
        return {"arch": s.arch, "crop": s.crop, "batch_size": s.batch_size, "threads": s.threads, "reps": s.reps,
                "attention": s.attention, "padding_share": round(padding_share(batches, backbone.alphabet.padding_idx), 4),
                "residues_per_batch_mean": statistics.mean(residues),
                "fedesm_residues_per_cpu_s": ours, "peer_residues_per_cpu_s": theirs,
                "fedesm_median": o, "peer_median": t, "ratio": o / t,
                "pair_ratios": [a / b for a, b in zip(ours, theirs)]}
    finally:
        torch.set_num_threads(old_threads)


def run(archs, shapes=SHAPES, reps: int = 3, threads: int = 1, echo=print, out=None, **kw) -> list[dict]:
    """Rows for every architecture x (crop, batch); with `out`, the JSON is rewritten after each row (a run
    cut short, e.g. killed for memory, keeps what it measured)."""
    from fedesm.data.validate import load_dataset

    records = load_dataset(kw.get("dataset", PeerSettings.dataset))
    rows = []
    for arch in archs:
        for crop, batch in shapes:
            row = compare(PeerSettings(arch=arch, crop=crop, batch_size=batch, reps=reps, threads=threads, **kw),
                          records, echo=echo)
            row["ok"] = row["ratio"] >= (TARGET_RATIO if (crop, batch) == (1000, 8) else MIN_RATIO)
            rows.append(row)
            echo(f"{arch} crop {crop} batch {batch}: fedesm/HF = {row['ratio']:.2f}x "
                 f"(padding {100 * row['padding_share']:.0f}%)")
            if out:
                with open(out, "w") as f:
                    json.dump(rows, f, indent=1)
    return rows


def format_table(rows: list[dict]) -> str:
    head = "| arch | crop | batch | padding | fedesm res/cpu-s | HF sdpa+PEFT res/cpu-s | ratio | target |"
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        target = f">= {TARGET_RATIO}" if (r["crop"], r["batch_size"]) == (1000, 8) else f">= {MIN_RATIO}"
        lines.append(f"| {r['arch']} | {r['crop']} | {r['batch_size']} | {100 * r['padding_share']:.0f}% | "
                     f"{r['fedesm_median']:.0f} | {r['peer_median']:.0f} | **{r['ratio']:.2f}** | {target} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--archs", nargs="+", default=["esm2_t6_8M_UR50D", "esm2_t12_35M_UR50D"])
    p.add_argument("--shapes", nargs="+", default=[f"{c}x{b}" for c, b in SHAPES], help="CROPxBATCH")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--attention", default="packed")
    p.add_argument("--out", help="write the rows as JSON")
    a = p.parse_args(argv)
    shapes = [tuple(int(x) for x in s.split("x")) for s in a.shapes]
    rows = run(a.archs, shapes, reps=a.reps, threads=a.threads, attention=a.attention, out=a.out)
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
