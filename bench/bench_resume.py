"""What a crash of the orchestrator costs with `federation.resume_from`: a 4-round simulator job run through,
against the same job killed (SIGKILL) half-way through round 3 and resumed from its round_002.

Side by side in one run, alternating the order (ABBA), `--reps` times:

  uninterrupted   wall time of the 4-round job
  crashed         wall time until the kill (round_002 saved, then half a round's time)
  resumed         wall time of the resumed job (rounds 3-4)
  lost            crashed + resumed - uninterrupted, in seconds and in rounds (/ the median round time)

The loss is the interrupted half round plus a second job start-up (sites load the backbone again), not
counting the operator's reaction or a network restart (see tests/integration/test_network_faults.py).

    python bench/bench_resume.py --out bench/resume.json [--reps 3] [--steps 40]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _prepare(tmp: Path, steps: int):
    from fedesm.data.split import split_records, write_split
    from fedesm.data.synth import synth_records
    from fedesm.model.checkpoint import make_random_checkpoint
    from fedesm.site_config import write_site_config

    records = synth_records(n=200, n_families=10, pos_rate=0.1, min_len=60, max_len=200, seed=5)
    write_split(split_records(records, "iid", 2, seed=5, site_val_frac=0.15), tmp / "data", overwrite=True)
    ckpt = make_random_checkpoint("esm2_t2_tiny", tmp / "esm2_t2_tiny.pt")
    cfg = write_site_config(tmp / "site.yaml", ckpt, tmp / "data")
    settings = {"model.arch": "esm2_t2_tiny", "model.backbone": str(ckpt), "lora.r": 4, "training.max_len": 200,
                "training.rounds": 4, "training.steps_per_round": steps, "federation.strategy": "fra-ef"}
    return cfg, settings


def _uninterrupted(tmp: Path, cfg: Path, settings: dict, rep: int) -> dict:
    from fedesm.launch.jobs import export_job
    from fedesm.launch.simulate import run_simulator
    from fedesm.tables import SERVER_ROW, read_table

    job = export_job("esm2_fra_lora", tmp / "jobs", settings, job_name=f"whole-{rep}")
    t0 = time.monotonic()
    out = run_simulator(job, tmp / f"ws-whole-{rep}", n_clients=2, site_config=cfg, timeout=1200)
    seconds = time.monotonic() - t0
    rounds = [r["round_seconds"] for r in read_table(out / "fedesm" / "metrics.jsonl") if r["site"] == SERVER_ROW]
    return {"seconds": seconds, "round_seconds": rounds}


def _crash_and_resume(tmp: Path, cfg: Path, settings: dict, rep: int, half_round: float) -> dict:
    from fedesm.launch.jobs import export_job
    from fedesm.launch.simulate import nvflare_command, run_simulator

    job = export_job("esm2_fra_lora", tmp / "jobs", settings, job_name=f"crash-{rep}")
    ws = tmp / f"ws-crash-{rep}"
    saved = ws / "server" / "simulate_job" / "fedesm" / "rounds" / "round_002"
    env = dict(os.environ, FEDESM_SITE_CONFIG=str(cfg))
    t0 = time.monotonic()
    with (tmp / f"crash-{rep}.log").open("w") as log:
        proc = subprocess.Popen(nvflare_command() + ["simulator", str(job), "-w", str(ws), "-n", "2", "-t", "2"],
                                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            while not saved.is_dir():
                if proc.poll() is not None:
                    raise RuntimeError(f"the simulator ended before round 2 was saved (log {log.name})")
                time.sleep(0.1)
            time.sleep(half_round)  # the crash comes half-way through round 3
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    crashed = time.monotonic() - t0
    resumed_job = export_job("esm2_fra_lora", tmp / "jobs", {**settings, "federation.resume_from": str(saved)},
                             job_name=f"resumed-{rep}")
    t1 = time.monotonic()
    run_simulator(resumed_job, tmp / f"ws-resumed-{rep}", n_clients=2, site_config=cfg, timeout=1200)
    return {"crashed_seconds": crashed, "resumed_seconds": time.monotonic() - t1}


def run(reps: int = 3, steps: int = 40) -> dict:
    with tempfile.TemporaryDirectory(prefix="fedesm-bench-resume-") as tmp:
        tmp = Path(tmp)
        cfg, settings = _prepare(tmp, steps)
        warm = _uninterrupted(tmp, cfg, settings, rep=-1)  # also gives the round time the crash waits half of
        half_round = 0.5 * statistics.median(warm["round_seconds"][1:])
        pairs = []
        for rep in range(reps):
            if rep % 2 == 0:
                whole = _uninterrupted(tmp, cfg, settings, rep)
                broken = _crash_and_resume(tmp, cfg, settings, rep, half_round)
            else:
                broken = _crash_and_resume(tmp, cfg, settings, rep, half_round)
                whole = _uninterrupted(tmp, cfg, settings, rep)
            round_s = statistics.median(whole["round_seconds"][1:])
            lost = broken["crashed_seconds"] + broken["resumed_seconds"] - whole["seconds"]
            pairs.append({"uninterrupted_seconds": whole["seconds"], **broken, "lost_seconds": lost,
                          "median_round_seconds": round_s, "lost_rounds": lost / round_s})
            print(f"rep {rep}: uninterrupted {whole['seconds']:.1f}s, crashed after {broken['crashed_seconds']:.1f}s "
                  f"+ resumed {broken['resumed_seconds']:.1f}s: lost {lost:.1f}s = {lost / round_s:.2f} rounds "
                  f"(round {round_s:.1f}s)", flush=True)
    med = {k: statistics.median(p[k] for p in pairs) for k in pairs[0]}
    spread = {k: [min(p[k] for p in pairs), max(p[k] for p in pairs)] for k in ("lost_seconds", "lost_rounds")}
    return {"settings": {"arch": "esm2_t2_tiny", "sites": 2, "rounds": 4, "steps_per_round": steps,
                         "crash": "SIGKILL half a round after round_002 was saved", "reps": reps},
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_avg": os.getloadavg()},
            "pairs": pairs, "median": med, "range": spread}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None, help="JSON file for the results")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--steps", type=int, default=40, help="local steps per round")
    args = p.parse_args()
    res = run(args.reps, args.steps)
    m, r = res["median"], res["range"]
    print(f"median over {args.reps}: lost {m['lost_seconds']:.1f}s (range {r['lost_seconds'][0]:.1f}-"
          f"{r['lost_seconds'][1]:.1f}) = {m['lost_rounds']:.2f} rounds (range {r['lost_rounds'][0]:.2f}-"
          f"{r['lost_rounds'][1]:.2f}); uninterrupted {m['uninterrupted_seconds']:.1f}s")
    if args.out:
        args.out.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
