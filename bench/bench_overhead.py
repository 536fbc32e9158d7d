"""Orchestration overhead: a round's wall time in `nvflare simulator`, split into local training and the rest.

A federated run is set up as `make demo` does it (synthetic data split over the sites, a random-init
ESM-2 checkpoint in fair-esm's format, the real `esm2_fra_lora` job exported with small settings) and
run in the simulator. The metrics table gives, per round:
  round_seconds  (server row)  ROUND_STARTED -> ROUND_DONE: task dispatch, the sites' tasks, results
                               back, aggregation, persistence
  task_seconds   (site rows)   the site's whole train task: load the global model, evaluate it, train,
                               evaluate the local model
  train_seconds  (site rows)   the optimizer steps alone (`LocalTrainer.train_steps`)
Sites run concurrently, so a round's training and task times are the slowest site's. The split is
  training | site evaluation (task - training) | orchestration (round - task): dispatch,
  serialization, transport, aggregation, persistence, metrics.
Round 1 also holds each site's one-time set-up (reading data, loading the backbone, building the model),
which falls into orchestration; the steady-state figures leave it out. The server's log further splits
orchestration into aggregation, persistence, the wait between the last site's result and the start of
aggregation, and the rest (task dispatch and pick-up by the sites, transport of the payloads).

    python bench/bench_overhead.py [--archs esm2_t2_tiny esm2_t6_8M_UR50D] [--rounds 3] [--steps 20]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from fedesm.data.split import split_records, write_split
from fedesm.data.synth import synth_records
from fedesm.site_config import write_site_config
from fedesm.launch.simulate import run_simulator
from fedesm import results
from fedesm.launch.jobs import export_job
from fedesm.tables import read_table
from fedesm.model.checkpoint import make_random_checkpoint


@dataclass
class SimSettings:
    """A small federated run: the job's knobs that matter for cost and for F1."""

    arch: str = "esm2_t2_tiny"
    sites: int = 2
    rounds: int = 3
    steps_per_round: int = 40
    batch_size: int = 8
    n_sequences: int = 400
    min_len: int = 60
    max_len: int = 300
    lr: float = 3e-3
    lora_r: int = 16
    transfer_dtype: str = "float32"
    cpu_threads: int = 1  # 2 sites share 2 cores
    seed: int = 0
    timeout: float = 1200.0

    def label(self) -> str:
        return f"{self.arch}_{self.transfer_dtype}_seed{self.seed}"


def simulate(work_dir, s: SimSettings) -> dict:
    """Run one federated simulation in `work_dir`; its metrics rows, per-round split and summary."""
    out = Path(work_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    records = synth_records(n=s.n_sequences, n_families=30, pos_rate=0.1, min_len=s.min_len, max_len=s.max_len,
                            seed=0)  # data fixed across runs; `seed` varies training only
    split = split_records(records, "iid", s.sites, val_frac=0.1, test_frac=0.1, seed=0, alpha=0.5,
                          site_val_frac=0.15)
    write_split(split, out / "data", fmt="fasta", overwrite=True)
    ckpt = make_random_checkpoint(s.arch, out / f"{s.arch}.pt", seed=0)
    site_cfg = write_site_config(out / "site_config.yaml", ckpt, out / "data", cpu_threads=s.cpu_threads)
    overrides = {"model.arch": s.arch, "model.backbone": str(ckpt), "training.rounds": s.rounds,
                 "federation.min_clients": s.sites, "training.steps_per_round": s.steps_per_round,
                 "training.batch_size": s.batch_size, "training.lr": s.lr, "lora.r": s.lora_r,
                 "training.max_len": 256, "federation.strategy": "fra", "training.seed": s.seed,
                 "federation.transfer_dtype": s.transfer_dtype}
    job = export_job("esm2_fra_lora", out / "jobs", overrides)
    result = run_simulator(job, out / "workspace", n_clients=s.sites, site_config=site_cfg,
                           log_path=out / "simulator.log", timeout=s.timeout)
    wall = time.perf_counter() - t0
    rows = read_table(results.output_dir(result) / results.METRICS)
    rounds = split_rounds(rows, log_phases(out / "simulator.log"))
    return {
        "settings": asdict(s),
        "wall_seconds": wall,
        "global_f1_round0": _mean_global(rows, "global_f1", 0),
        "global_f1_final": _mean_global(rows, "global_f1", s.rounds),
        "global_auprc_final": _mean_global(rows, "global_auprc", s.rounds),
        "sent_bytes": _per_site(rows, "sent_bytes"),
        "sent_parameters": _per_site(rows, "sent_parameters"),
        "rounds": rounds,
        "split": overhead_summary(rounds),
        "metrics_rows": rows,
    }


def _mean_global(rows: list[dict], key: str, round_num: int) -> float:
    values = [r[key] for r in rows if r.get("site") != "server" and r.get("round") == round_num
              and r.get(key) is not None]
    return sum(values) / len(values) if values else float("nan")


def _per_site(rows: list[dict], key: str) -> dict:
    """{site: value} from the first round that has it (the payload is the same every round)."""
    out = {}
    for r in sorted(rows, key=lambda r: r["round"]):
        if r.get("site") != "server" and r.get(key) is not None:
            out.setdefault(r["site"], r[key])
    return out


_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")
_PHASES = {"Start aggregation.": "agg_start", "End aggregation.": "agg_end",
           "Start persist model on server.": "persist_start", "End persist model on server.": "persist_end"}


def log_phases(log_path) -> dict[int, dict]:
    """Server-side phases per round from the simulator log (ScatterAndGather's own messages).

    Keyed like the metrics table (the log's 0-based "Round k" is row k+1): aggregation and persistence
    seconds, and the wait from the last accepted contribution to the start of aggregation. Best effort:
    a round whose messages are not all found is left out.
    """
    try:
        lines = Path(log_path).read_text(errors="replace").splitlines()
    except OSError:
        return {}
    marks: dict[int, dict] = {}
    current = None
    for line in lines:
        m = _STAMP.match(line)
        if not m:
            continue
        t = dt.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        started = re.search(r" - Round (\d+) started\.", line)
        if started:
            current = int(started.group(1))
            marks[current] = {}
        elif current is not None:
            if "ACCEPTED by the aggregator" in line:
                marks[current]["last_result"] = t
            for text, key in _PHASES.items():
                if line.endswith(" - " + text):
                    marks[current][key] = t
    out = {}
    for k, m in marks.items():
        if {"last_result", *(_PHASES.values())} <= set(m):
            out[k + 1] = {"aggregation_seconds": m["agg_end"] - m["agg_start"],
                          "persist_seconds": m["persist_end"] - m["persist_start"],
                          "result_wait_seconds": m["agg_start"] - m["last_result"]}
    return out


def split_rounds(rows: list[dict], phases: dict | None = None) -> list[dict]:
    """Per round: wall time, slowest site's training and task time, and the rest (orchestration).

    `phases` (from `log_phases`) splits orchestration further when given.
    """
    by_round: dict[int, dict] = {}
    for r in rows:
        n = r.get("round")
        entry = by_round.setdefault(n, {"round": n, "train": [], "task": []})
        if r.get("site") == "server":
            entry["round_seconds"] = r.get("round_seconds")
        else:
            if r.get("train_seconds") is not None:
                entry["train"].append(r["train_seconds"])
            if r.get("task_seconds") is not None:
                entry["task"].append(r["task_seconds"])
    out = []
    for n in sorted(by_round):
        e = by_round[n]
        if e.get("round_seconds") is None or not e["train"]:
            continue
        train = max(e["train"])
        task = max(e["task"]) if e["task"] else train
        total = e["round_seconds"]
        out.append({
            "round": n,
            "round_seconds": total,
            "train_seconds": train,
            "site_eval_seconds": task - train,
            "orchestration_seconds": total - task,
            "non_training_seconds": total - train,
            "train_fraction": train / total,
            "orchestration_fraction": (total - task) / total,
        })
        ph = (phases or {}).get(n)
        if ph:
            out[-1].update(ph)
            out[-1]["dispatch_transport_seconds"] = (total - task - ph["aggregation_seconds"]
                                                     - ph["persist_seconds"] - ph["result_wait_seconds"])
    return out


def overhead_summary(rounds: list[dict]) -> dict:
    """Medians over rounds after the first (set-up excluded), and round 1 on its own."""
    steady = [r for r in rounds if r["round"] > 1] or rounds
    med = lambda key: statistics.median(r[key] for r in steady) if steady else float("nan")  # noqa: E731
    first = rounds[0] if rounds else {}
    phases = {}
    if steady and all("aggregation_seconds" in r for r in steady):
        phases = {k: med(k) for k in ("aggregation_seconds", "persist_seconds", "result_wait_seconds",
                                      "dispatch_transport_seconds")}
    return {
        **phases,
        "rounds_used": [r["round"] for r in steady],
        "round_seconds": med("round_seconds"),
        "train_seconds": med("train_seconds"),
        "site_eval_seconds": med("site_eval_seconds"),
        "orchestration_seconds": med("orchestration_seconds"),
        "non_training_seconds": med("non_training_seconds"),
        "train_fraction": med("train_fraction"),
        "orchestration_fraction": med("orchestration_fraction"),
        "first_round_seconds": first.get("round_seconds"),
        "first_round_orchestration_seconds": first.get("orchestration_seconds"),
    }


def run(work_dir, archs=("esm2_t2_tiny", "esm2_t6_8M_UR50D"), settings: dict | None = None,
        per_arch: dict | None = None, echo=None) -> list[dict]:
    """One simulation per architecture; `per_arch[arch]` overrides `settings` for that one."""
    results = []
    for arch in archs:
        s = SimSettings(arch=arch, **{**(settings or {}), **((per_arch or {}).get(arch, {}))})
        res = simulate(Path(work_dir) / s.label(), s)
        results.append(res)
        if echo:
            echo(format_table(results[-1:], header=False))
    return results


def _num(v) -> float:
    return float("nan") if v is None else v


def format_table(results: list[dict], header: bool = True) -> str:
    head = (f"{'arch':<18} {'dtype':<7} {'steps':>5} | {'round s':>8} {'train s':>8} {'site eval s':>11} "
            f"{'orch s':>7} | {'train %':>7} {'orch %':>6} | {'round 1 s':>9} {'orch r1':>8}")
    lines = [head, "-" * len(head)] if header else []
    for res in results:
        s, x = res["settings"], res["split"]
        lines.append(
            f"{s['arch']:<18} {s['transfer_dtype']:<7} {s['steps_per_round']:>5} | {x['round_seconds']:>8.2f} "
            f"{x['train_seconds']:>8.2f} {x['site_eval_seconds']:>11.2f} {x['orchestration_seconds']:>7.2f} | "
            f"{100 * x['train_fraction']:>6.1f}% {100 * x['orchestration_fraction']:>5.1f}% | "
            f"{_num(x['first_round_seconds']):>9.2f} {_num(x['first_round_orchestration_seconds']):>8.2f}")
    if header:
        lines.append("medians over rounds 2.. (round 1 adds one-time site set-up); orch = round - slowest site's task")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Split simulator round time into local training and the rest.")
    p.add_argument("--archs", nargs="+", default=["esm2_t2_tiny", "esm2_t6_8M_UR50D"], help="architectures")
    p.add_argument("--rounds", type=int, default=3, help="federated rounds")
    p.add_argument("--steps", type=int, default=40, help="local optimizer steps per round")
    p.add_argument("--work-dir", default="bench/out/overhead", help="where the runs are set up")
    p.add_argument("--json", help="also write the results to this JSON file")
    args = p.parse_args(argv)
    results = run(args.work_dir, args.archs, {"rounds": args.rounds, "steps_per_round": args.steps})
    print(format_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{k: v for k, v in r.items() if k != "metrics_rows"} for r in results], f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
