"""Server-side aggregation cost: FRA-LoRA (QR + small SVD of stacked factors) vs a dense SVD of the
averaged d x d update, per adapted matrix and for all adapted matrices of an ESM-2 model.

Both paths compute in float64 from float32 site factors. Model totals are the per-matrix time
times the number of adapted matrices (q, k, v in every layer): every matrix of a model has the
same shape, and timing all 108 dense SVDs at d=2560 would take ~10 minutes on 2 cores.

    python bench/bench_aggregation.py [--sizes 480 1280] [--sites 2 8] [--rank 16] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from fedesm.aggregation import fra_lora

# ESM-2 hidden size -> number of LoRA-adapted matrices (q, k, v x layers)
N_MATRICES = {320: 3 * 6, 480: 3 * 12, 640: 3 * 30, 1280: 3 * 33, 2560: 3 * 36}


def _timed(fn, reps: int):
    """Best of ``reps`` runs: on a shared machine the minimum is the least noisy estimate."""
    times, result = [], None
    for _ in range(reps):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return min(times), result


def _dense_refactor(factors_t: list[tuple[torch.Tensor, torch.Tensor]], weights: np.ndarray, rank: int):
    """The reference: form the dense weighted average, full SVD, keep the top ``rank`` triplets."""
    m = sum(float(w) * (b.double() @ a.double()) for w, (a, b) in zip(weights, factors_t))
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    root = s[:rank].sqrt()
    return (root[:, None] * vh[:rank]), (u[:, :rank] * root)


def run(
    sizes=(480, 1280, 2560),
    sites=(2, 8, 32),
    rank: int = 16,
    n_matrices: dict[int, int] | None = None,
    fra_reps: int = 5,
    dense_reps: int | None = None,
    seed: int = 0,
) -> list[dict]:
    """Time fra_lora against the dense SVD for each (hidden size, number of sites); one row each.

    ``dense_reps`` defaults to 3 below d=2560 and 2 from there (a float64 SVD at 2560 takes ~5 s
    on 2 cores). Times are the best of the repetitions.
    """
    n_matrices = {**N_MATRICES, **(n_matrices or {})}
    rng = np.random.default_rng(seed)
    fra_lora([(np.ones((1, 4)), np.ones((4, 1)))], [1.0], 1)  # warm up LAPACK
    torch.linalg.svd(torch.ones(4, 4, dtype=torch.float64))
    rows = []
    for d in sizes:
        if d not in n_matrices:
            raise ValueError(f"no adapted-matrix count for hidden size {d}; pass n_matrices={{{d}: ...}}")
        reps = dense_reps if dense_reps is not None else (3 if d < 2560 else 2)
        for k in sites:
            # LoRA-like scales: A ~ kaiming-ish, B small after a few local steps
            factors = [
                ((rng.standard_normal((rank, d)) / np.sqrt(d)).astype(np.float32),
                 (0.01 * rng.standard_normal((d, rank))).astype(np.float32))
                for _ in range(k)
            ]
            weights = rng.uniform(0.5, 1.5, k)
            weights /= weights.sum()
            factors_t = [(torch.from_numpy(a), torch.from_numpy(b)) for a, b in factors]

            t_fra, (a_f, b_f) = _timed(lambda: fra_lora(factors, weights, rank), fra_reps)
            t_dense, (a_d, b_d) = _timed(lambda: _dense_refactor(factors_t, weights, rank), reps)

            prod_fra = b_f.astype(np.float64) @ a_f.astype(np.float64)
            prod_dense = (b_d @ a_d).numpy()
            max_diff = float(np.max(np.abs(prod_fra - prod_dense)))
            n = n_matrices[d]
            rows.append(
                {
                    "d": d,
                    "sites": k,
                    "rank": rank,
                    "n_matrices": n,
                    "fra_ms_per_matrix": 1e3 * t_fra,
                    "dense_ms_per_matrix": 1e3 * t_dense,
                    "fra_s_model": t_fra * n,
                    "dense_s_model": t_dense * n,
                    "speedup": t_dense / t_fra,
                    "max_abs_diff": max_diff,
                    "rel_max_diff": max_diff / float(np.max(np.abs(prod_dense))),
                    "dense_matrix_mib": d * d * 8 / 2**20,
                    "dense_reps": reps,
                    "model_totals": "per-matrix time x n_matrices",
                }
            )
    return rows


def format_table(rows: list[dict]) -> str:
    header = (
        f"{'d':>5} {'K':>3} {'r':>3} {'mats':>4} | {'fra ms/mat':>10} {'dense ms/mat':>12} | "
        f"{'fra s/model':>11} {'dense s/model':>13} | {'speedup':>8} | {'max|diff|':>9} {'rel':>8}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r['d']:>5} {r['sites']:>3} {r['rank']:>3} {r['n_matrices']:>4} | "
            f"{r['fra_ms_per_matrix']:>10.2f} {r['dense_ms_per_matrix']:>12.1f} | "
            f"{r['fra_s_model']:>11.3f} {r['dense_s_model']:>13.1f} | {r['speedup']:>7.1f}x | "
            f"{r['max_abs_diff']:>9.1e} {r['rel_max_diff']:>8.1e}"
        )
    lines.append("model totals = per-matrix time x adapted matrices (q,k,v x layers); float64 math, float32 factors")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Time FRA-LoRA aggregation against a dense SVD reference.")
    parser.add_argument("--sizes", type=int, nargs="+", default=[480, 1280, 2560], help="ESM-2 hidden sizes to time")
    parser.add_argument("--sites", type=int, nargs="+", default=[2, 8, 32], help="numbers of sites (K) to time")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank of every site and of the result")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    rows = run(sizes=tuple(args.sizes), sites=tuple(args.sites), rank=args.rank)
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
