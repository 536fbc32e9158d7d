"""What the site's outbound filter (fedesm.flare.privacy) costs per round: the check of one train result.

For each architecture: the expected result built once per job from the declared model (meta device, no
weights), then `result_problem` on a result holding exactly the model's LoRA factors and head (float32,
random values) with the executor's meta, timed over repetitions; the result's size beside it.

    python bench/bench_filter.py [--archs esm2_t12_35M_UR50D,esm2_t33_650M_UR50D] [--reps 20]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import numpy as np
from nvflare.apis.dxo import DXO, DataKind

from fedesm.flare.payload import METRICS_KEY, N_SAMPLES_KEY, SITE_KEY
from fedesm.flare.privacy import ExpectedResult, result_problem
from fedesm.settings import JobSettings


def measure(arch: str, rank: int, reps: int) -> dict:
    settings = JobSettings().with_overrides({"model.arch": arch, "lora.r": rank})
    t0 = time.perf_counter()
    expected = ExpectedResult.for_job(settings, "site-1")
    build_ms = (time.perf_counter() - t0) * 1e3
    rng = np.random.default_rng(0)
    data = {k: rng.standard_normal(s).astype(np.float32) for k, s in expected.shapes.items()}
    meta = {"NUM_STEPS_CURRENT_ROUND": 50, N_SAMPLES_KEY: 140, SITE_KEY: "site-1",
            METRICS_KEY: {"auprc": 0.1, "auroc": 0.6, "f1": 0.1, "loss": 0.7}}
    times = []
    for _ in range(reps):
        shareable = DXO(DataKind.WEIGHTS, data=data, meta=dict(meta)).to_shareable()
        t0 = time.perf_counter()
        problem = result_problem(shareable, expected)
        times.append((time.perf_counter() - t0) * 1e3)
        assert problem is None, problem
    return {"arch": arch, "rank": rank, "tensors": len(data), "megabytes": sum(a.nbytes for a in data.values()) / 1e6,
            "expected_build_ms": build_ms, "check_ms_median": statistics.median(times),
            "check_ms_min": min(times), "check_ms_max": max(times), "reps": reps}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--archs", default="esm2_t6_8M_UR50D,esm2_t12_35M_UR50D,esm2_t33_650M_UR50D")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--out", default=None, help="also write the rows as JSON here")
    a = p.parse_args()
    rows = [measure(arch, a.rank, a.reps) for arch in a.archs.split(",")]
    machine = {"cpus": os.cpu_count(), "platform": platform.platform(), "load_avg": list(os.getloadavg())}
    for r in rows:
        print(f"{r['arch']:>22} r={r['rank']}: {r['tensors']} tensors, {r['megabytes']:.2f} MB; expected model built "
              f"once in {r['expected_build_ms']:.0f} ms; check per result {r['check_ms_median']:.2f} ms "
              f"(min {r['check_ms_min']:.2f}, max {r['check_ms_max']:.2f}, {r['reps']} reps)")
    print(f"machine: {machine}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"rows": rows, "machine": machine}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
