"""Server-side aggregation cost: fedesm's FRA-LoRA against NVFLARE's HLoRA-style peer and a dense SVD,
per adapted matrix and for all adapted matrices of an ESM-2 model, measured side by side in one process.

* ours: ``fedesm.aggregation.fra_lora`` on one matrix, ``aggregate(..., "fra")`` on a whole model's
  state dicts (numpy float32, as sites send them): float32 math, pairs of one shape re-factored in
  one batched call, the route (stacked factors or dense average) picked by shape.
* peer: the HLoRA-style aggregator of NVFLARE's MedGemma example, re-implemented here from its
  description (``peer_hlora``): torch float32, sqrt(w)-scaled factors concatenated, ``torch.linalg.qr``
  of both stacks, SVD of the small core, S into A, one call per matrix; a model = a Python loop over
  its matrices. It gets ready-made torch tensors (no conversion), which favours it.
* dense: the weighted average formed as a d x d float32 matrix, full SVD, top r kept. A whole model's
  dense time is measured (interleaved with the others) up to d = 640 (150M) and estimated above
  (per-matrix time x matrices: 99 dense SVDs at d=1280 take minutes).

Repetitions of ours and the peer are interleaved (ours, peer, peer, ours, ...); times are medians,
spread = (max - min) / median. Accuracy: max |B A - reference| against a float64 dense SVD.

    python bench/bench_aggregation.py [--sizes 480 1280] [--sites 2 8 32] [--models 480 1280] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import numpy as np
import torch

from fedesm.aggregation import aggregate, choose_route, fra_lora

# ESM-2 hidden size -> (architecture, number of LoRA-adapted matrices: q, k, v x layers)
MODELS = {320: ("esm2_t6_8M_UR50D", 3 * 6), 480: ("esm2_t12_35M_UR50D", 3 * 12),
          640: ("esm2_t30_150M_UR50D", 3 * 30), 1280: ("esm2_t33_650M_UR50D", 3 * 33),
          2560: ("esm2_t36_3B_UR50D", 3 * 36)}
N_MATRICES = {d: n for d, (_, n) in MODELS.items()}


def peer_hlora(a_list: list[torch.Tensor], b_list: list[torch.Tensor], weights, rank: int):
    """NVFLARE MedGemma's HLoRA-style merge of one matrix (re-implemented): returns (A, B), S into A."""
    total = float(sum(weights))
    scale = [math.sqrt(float(w) / total) for w in weights]
    left = torch.cat([b * s for b, s in zip(b_list, scale)], dim=1)  # d_out x K r
    right = torch.cat([a * s for a, s in zip(a_list, scale)], dim=0)  # K r x d_in
    q_left, r_left = torch.linalg.qr(left, mode="reduced")
    q_right, r_right = torch.linalg.qr(right.T, mode="reduced")
    u, s, vh = torch.linalg.svd(r_left @ r_right.T, full_matrices=False)
    k = min(rank, s.shape[0])
    b_new = torch.zeros(left.shape[0], rank)
    a_new = torch.zeros(rank, right.shape[1])
    b_new[:, :k] = q_left @ u[:, :k]
    a_new[:k] = torch.diag(s[:k]) @ (vh[:k] @ q_right.T)
    return a_new, b_new


def dense_svd(a_list, b_list, weights, rank: int, dtype=torch.float32):
    """The reference: form the weighted d x d average in ``dtype``, full SVD, keep the top ``rank``."""
    w = torch.as_tensor(np.asarray(weights, dtype=np.float64) / np.sum(weights))
    m = sum(float(wk) * (b.to(dtype) @ a.to(dtype)) for wk, a, b in zip(w, a_list, b_list))
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    root = s[:rank].sqrt()
    return root[:, None] * vh[:rank], u[:, :rank] * root


def _site_factors(rng, k: int, d: int, rank: int):
    """LoRA-like scales: A ~ 1/sqrt(d) (Kaiming-ish), B small after a few local steps; numpy float32."""
    return [((rng.standard_normal((rank, d)) / np.sqrt(d)).astype(np.float32),
             (0.01 * rng.standard_normal((d, rank))).astype(np.float32)) for _ in range(k)]


def _interleaved(fns: dict, reps: int, cpu: dict | None = None) -> dict[str, list[float]]:
    """Wall seconds per call of each function, repetitions interleaved (A B, B A, ...) after one warm-up
    call; process CPU seconds go to ``cpu`` (not counting time spent waiting for a core)."""
    for fn in fns.values():
        fn()
    names = list(fns)
    times = {n: [] for n in names}
    for rep in range(reps):
        for n in (names if rep % 2 == 0 else names[::-1]):
            t0, c0 = time.perf_counter(), time.process_time()
            fns[n]()
            times[n].append(time.perf_counter() - t0)
            if cpu is not None:
                cpu.setdefault(n, []).append(time.process_time() - c0)
    return times


def _spread(xs: list[float]) -> float:
    med = statistics.median(xs)
    return (max(xs) - min(xs)) / med if med else float("nan")


def _product(a, b) -> np.ndarray:
    a = a.numpy() if isinstance(a, torch.Tensor) else a
    b = b.numpy() if isinstance(b, torch.Tensor) else b
    return b.astype(np.float64) @ a.astype(np.float64)


def matrix_row(d: int, k: int, rank: int, rng, reps: int, dense_reps: int) -> dict:
    """One adapted matrix (d x d), K sites: ours vs peer (interleaved) vs dense SVD, and the accuracy of each."""
    factors = _site_factors(rng, k, d, rank)
    weights = rng.uniform(0.5, 1.5, k)
    a_t = [torch.from_numpy(a) for a, _ in factors]
    b_t = [torch.from_numpy(b) for _, b in factors]
    cpu: dict = {}
    times = _interleaved({"ours": lambda: fra_lora(factors, weights, rank),
                          "peer": lambda: peer_hlora(a_t, b_t, weights, rank)}, reps, cpu)
    dense_times = _interleaved({"dense": lambda: dense_svd(a_t, b_t, weights, rank)}, dense_reps)["dense"]
    ref = _product(*dense_svd(a_t, b_t, weights, rank, dtype=torch.float64))
    scale = float(np.max(np.abs(ref)))
    diff = {name: float(np.max(np.abs(_product(*res) - ref)))
            for name, res in (("ours", fra_lora(factors, weights, rank)),
                              ("peer", peer_hlora(a_t, b_t, weights, rank)),
                              ("dense", dense_svd(a_t, b_t, weights, rank)))}
    ours, peer, dense = (statistics.median(times["ours"]), statistics.median(times["peer"]),
                         statistics.median(dense_times))
    n = N_MATRICES.get(d)
    return {
        "d": d, "sites": k, "rank": rank, "route": choose_route(k * rank, d, d), "threads": torch.get_num_threads(),
        "reps": reps, "dense_reps": dense_reps,
        "ours_ms": 1e3 * ours, "peer_ms": 1e3 * peer, "dense_ms": 1e3 * dense,
        "ours_spread": _spread(times["ours"]), "peer_spread": _spread(times["peer"]),
        "peer_over_ours": peer / ours, "speedup": dense / ours,
        "pair_ratios_median": statistics.median(p / o for p, o in zip(times["peer"], times["ours"])),
        "ours_cpu_ms": 1e3 * statistics.median(cpu["ours"]), "peer_cpu_ms": 1e3 * statistics.median(cpu["peer"]),
        "n_matrices": n, "dense_s_model_est": dense * n if n else None,
        "max_abs_diff": diff["ours"], "rel_max_diff": diff["ours"] / scale,
        "peer_rel_max_diff": diff["peer"] / scale, "dense_fp32_rel_max_diff": diff["dense"] / scale,
        "ours_ms_all": [1e3 * t for t in times["ours"]], "peer_ms_all": [1e3 * t for t in times["peer"]],
    }


def model_states(rng, d: int, n_matrices: int, k: int, rank: int) -> list[dict[str, np.ndarray]]:
    """K sites' exchanged state dicts of an ESM-2 model of hidden size d: q, k, v LoRA pairs per layer + head."""
    states = []
    for _ in range(k):
        st = {}
        for j in range(n_matrices):
            prefix = f"base_model.model.esm.layers.{j // 3}.self_attn.{('q_proj', 'k_proj', 'v_proj')[j % 3]}"
            st[f"{prefix}.lora_A.weight"] = (rng.standard_normal((rank, d)) / np.sqrt(d)).astype(np.float32)
            st[f"{prefix}.lora_B.weight"] = (0.01 * rng.standard_normal((d, rank))).astype(np.float32)
        head = "base_model.model.classifier.modules_to_save.default"
        st[f"{head}.weight"] = rng.standard_normal((2, d)).astype(np.float32)
        st[f"{head}.bias"] = rng.standard_normal(2).astype(np.float32)
        states.append(st)
    return states


def peer_model(states_t: list[dict[str, torch.Tensor]], weights, rank: int) -> dict[str, torch.Tensor]:
    """The peer on a whole model: its per-matrix merge in a loop over the LoRA pairs, FedAvg for the rest."""
    total = float(sum(weights))
    out = {}
    for key in states_t[0]:
        if key.endswith(".lora_A.weight"):
            b_key = key.replace(".lora_A.", ".lora_B.")
            out[key], out[b_key] = peer_hlora([s[key] for s in states_t], [s[b_key] for s in states_t], weights, rank)
        elif ".lora_B." not in key:
            out[key] = sum(s[key] * (float(w) / total) for s, w in zip(states_t, weights))
    return out


DENSE_MODEL_MAX_D = 640  # whole-model dense SVDs are timed up to this size, estimated above


def dense_model(states_t: list[dict[str, torch.Tensor]], weights, rank: int) -> dict[str, torch.Tensor]:
    """The dense reference on a whole model: a float32 d x d average + full SVD per matrix."""
    out = {}
    for key in states_t[0]:
        if key.endswith(".lora_A.weight"):
            b_key = key.replace(".lora_A.", ".lora_B.")
            out[key], out[b_key] = dense_svd([s[key] for s in states_t], [s[b_key] for s in states_t], weights, rank)
    return out


def model_row(d: int, k: int, rank: int, rng, reps: int, dense_ms: float | None = None) -> dict:
    """A whole model's aggregation: ours (one `aggregate` call) vs the peer's loop (and the dense one up to
    DENSE_MODEL_MAX_D), interleaved."""
    arch, n = MODELS[d]
    states = model_states(rng, d, n, k, rank)
    states_t = [{key: torch.from_numpy(v) for key, v in st.items()} for st in states]
    weights = rng.uniform(0.5, 1.5, k)
    fns = {"ours": lambda: aggregate(states, weights, "fra", rank=rank),
           "peer": lambda: peer_model(states_t, weights, rank)}
    if d <= DENSE_MODEL_MAX_D:
        fns["dense"] = lambda: dense_model(states_t, weights, rank)
    cpu: dict = {}
    times = _interleaved(fns, reps, cpu)
    ours_out, peer_out = aggregate(states, weights, "fra", rank=rank), peer_model(states_t, weights, rank)
    key = next(iter(states[0]))
    b_key = key.replace(".lora_A.", ".lora_B.")
    p_ours, p_peer = _product(ours_out[key], ours_out[b_key]), _product(peer_out[key], peer_out[b_key])
    ours, peer = statistics.median(times["ours"]), statistics.median(times["peer"])
    return {
        "arch": arch, "d": d, "sites": k, "rank": rank, "n_matrices": n, "route": choose_route(k * rank, d, d),
        "threads": torch.get_num_threads(), "reps": reps,
        "ours_s": ours, "peer_s": peer, "peer_over_ours": peer / ours,
        "ours_spread": _spread(times["ours"]), "peer_spread": _spread(times["peer"]),
        "pair_ratios_median": statistics.median(p / o for p, o in zip(times["peer"], times["ours"])),
        "dense_s_est": dense_ms * n / 1e3 if dense_ms else None,
        "dense_s": statistics.median(times["dense"]) if "dense" in times else None,
        "cpu_s": {name: statistics.median(v) for name, v in cpu.items()},
        "dense_over_ours": statistics.median(times["dense"]) / ours if "dense" in times else None,
        "ours_vs_peer_rel_diff": float(np.max(np.abs(p_ours - p_peer)) / np.max(np.abs(p_peer))),
        "ours_s_all": times["ours"], "peer_s_all": times["peer"],
    }


def run(sizes=(480, 1280, 2560), sites=(2, 8, 32), rank: int = 16, models=(480, 1280), reps: int = 15,
        model_reps: int = 5, dense_reps: int | None = None, seed: int = 0) -> dict:
    """Per-matrix rows for each (size, sites) and whole-model rows for each (model size, sites)."""
    rng = np.random.default_rng(seed)
    fra_lora([(np.ones((1, 4), np.float32), np.ones((4, 1), np.float32))], [1.0], 1)  # warm up LAPACK
    rows = []
    for d in sizes:
        for k in sites:
            rows.append(matrix_row(d, k, rank, rng, reps, dense_reps or (3 if d < 2560 else 2)))
    dense = {(r["d"], r["sites"]): r["dense_ms"] for r in rows}
    model_rows = [model_row(d, k, rank, rng, model_reps, dense.get((d, k))) for d in models for k in sites]
    return {"rows": rows, "models": model_rows}


def format_table(result: dict) -> str:
    head = (f"{'d':>5} {'K':>3} {'route':>8} | {'ours ms':>8} {'peer ms':>8} {'dense ms':>9} | "
            f"{'peer/ours':>9} {'dense/ours':>10} | {'spread o/p':>11} | {'rel diff':>8}")
    lines = ["per matrix (r=16):", head, "-" * len(head)]
    for r in result["rows"]:
        lines.append(f"{r['d']:>5} {r['sites']:>3} {r['route']:>8} | {r['ours_ms']:>8.2f} {r['peer_ms']:>8.2f} "
                     f"{r['dense_ms']:>9.1f} | {r['peer_over_ours']:>8.2f}x {r['speedup']:>9.1f}x | "
                     f"{r['ours_spread']:>5.2f}/{r['peer_spread']:<5.2f} | {r['rel_max_diff']:>8.1e}")
    head = (f"{'model':<20} {'mats':>4} {'K':>3} {'route':>8} | {'ours s':>7} {'peer s':>7} {'dense s':>8} | "
            f"{'peer/ours':>9} {'dense/ours':>10} | {'spread o/p':>11}")
    lines += ["", "whole model (one aggregate() call vs the peer's loop over matrices):", head, "-" * len(head)]
    for r in result.get("models", []):
        dense_s = r.get("dense_s") or r["dense_s_est"]
        dense = (f"{dense_s:>7.2f}" + ("" if r.get("dense_s") else "*")) if dense_s else f"{'-':>8}"
        ratio = (f"{dense_s / r['ours_s']:>9.1f}x") if dense_s else f"{'-':>10}"
        lines.append(f"{r['arch']:<20} {r['n_matrices']:>4} {r['sites']:>3} {r['route']:>8} | {r['ours_s']:>7.3f} "
                     f"{r['peer_s']:>7.3f} {dense:>8} | {r['peer_over_ours']:>8.2f}x {ratio} | "
                     f"{r['ours_spread']:>5.2f}/{r['peer_spread']:<5.2f}")
    lines.append("* estimated: per-matrix dense SVD time x matrices; the rest are medians of interleaved repetitions")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Time FRA-LoRA aggregation against NVFLARE's HLoRA-style peer "
                                                 "and a dense SVD, per matrix and per model.")
    parser.add_argument("--sizes", type=int, nargs="+", default=[480, 1280, 2560], help="hidden sizes, per matrix")
    parser.add_argument("--sites", type=int, nargs="+", default=[2, 8, 32], help="numbers of sites (K)")
    parser.add_argument("--models", type=int, nargs="*", default=[480, 1280],
                        help="hidden sizes of the whole-model rows (480 = 35M, 1280 = 650M)")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank of every site and of the result")
    parser.add_argument("--reps", type=int, default=15, help="interleaved repetitions per matrix")
    parser.add_argument("--model-reps", type=int, default=5, help="interleaved repetitions per model")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(sizes=tuple(args.sizes), sites=tuple(args.sites), rank=args.rank, models=tuple(args.models),
                 reps=args.reps, model_reps=args.model_reps)
    print(format_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
