"""GPU rows for one short device session: packed vs padded fused vs stock attention vs the Hugging Face peer.

Per architecture (default 35M and 650M), on the same batches of GPSite ATP training chains (the shipped
set's length distribution, random draws, cropped at 1,000, batch 8, no length bucketing), bf16 autocast:

  packed   fedesm's site loop, model.attention packed (the default: padding dropped, varlen flash attention)
  fused    the same loop on the padded batch, scaled_dot_product_attention with a padding mask
  stock    the same loop, fair-esm's own attention (the last measured H100 figures were this arm)
  hf       EsmForTokenClassification(attn_implementation="sdpa") + PEFT LoRA (query, key, value; r=16) + AdamW

residues/s over timed steps (after warm-up), peak GPU memory (torch.cuda.max_memory_allocated), and for
the first architecture the packed and fused logits' agreement in bf16. A row that fails (out of memory,
a missing kernel) is recorded with its error and the next one runs; rows stop when `--budget-s` is
spent. The JSON is rewritten after every row, so a cut-off run keeps what it measured.

From a fresh checkout with torch present:  pip install -e . && python bench/cuda_packed.py
(writes $OUT/cuda_packed.json when OUT is set, else bench/cuda/cuda_packed.json; --out to choose).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT / "custom", ROOT / "bench"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import torch  # noqa: E402

ARCHS = ("esm2_t12_35M_UR50D", "esm2_t33_650M_UR50D")
ARMS = ("packed", "fused", "stock", "hf")
# the last GPU figures (H100, stock attention, padded, bf16, 8 x 1,000): the targets are relative to them
STOCK_H100 = {"esm2_t12_35M_UR50D": {"residues_per_second": 38000},
              "esm2_t33_650M_UR50D": {"residues_per_second": 14000, "peak_gib": 50}}


def default_out() -> Path:
    out = os.environ.get("OUT")
    return Path(out) / "cuda_packed.json" if out else ROOT / "bench" / "cuda" / "cuda_packed.json"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _write(path: Path, doc: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(path)


def _site_loop(base, arm: str, batches, device: torch.device, precision: str, lora_r: int):
    """A LocalTrainer on a copy of the backbone, `model.attention` = arm, fed the fixed batches."""
    from bench_peer import FixedBatches

    from fedesm.model.adapters import build_lora_model
    from fedesm.model.backbone import Backbone
    from fedesm.settings import LoraSettings, TrainConfig
    from fedesm.training.trainer import LocalTrainer

    backbone = Backbone(copy.deepcopy(base.model), base.alphabet, base.source, base.arch)
    model = build_lora_model(backbone, LoraSettings(r=lora_r), seed=0, attention=arm)
    config = TrainConfig(device=str(device), precision=precision, batch_size=batches[0][0].shape[0], max_len=1000,
                         steps_per_round=1000, rounds=1, schedule="constant", warmup_steps=0, bucket=False)
    trainer = LocalTrainer(model, base.alphabet, [_dummy_record()], config)
    trainer.sampler = FixedBatches(batches)
    return lambda: trainer.train_steps(1), trainer


def _dummy_record():
    import numpy as np

    from fedesm.data.records import Record

    return Record("unused", "ACDE", np.zeros(4, np.uint8))


def measure(fn, batches, device: torch.device, warmup: int, steps: int) -> dict:
    """residues/s of `steps` calls of fn (one optimizer step each, batches in order), peak memory."""
    from fedesm.data.batching import IGNORE_INDEX

    for _ in range(warmup):
        fn()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    residues = 0
    t0 = time.perf_counter()
    for k in range(steps):
        fn(k)
        residues += int((batches[(warmup + k) % len(batches)][1] != IGNORE_INDEX).sum())
    _sync(device)
    seconds = time.perf_counter() - t0
    row = {"steps": steps, "seconds": seconds, "residues": residues, "residues_per_second": residues / seconds}
    if device.type == "cuda":
        row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return row


def agreement(base, batches, device, precision, lora_r) -> dict:
    """Packed vs padded fused logits on one batch, real tokens only, under the run's autocast."""
    outs = {}
    tokens = batches[0][0].to(device)
    real = tokens.ne(base.alphabet.padding_idx)
    for arm in ("fused", "packed"):
        _, trainer = _site_loop(base, arm, batches, device, precision, lora_r)
        trainer.model.eval()
        with torch.no_grad(), torch.autocast(device.type, dtype=trainer.autocast_dtype,
                                             enabled=trainer.autocast_dtype is not None):
            outs[arm] = trainer.model(tokens)[real].float().cpu()
        del trainer
        _free(device)
    ref = outs["fused"]
    return {"max_abs_diff_packed_vs_fused": float((outs["packed"] - ref).abs().max()),
            "max_abs_logit": float(ref.abs().max())}


def run(archs=ARCHS, arms=ARMS, device: str = "cuda", precision: str = "bf16", batch_size: int = 8, crop: int = 1000,
        warmup: int = 3, steps: int = 10, budget_s: float = 420.0, lora_r: int = 16, out: Path | None = None,
        records=None, echo=print) -> dict:
    from bench_peer import HFPeer, make_batches, padding_share

    from fedesm.model.backbone import load_backbone
    from fedesm.training.inference import autocast_dtype

    t_start = time.perf_counter()
    dev = torch.device(device)
    doc = {"torch": torch.__version__, "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
           "precision": precision, "batch_size": batch_size, "crop": crop, "warmup": warmup, "steps": steps,
           "stock_h100_reference": STOCK_H100, "rows": [], "agreement": {}}
    if records is None:
        from fedesm.data.validate import load_dataset

        records = load_dataset("gpsite:ATP")
    for i, arch in enumerate(archs):
        if time.perf_counter() - t_start > budget_s:
            doc["rows"].append({"arch": arch, "skipped": f"time budget of {budget_s:.0f}s spent"})
            echo(f"{arch}: skipped, time budget spent")
            continue
        echo(f"[{time.perf_counter() - t_start:.0f}s] {arch}: building the random-init backbone")
        try:
            base = load_backbone(f"random:{arch}")
        except Exception as e:  # noqa: BLE001 -- a row that cannot run is recorded, the rest still run
            doc["rows"].append({"arch": arch, "skipped": f"backbone: {type(e).__name__}: {e}"})
            continue
        batches = make_batches(records, base.alphabet, crop, batch_size, warmup + steps, seed=0)
        share = padding_share(batches, base.alphabet.padding_idx)
        if i == 0:
            try:
                doc["agreement"][arch] = agreement(base, batches, dev, precision, lora_r)
                echo(f"  agreement {doc['agreement'][arch]}")
            except Exception as e:  # noqa: BLE001
                doc["agreement"][arch] = {"error": f"{type(e).__name__}: {e}"}
        for arm in arms:
            if time.perf_counter() - t_start > budget_s:
                doc["rows"].append({"arch": arch, "arm": arm, "skipped": f"time budget of {budget_s:.0f}s spent"})
                echo(f"  {arm}: skipped, time budget spent")
                continue
            row = {"arch": arch, "arm": arm, "padding_share": share}
            holder = None
            try:
                if arm == "hf":
                    holder = HFPeer(base.model, lora_r, 1e-3, device=dev, autocast_dtype=autocast_dtype(dev, precision))
                    state = {"i": 0}

                    def fn(k=None, peer=holder, state=state):
                        peer.step(*batches[state["i"] % len(batches)])
                        state["i"] += 1
                else:
                    step, holder = _site_loop(base, arm, batches, dev, precision, lora_r)

                    def fn(k=None, step=step):
                        step()
                row.update(measure(fn, batches, dev, warmup, steps))
            except Exception as e:  # noqa: BLE001 -- e.g. out of memory: say so, go on
                row["skipped"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
                row["trace"] = traceback.format_exc(limit=3)[-800:]
            del holder
            _free(dev)
            doc["rows"].append(row)
            echo(f"  [{time.perf_counter() - t_start:.0f}s] {arch} {arm}: "
                 + (row["skipped"] if "skipped" in row else
                    f"{row['residues_per_second']:.0f} residues/s"
                    + (f", peak {row['peak_gib']:.1f} GiB" if "peak_gib" in row else "")))
            if out is not None:
                _write(out, {**doc, "seconds": time.perf_counter() - t_start})
        del base
        _free(dev)
        _ratios(doc, arch)
    doc["seconds"] = time.perf_counter() - t_start
    if out is not None:
        _write(out, doc)
    return doc


def _ratios(doc: dict, arch: str) -> None:
    """Each arm's residues/s and peak memory relative to stock and to the HF peer (same run, same batches)."""
    rows = {r["arm"]: r for r in doc["rows"] if r.get("arch") == arch and "residues_per_second" in r}
    for r in rows.values():
        for ref in ("stock", "hf"):
            if ref in rows and ref != r["arm"]:
                r[f"speed_vs_{ref}"] = r["residues_per_second"] / rows[ref]["residues_per_second"]
                if "peak_gib" in r:
                    r[f"memory_vs_{ref}"] = r["peak_gib"] / rows[ref]["peak_gib"]
        h100 = STOCK_H100.get(arch)
        if h100:
            r["speed_vs_stock_h100_figure"] = r["residues_per_second"] / h100["residues_per_second"]
            if "peak_gib" in r and "peak_gib" in h100:
                r["memory_vs_stock_h100_figure"] = r["peak_gib"] / h100["peak_gib"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None, help="JSON path (default $OUT/cuda_packed.json or bench/cuda/)")
    p.add_argument("--archs", nargs="+", default=list(ARCHS))
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    p.add_argument("--device", default="cuda")
    p.add_argument("--precision", default="bf16", choices=("bf16", "fp32"))
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--crop", type=int, default=1000)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--budget-s", type=float, default=420.0, help="stop starting rows after this many seconds")
    a = p.parse_args(argv)
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: nothing to measure (use --device cpu for a dry run)", file=sys.stderr)
        return 2
    out = a.out or default_out()
    doc = run(a.archs, a.arms, a.device, a.precision, a.batch_size, a.crop, a.warmup, a.steps, a.budget_s, out=out)
    print(json.dumps([{k: v for k, v in r.items() if k != "trace"} for r in doc["rows"]], indent=1))
    print(f"wrote {out} ({doc['seconds']:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
