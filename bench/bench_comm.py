"""Communication per site and round: bytes of the serialized payload, as NVFLARE sends it.

A site sends its LoRA adapters + classification head (`get_exchanged_state`) as a `DXO(WEIGHTS)`
Shareable (`make_weights_shareable`, float32 or float16 transfer, with the executor's metrics meta) and
receives the global adapters + head from the server in float32, built as ScatterAndGather builds its
train task (`global_model_shareable`). The reference is full-model federated fine-tuning: the whole
fair-esm backbone state dict + head, serialized the same way, both ways. Sizes are
`shareable_nbytes` = `len(fobs.dumps(shareable))`, NVFLARE's own serialization.

Adapters are real tensors for every size (`initial_exchanged_state` builds them without a backbone).
The full model is measured on arrays of the right shapes (values do not change the size) up to
`measure_full_max_params` parameters; above that (650M: ~2.6 GB in fp32) it is computed: parameter
count x bytes per value, plus the per-tensor framing overhead measured on a skeleton with the same
names, ranks and dtypes. The same computation is checked against the measured sizes of the smaller
models (`full_predicted_error`).

    python bench/bench_comm.py [--archs esm2_t6_8M_UR50D esm2_t12_35M_UR50D] [--rank 16]
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from fedesm.flare.payload import make_weights_shareable, shareable_nbytes
from fedesm.model.adapters import initial_exchanged_state
from fedesm.architectures import get_architecture, new_esm2
from fedesm.keys import CLASSIFIER_NAME
from fedesm.settings import LoraSettings

DEFAULT_ARCHS = ("esm2_t6_8M_UR50D", "esm2_t12_35M_UR50D", "esm2_t30_150M_UR50D", "esm2_t33_650M_UR50D")
SITE_META = {  # what the executor puts beside the weights (steps, sample count, metrics, site name)
    "NUM_STEPS_CURRENT_ROUND": 100, "n_samples": 1000, "site": "site-1",
    "metrics": {k: 0.5 for k in ("global_accuracy", "global_precision", "global_recall", "global_f1",
                                 "global_mcc", "global_auroc", "global_auprc", "accuracy", "precision",
                                 "recall", "f1", "mcc", "auroc", "auprc", "train_loss", "steps",
                                 "train_seconds", "residues_per_second", "lr", "task_seconds")},
}


def global_model_shareable(weights: dict, current_round: int = 1, num_rounds: int = 30):
    """The train task's data as ScatterAndGather builds it: FullModelShareableGenerator + round headers."""
    from nvflare.apis.fl_context import FLContext
    from nvflare.app_common.abstract.model import make_model_learnable
    from nvflare.app_common.app_constant import AppConstants
    from nvflare.app_common.shareablegenerators.full_model_shareable_generator import FullModelShareableGenerator

    from fedesm.flare.payload import to_numpy_dict

    learnable = make_model_learnable(to_numpy_dict(weights), {})  # the persistor keeps float32 numpy arrays
    shareable = FullModelShareableGenerator().learnable_to_shareable(learnable, FLContext())
    shareable.set_header(AppConstants.CURRENT_ROUND, current_round)
    shareable.set_header(AppConstants.NUM_ROUNDS, num_rounds)
    shareable.add_cookie(AppConstants.CONTRIBUTION_ROUND, current_round)
    return shareable


def full_model_shapes(arch_name: str, num_labels: int = 2) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Name -> (shape, dtype) of the full model: fair-esm's ESM2 state dict + the head (meta device)."""
    esm2, _ = new_esm2(get_architecture(arch_name), device="meta")
    shapes = {f"esm.{k}": (tuple(v.shape), np.dtype(str(v.dtype).replace("torch.", "")))
              for k, v in esm2.state_dict().items()}
    shapes[f"{CLASSIFIER_NAME}.weight"] = ((num_labels, esm2.embed_dim), np.dtype("float32"))
    shapes[f"{CLASSIFIER_NAME}.bias"] = ((num_labels,), np.dtype("float32"))
    return shapes


def _nbytes(shapes: dict, transfer_dtype: str) -> int:
    size = np.dtype(transfer_dtype).itemsize
    return sum(int(np.prod(shape)) * (size if np.issubdtype(dt, np.floating) else dt.itemsize)
               for shape, dt in shapes.values())


def _measured(shapes: dict, transfer_dtype: str, meta=None) -> int:
    arrays = {k: np.zeros(shape, dtype=dt) for k, (shape, dt) in shapes.items()}
    return shareable_nbytes(make_weights_shareable(arrays, meta, transfer_dtype))


def _bin_prefix(n: int) -> int:
    """msgpack bin header length for an n-byte blob (bin8 / bin16 / bin32)."""
    return 2 if n < 2**8 else 3 if n < 2**16 else 5


def predicted_nbytes(shapes: dict, transfer_dtype: str, meta=None) -> int:
    """Serialized size without materializing the arrays.

    A skeleton of one-element arrays with the same names, ranks and dtypes is serialized for real;
    each array's data bytes (and its msgpack length prefix) are then swapped for the real ones.
    """
    skeleton = {k: ((1,) * len(shape), dt) for k, (shape, dt) in shapes.items()}
    size = _measured(skeleton, transfer_dtype, meta)
    item = np.dtype(transfer_dtype).itemsize
    for (shape, dt), (skel_shape, _) in zip(shapes.values(), skeleton.values()):
        each = item if np.issubdtype(dt, np.floating) else dt.itemsize
        header = 128  # np.save's header (padded to 64 bytes); both blobs have the same one here
        real, small = int(np.prod(shape)) * each, each
        size += (real - small) + _bin_prefix(header + real) - _bin_prefix(header + small)
    return size


def payload_row(arch_name: str, lora_r: int = 16, measure_full_max_params: float = 2e8) -> dict:
    """Bytes a site sends and receives per round, LoRA vs full model, fp32 and fp16 transfer."""
    arch = get_architecture(arch_name)
    lora = LoraSettings(r=lora_r)
    adapters = initial_exchanged_state(arch, lora)
    n_adapter = int(sum(v.numel() for v in adapters.values()))
    sent32 = shareable_nbytes(make_weights_shareable(adapters, SITE_META, "float32"))
    sent16 = shareable_nbytes(make_weights_shareable(adapters, SITE_META, "float16"))
    received = shareable_nbytes(global_model_shareable(adapters))

    shapes = full_model_shapes(arch_name)
    n_full = int(sum(int(np.prod(s)) for s, _ in shapes.values()))
    full = {}
    for dtype in ("float32", "float16"):
        predicted = predicted_nbytes(shapes, dtype, SITE_META)
        entry = {"predicted": predicted, "data_bytes": _nbytes(shapes, dtype)}
        if n_full <= measure_full_max_params:
            entry["measured"] = _measured(shapes, dtype, SITE_META)
            entry["predicted_error"] = (predicted - entry["measured"]) / entry["measured"]
        entry["bytes"] = entry.get("measured", predicted)
        entry["how"] = "measured" if "measured" in entry else "computed (params x bytes + measured framing)"
        full[dtype] = entry
    full32, full16 = full["float32"]["bytes"], full["float16"]["bytes"]
    # full fine-tuning: the global model comes back in float32 too (the server's few header bytes aside)
    return {
        "arch": arch_name,
        "lora_r": lora_r,
        "lora_tensors": len(adapters),
        "lora_parameters": n_adapter,
        "full_tensors": len(shapes),
        "full_parameters": n_full,
        "parameter_fraction": n_adapter / n_full,
        "lora_sent_fp32": sent32,
        "lora_sent_fp16": sent16,
        "lora_received": received,
        "lora_round_fp32": sent32 + received,
        "lora_round_fp16": sent16 + received,
        "full": full,
        "full_sent_fp32": full32,
        "full_received": full32,
        "full_round_fp32": 2 * full32,
        "ratio_sent_fp32": sent32 / full32,
        "ratio_sent_fp16": sent16 / full32,
        "ratio_sent_fp16_vs_full_fp16": sent16 / full16,
        "ratio_round_fp32": (sent32 + received) / (2 * full32),
        "full_how": full["float32"]["how"],
    }


def run(archs=DEFAULT_ARCHS, lora_r: int = 16, measure_full_max_params: float = 2e8, echo=None) -> list[dict]:
    rows = []
    for arch in archs:
        rows.append(payload_row(arch, lora_r, measure_full_max_params))
        if echo:
            echo(format_table(rows[-1:], header=False))
    return rows


def _mb(n: float) -> str:
    return f"{n / 1e6:.3f}" if n < 1e7 else f"{n / 1e6:.1f}"


def format_table(rows: list[dict], header: bool = True) -> str:
    head = (f"{'arch':<20} {'r':>3} | {'LoRA params':>11} {'full params':>12} | {'sent fp32 MB':>12} "
            f"{'sent fp16 MB':>12} {'recv MB':>8} | {'full MB':>8} {'full how':<9} | {'sent/full':>9} "
            f"{'fp16/full':>9} {'round/full':>10}")
    lines = [head, "-" * len(head)] if header else []
    for r in rows:
        lines.append(
            f"{r['arch']:<20} {r['lora_r']:>3} | {r['lora_parameters']:>11,} {r['full_parameters']:>12,} | "
            f"{_mb(r['lora_sent_fp32']):>12} {_mb(r['lora_sent_fp16']):>12} {_mb(r['lora_received']):>8} | "
            f"{_mb(r['full_sent_fp32']):>8} {r['full_how'].split()[0]:<9} | {100 * r['ratio_sent_fp32']:>8.2f}% "
            f"{100 * r['ratio_sent_fp16']:>8.2f}% {100 * r['ratio_round_fp32']:>9.2f}%")
    if header:
        lines.append("bytes per site per round, serialized as NVFLARE sends them (fobs); MB = 1e6 bytes; "
                     "full = fp32 backbone state dict + head; recv = global adapters (fp32)")
    return "\n".join(lines)


def fp16_comparison(fp32_run: dict, fp16_run: dict, noise_run: dict | None = None) -> dict:
    """F1 (and AUPRC, which moves with smaller changes) of the global model after the last round, float32 vs
    float16 transfer, same seed.

    `noise_run` (float32, another seed) gives the run-to-run spread to compare the difference with.
    """
    f32, f16 = fp32_run["global_f1_final"], fp16_run["global_f1_final"]
    a32, a16 = fp32_run["global_auprc_final"], fp16_run["global_auprc_final"]
    out = {
        "arch": fp32_run["settings"]["arch"],
        "rounds": fp32_run["settings"]["rounds"],
        "steps_per_round": fp32_run["settings"]["steps_per_round"],
        "sites": fp32_run["settings"]["sites"],
        "global_f1_round0": fp32_run["global_f1_round0"],
        "f1_fp32": f32,
        "f1_fp16": f16,
        "f1_difference": f16 - f32,
        "auprc_fp32": a32,
        "auprc_fp16": a16,
        "auprc_difference": a16 - a32,
        "sent_bytes_fp32": _one(fp32_run["sent_bytes"]),
        "sent_bytes_fp16": _one(fp16_run["sent_bytes"]),
    }
    out["sent_bytes_ratio"] = out["sent_bytes_fp16"] / out["sent_bytes_fp32"] if out["sent_bytes_fp32"] else None
    if noise_run is not None:
        out["f1_fp32_other_seed"] = noise_run["global_f1_final"]
        out["seed_noise"] = noise_run["global_f1_final"] - f32
        out["auprc_fp32_other_seed"] = noise_run["global_auprc_final"]
        out["auprc_seed_noise"] = noise_run["global_auprc_final"] - a32
        out["within_noise"] = abs(f16 - f32) <= max(abs(out["seed_noise"]), 0.01)
    return out


def _one(per_site: dict):
    values = sorted(set(per_site.values()))
    return values[0] if len(values) == 1 else values


def format_fp16(c: dict) -> str:
    lines = [f"{c['arch']}, {c['sites']} sites x {c['rounds']} rounds x {c['steps_per_round']} steps: global F1 "
             f"(mean over sites' validation) round 0 {c['global_f1_round0']:.3f} -> fp32 {c['f1_fp32']:.4f}, "
             f"fp16 {c['f1_fp16']:.4f} (difference {c['f1_difference']:+.4f}); AUPRC fp32 {c['auprc_fp32']:.4f}, "
             f"fp16 {c['auprc_fp16']:.4f} ({c['auprc_difference']:+.4f})"]
    if "seed_noise" in c:
        lines.append(f"run-to-run noise (fp32, another seed): {c['f1_fp32_other_seed']:.4f} "
                     f"({c['seed_noise']:+.4f}); fp16 difference within noise: {c['within_noise']}")
    lines.append(f"bytes sent per site per round in the run: fp32 {c['sent_bytes_fp32']}, "
                 f"fp16 {c['sent_bytes_fp16']} (x{c['sent_bytes_ratio']:.3f})")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Bytes per site per round: LoRA adapters + head vs the full model.")
    p.add_argument("--archs", nargs="+", default=list(DEFAULT_ARCHS), help="architectures")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank")
    p.add_argument("--measure-full-max-params", type=float, default=2e8,
                   help="serialize the full model for real up to this many parameters; compute it above")
    p.add_argument("--json", help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    rows = run(args.archs, args.rank, args.measure_full_max_params)
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
