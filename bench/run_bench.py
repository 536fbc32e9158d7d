"""`make bench`: what a federated round costs, measured in one run and written as ratios.

  throughput   residues/s of the client executor's training loop vs a plain PyTorch + PEFT loop
  peer         the site loop vs Hugging Face EsmForTokenClassification (sdpa) + PEFT LoRA + AdamW on GPSite
               batches (crops 1,000 / 512, batch 8 / 32): residues per CPU-second, padding share (bench_peer)
  eval         one pass over the demo's test split (GPSite ATP, 79 chains) in process CPU seconds, this code vs
               the code before issue 25 (ac0cb6a), interleaved worker processes; per demo round 5 passes -> 3
  attention    fused vs stock attention (and activation checkpointing) in that loop: residues/s, peak memory
  aggregation  FRA-LoRA vs NVFLARE's HLoRA-style peer and a dense SVD, per matrix and per model (bench_aggregation)
  comm         bytes per site per round: LoRA adapters + head vs the full model, fp32 and fp16
  secure       secure FRA-LoRA (masked two-pass sketch, 64- and 32-bit words) vs plain FRA-LoRA: bytes per
               site per round, seconds of the site and server maths, max |difference| (secure_bytes)
  fp16         global F1 of a simulated federated run with float32 vs float16 transfer
  overhead     a simulator round's wall time: local training vs everything else

Writes `--out` (JSON: machine, versions, threads, load average, every measurement) and a Markdown
table beside it (`results.md`), both atomically, and prints the tables. `--quick` is a ~2-3 minute
version with smaller sizes; `--only` / `--skip` pick sections.

    python bench/run_bench.py --out bench/results.json [--quick] [--only throughput comm]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # the sibling bench modules, when run as a script or imported by tests
    sys.path.insert(0, str(HERE))

import torch  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

import bench_aggregation  # noqa: E402
import bench_attention  # noqa: E402
import bench_comm  # noqa: E402
import bench_eval  # noqa: E402
import bench_overhead  # noqa: E402
import bench_peer  # noqa: E402
import bench_throughput  # noqa: E402
import secure_bytes  # noqa: E402

SECTIONS = ("throughput", "peer", "eval", "attention", "aggregation", "comm", "secure", "fp16", "overhead")

# Sizes of the full run (<= ~20 min on 2 shared cores) and of --quick (~2-3 min).
FULL = {
    # CPU rows: one thread is the steady measurement on a shared 2-core machine; the 2-thread row shows
    # the loops keep their order at torch's default on this machine.
    "throughput": {"cpu_rows": [{"arch": "esm2_t6_8M_UR50D", "threads": 1, "steps": 1, "reps": 30},
                                {"arch": "esm2_t12_35M_UR50D", "threads": 1, "steps": 1, "reps": 16},
                                {"arch": "esm2_t6_8M_UR50D", "threads": 2, "steps": 1, "reps": 30}],
                   "cuda_archs": ["esm2_t6_8M_UR50D", "esm2_t12_35M_UR50D", "esm2_t30_150M_UR50D",
                                  "esm2_t33_650M_UR50D"],
                   "settings": {"batch_size": 4, "min_len": 180, "max_len": 220, "warmup": 2},
                   "cuda_settings": {"batch_size": 8, "min_len": 800, "max_len": 1000, "steps": 5, "reps": 10,
                                     "warmup": 3}},
    # the Hugging Face peer: GPSite ATP chains, interleaved, process CPU time, one thread. 35M at 32 x 1,000:
    # the peer's padded batch (and its attention) did not fit beside other jobs in 24 GiB: left out here.
    "peer": {"rows": [("esm2_t6_8M_UR50D", bench_peer.SHAPES),
                      ("esm2_t12_35M_UR50D", ((1000, 8), (512, 8), (512, 32)))], "reps": 3,
             "left_out": ["esm2_t12_35M_UR50D crop 1,000 batch 32: the peer's padded 32 x 1,002 batch did not fit "
                          "in 24 GiB beside other jobs"]},
    # the demo's test split scored by this code and by the code before issue 25, one thread each
    "eval": {"archs": ["esm2_t2_tiny", "esm2_t6_8M_UR50D"], "reps": 3},
    # batch 2 (the second chain 75% long: padded), one optimizer step per repetition, one thread (steady
    # on a shared 2-core machine); on CUDA the paper's shape: batch 8 x 1,000 residues, bf16 autocast.
    "attention": {"cpu_rows": [{"arch": "esm2_t6_8M_UR50D", "length": 64, "reps": 15, "threads": 1},
                               {"arch": "esm2_t6_8M_UR50D", "length": 256, "reps": 9, "threads": 1},
                               {"arch": "esm2_t6_8M_UR50D", "length": 1000, "reps": 5, "threads": 1},
                               {"arch": "esm2_t12_35M_UR50D", "length": 64, "reps": 15, "threads": 1},
                               {"arch": "esm2_t12_35M_UR50D", "length": 256, "reps": 7, "threads": 1},
                               {"arch": "esm2_t12_35M_UR50D", "length": 1000, "reps": 5, "threads": 1,
                                "arms": ("stock", "fused", "fused+ckpt")}],
                  "cuda_rows": [{"arch": a, "length": 1000, "batch_size": 8, "reps": 10, "warmup": 3,
                                 "arms": ("stock", "fused", "fused+ckpt") if big else ("stock", "fused")}
                                for a, big in (("esm2_t6_8M_UR50D", False), ("esm2_t12_35M_UR50D", False),
                                               ("esm2_t30_150M_UR50D", True), ("esm2_t33_650M_UR50D", True))]},
    # one thread: LAPACK with 2 threads on a shared 2-core machine swings by 10x between repetitions
    "aggregation": {"sizes": (480, 1280, 2560), "sites": (2, 8, 32), "models": (480, 1280), "threads": 1},
    "comm": {"archs": list(bench_comm.DEFAULT_ARCHS), "measure_full_max_params": 2e8},
    # 8M, 35M, 650M shapes (hidden 320, 480, 1280) at 2, 4, 8 sites, LoRA r=16; one thread, as aggregation
    "secure": {"dims": (320, 480, 1280), "sites": (2, 4, 8), "rank": 16, "reps": 3, "masks": secure_bytes.MASKS,
               "threads": 1},
    "fp16": {"arch": "esm2_t2_tiny", "rounds": 4, "steps_per_round": 40, "noise_seed": 1},
    "overhead": {"archs": ["esm2_t2_tiny", "esm2_t6_8M_UR50D"], "rounds": 4,
                 "per_arch": {"esm2_t2_tiny": {"steps_per_round": 40},
                              "esm2_t6_8M_UR50D": {"steps_per_round": 8, "batch_size": 4, "n_sequences": 160,
                                                   "min_len": 100, "max_len": 220}}},
}
QUICK = {
    "throughput": {"cpu_rows": [{"arch": "esm2_t6_8M_UR50D", "threads": 1, "steps": 1, "reps": 6}],
                   "cuda_archs": ["esm2_t6_8M_UR50D"],
                   "settings": {"batch_size": 4, "min_len": 180, "max_len": 220, "warmup": 1},
                   "cuda_settings": {"batch_size": 8, "min_len": 400, "max_len": 500, "steps": 3, "reps": 4,
                                     "warmup": 2}},
    "peer": {"rows": [("esm2_t6_8M_UR50D", ((1000, 8), (512, 32)))], "reps": 2},
    "eval": {"archs": ["esm2_t2_tiny"], "reps": 1},
    "attention": {"cpu_rows": [{"arch": "esm2_t6_8M_UR50D", "length": 256, "reps": 3, "threads": 1}],
                  "cuda_rows": [{"arch": "esm2_t6_8M_UR50D", "length": 1000, "batch_size": 8, "reps": 4}]},
    "aggregation": {"sizes": (480, 1280), "sites": (2, 8), "models": (480,), "threads": 1, "reps": 5,
                    "model_reps": 3},
    "comm": {"archs": list(bench_comm.DEFAULT_ARCHS), "measure_full_max_params": 4e7},
    "secure": {"dims": (320,), "sites": (2, 4), "rank": 16, "reps": 2, "masks": secure_bytes.MASKS, "threads": 1},
    "fp16": {"arch": "esm2_t2_tiny", "rounds": 2, "steps_per_round": 40, "noise_seed": None},
    "overhead": {"archs": ["esm2_t2_tiny"], "rounds": 2, "per_arch": {"esm2_t2_tiny": {"steps_per_round": 40}}},
}


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def machine_info() -> dict:
    import esm
    import nvflare
    import peft

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True,
                                text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    mem_gib = None
    try:
        mem_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "host_cpu": cpu,
        "cpu_count": os.cpu_count(),
        "memory_gib": mem_gib,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "nvflare": nvflare.__version__,
        "peft": peft.__version__,
        "fair_esm": getattr(esm, "__version__", "2.0.0"),
        "git_commit": commit,
        "load_average_start": load_average(),
    }


class Bench:
    """Runs the chosen sections, keeping each one's result, timing and the load average around it."""

    def __init__(self, sizes: dict, work_dir: Path, echo=print):
        self.sizes = sizes
        self.work_dir = work_dir
        self.echo = echo
        self.results: dict = {}
        self.sims: dict = {}  # simulator runs shared between fp16 and overhead

    def section(self, name: str, fn) -> None:
        self.echo(f"\n== {name} (load average {load_average()})")
        t0 = time.perf_counter()
        load_before = load_average()
        data = fn()
        self.results[name] = {"seconds": round(time.perf_counter() - t0, 1), "load_average_before": load_before,
                              "load_average_after": load_average(), **data}

    def simulation(self, **kw) -> dict:
        """A simulator run, reused when fp16 and overhead ask for the same settings."""
        s = bench_overhead.SimSettings(**kw)
        key = json.dumps(vars(s), sort_keys=True)
        if key not in self.sims:
            self.echo(f"   simulating {s.arch}: {s.sites} sites x {s.rounds} rounds x {s.steps_per_round} steps, "
                      f"{s.transfer_dtype} transfer, seed {s.seed} ...")
            res = bench_overhead.simulate(self.work_dir / "sim" / s.label(), s)
            self.echo(f"   done in {res['wall_seconds']:.0f}s: global F1 {res['global_f1_round0']:.3f} -> "
                      f"{res['global_f1_final']:.3f}")
            self.sims[key] = res
        return self.sims[key]

    # ------------------------------------------------------------------ sections

    def throughput(self) -> dict:
        cfg = self.sizes["throughput"]
        rows = []
        for spec in cfg["cpu_rows"]:
            spec = dict(spec)
            arch = spec.pop("arch")
            rows += bench_throughput.run([arch], "cpu", settings={**cfg["settings"], **spec}, echo=self.echo)
        rows += bench_throughput.run([], cuda_archs=cfg["cuda_archs"], cuda_settings=cfg["cuda_settings"],
                                     echo=self.echo)
        return {"rows": rows, "table": bench_throughput.format_table(rows),
                "min_ratio": bench_throughput.MIN_RATIO,
                "all_ok": all(r.get("ok", True) for r in rows)}

    def peer(self) -> dict:
        cfg = self.sizes["peer"]
        rows = [row for arch, shapes in cfg["rows"]
                for row in bench_peer.run([arch], tuple(tuple(x) for x in shapes), reps=cfg["reps"], echo=self.echo)]
        table = bench_peer.format_table(rows)
        self.echo(table)
        return {"rows": rows, "table": table, "target_ratio": bench_peer.TARGET_RATIO,
                "min_ratio": bench_peer.MIN_RATIO, "all_ok": all(r["ok"] for r in rows),
                "left_out": list(cfg.get("left_out", ()))}

    def eval(self) -> dict:
        cfg = self.sizes["eval"]
        rows = bench_eval.run(cfg["archs"], cfg["reps"], cfg.get("baseline", bench_eval.BASELINE),
                              chains=cfg.get("chains", 0), echo=self.echo)
        table = bench_eval.format_table(rows)
        self.echo(table)
        return {"rows": rows, "table": table, "target_round_ratio": bench_eval.TARGET_ROUND_RATIO,
                "passes_per_round": bench_eval.PASSES_PER_ROUND, "all_ok": all(r["ok"] for r in rows)}

    def attention(self) -> dict:
        cfg = self.sizes["attention"]
        rows = bench_attention.run(cfg.get("cpu_rows", ()), cfg.get("cuda_rows", ()), echo=self.echo)
        return {"rows": rows, "table": bench_attention.format_table(rows)}

    def aggregation(self) -> dict:
        cfg = dict(self.sizes["aggregation"])
        threads = cfg.pop("threads", None)
        before = torch.get_num_threads()
        if threads:
            torch.set_num_threads(threads)
        try:
            result = bench_aggregation.run(rank=16, **cfg)
        finally:
            torch.set_num_threads(before)
        table = bench_aggregation.format_table(result)
        self.echo(table)
        return {**result, "threads": threads or before, "table": table}

    def comm(self) -> dict:
        cfg = self.sizes["comm"]
        rows = bench_comm.run(cfg["archs"], 16, cfg["measure_full_max_params"])
        table = bench_comm.format_table(rows)
        self.echo(table)
        return {"rows": rows, "table": table, "measure_full_max_params": cfg["measure_full_max_params"]}

    def secure(self) -> dict:
        cfg = dict(self.sizes["secure"])
        threads = cfg.pop("threads", None)
        before = torch.get_num_threads()
        if threads:
            torch.set_num_threads(threads)
        try:
            with threadpool_limits(threads):  # numpy's BLAS too: the sketch's products and the server's QR
                rows = secure_bytes.run(echo=self.echo, **cfg)
        finally:
            torch.set_num_threads(before)
        table = secure_bytes.format_table(rows)
        self.echo(table)
        return {"rows": rows, "table": table, "threads": threads or before, "key_bytes": secure_bytes.KEY_BYTES}

    def fp16(self) -> dict:
        cfg = self.sizes["fp16"]
        common = {"arch": cfg["arch"], "rounds": cfg["rounds"], "steps_per_round": cfg["steps_per_round"]}
        fp32 = self.simulation(**common, transfer_dtype="float32")
        fp16 = self.simulation(**common, transfer_dtype="float16")
        noise = None
        if cfg.get("noise_seed") is not None:
            noise = self.simulation(**common, transfer_dtype="float32", seed=cfg["noise_seed"])
        comparison = bench_comm.fp16_comparison(fp32, fp16, noise)
        text = bench_comm.format_fp16(comparison)
        self.echo(text)
        return {"comparison": comparison, "text": text,
                "runs": {k: _brief(v) for k, v in (("fp32", fp32), ("fp16", fp16), ("fp32_other_seed", noise)) if v}}

    def overhead(self) -> dict:
        cfg = self.sizes["overhead"]
        results = []
        for arch in cfg["archs"]:
            # same settings as the fp16 check's float32 run: that run is reused, not repeated
            kw = {"arch": arch, "rounds": cfg["rounds"], **cfg["per_arch"].get(arch, {})}
            results.append(self.simulation(**kw))
        table = bench_overhead.format_table(results)
        self.echo(table)
        return {"runs": [_brief(r) for r in results], "table": table}


def _brief(run: dict) -> dict:
    """A simulator run without its raw metrics rows (kept short in results.json)."""
    return {k: v for k, v in run.items() if k != "metrics_rows"}


def merge_documents(old: dict, new: dict) -> dict:
    """``old`` with the sections ``new`` ran replaced; each section keeps the machine and date it was measured on."""
    runs = dict(old.get("section_runs") or {s: _run_info(old) for s in old.get("sections", [])})
    runs.update({s: _run_info(new) for s in new["sections"]})
    merged = dict(old)
    merged["results"] = {**old.get("results", {}), **new["results"]}
    merged["sections"] = [s for s in SECTIONS if s in merged["results"]]
    merged["section_runs"] = {s: runs[s] for s in merged["sections"] if s in runs}
    return merged


def _run_info(doc: dict) -> dict:
    m = doc["machine"]
    return {"date": m["date"], "git_commit": m["git_commit"], "quick": doc.get("quick", False),
            "torch_threads": m["torch_threads"], "cuda": m["cuda"], "load_average_start": m["load_average_start"],
            "total_seconds": doc.get("total_seconds")}


# ---------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------


def to_markdown(doc: dict) -> str:
    m = doc["machine"]
    out = [
        "# fedesm benchmark results",
        "",
        f"Written by `bench/run_bench.py{' --quick' if doc['quick'] else ''}` on {m['date']} "
        f"(commit {m['git_commit'] or '?'}), {doc['total_seconds']:.0f} s in all.",
        "",
        f"Machine: {m['host_cpu']}, {m['cpu_count']} cores, {m['memory_gib']} GiB; {m['platform']}; "
        f"GPU: {m['cuda'] or 'none'}. Python {m['python']}, torch {m['torch']} ({m['torch_threads']} threads), "
        f"NVFLARE {m['nvflare']}, PEFT {m['peft']}, fair-esm {m['fair_esm']}.",
        f"Load average (1, 5, 15 min) at start {m['load_average_start']}, at end {doc['load_average_end']}: "
        "the machine was shared with other jobs, so absolute times are pessimistic; ratios are what to read.",
        "",
    ]
    runs = doc.get("section_runs") or {}
    later = {s: x for s, x in runs.items() if x["date"] != m["date"]}
    if later:
        out += ["Merged results (`--merge`): " + "; ".join(
            f"section {s} re-measured on {x['date']} (commit {x['git_commit'] or '?'}, {x['torch_threads']} torch "
            f"threads, GPU {x['cuda'] or 'none'}, load average at start {x['load_average_start']}, "
            f"{x['total_seconds']:.0f} s for the run)" for s, x in later.items())
            + "; every other section is from the run above.", ""]
    r = doc["results"]
    if "throughput" in r:
        t = r["throughput"]
        out += ["## 1. Local training throughput (residues/s): client executor loop vs plain PyTorch + PEFT", "",
                "`LocalTrainer.train_steps` (what every site runs) against a hand-written loop on the same "
                "random-init ESM-2 weights, batches (same crops and lengths), LoRA r=16 on q,k,v, AdamW and loss. "
                "The plain loop uses fair-esm's `ESM2.forward(repr_layers=[last])` and gets its batches ready-made; "
                "ours samples, clips gradients and steps the schedule inside the timed region. Repetitions "
                "interleaved (ours, plain, plain, ours, ...), warm-up excluded; ratio = median ours / median plain "
                "residues/s, wall clock (`pairs` = median of per-pair ratios; CPU-time ratio = the same on "
                "process CPU time, which leaves out time spent waiting for a core; spread = (max-min)/median of "
                "the wall-clock repetitions). Single-threaded rows are the steady ones on a shared machine. "
                f"Requirement: ratio >= {t['min_ratio']}.", "",
                _md_table(["arch", "device", "precision", "threads", "batch", "reps x steps", "ours res/s",
                           "plain res/s", "ratio", "pairs", "CPU-time ratio", "spread ours/plain",
                           "peak MiB ours/plain", "load"],
                          [_throughput_cells(row, t) for row in t["rows"]]), ""]
    if "peer" in r:
        out += ["## 1a. Site training vs the Hugging Face peer (residues per CPU-second, 1 thread)", "",
                "`LocalTrainer.train_steps` (default `model.attention: packed`) against "
                "`EsmForTokenClassification(attn_implementation=\"sdpa\")` + PEFT LoRA (query, key, value; r=16; "
                "classifier trained) + AdamW, on the same batches of GPSite ATP training chains cropped at "
                "`crop`, random-init weights of the same shapes. Interleaved (ABBA) after a warm-up step; "
                "ratio = median fedesm / median peer residues per process CPU-second. padding = the share of "
                "the padded batch's tokens that are padding (what the peer computes for nothing). "
                f"Target: >= {r['peer']['target_ratio']} at crop 1,000 batch 8, >= {r['peer']['min_ratio']} "
                f"at every shape. Load average before / after the section: {r['peer'].get('load_average_before')} / "
                f"{r['peer'].get('load_average_after')}.", "", r["peer"]["table"], ""]
        out += [f"Left out: {x}." for x in r["peer"].get("left_out", [])] + ([""] if r["peer"].get("left_out") else [])
    if "attention" in r:
        out += _attention_markdown(r["attention"])
    if "eval" in r:
        e = r["eval"]
        base = e["rows"][0]["baseline"] if e["rows"] else bench_eval.BASELINE
        out += ["## 1c. Scoring the demo's test split: this code vs the code before issue 25", "",
                "From `bench/bench_eval.py`: one pass of `predict_proba` over the GPSite ATP test split (79 chains, "
                "`max_len` 512, long chains tiled), LoRA r=8 as the demo, random-init weights of the named shape "
                f"(one checkpoint read by both), each code base's default attention; the code of {base} runs from "
                "`git archive` in a worker process beside one running this tree, passes alternate (ABBA) after a "
                "warm-up pass each, process CPU seconds, 1 thread, medians. Per demo round the test split was scored "
                f"{e['passes_per_round']['baseline']} times before issue 25 (each site: the global model and its own; "
                f"the demo: the global model) and {e['passes_per_round']['current']} times since "
                "(`federation.evaluate_global_test: false` in the demo). max prob diff = the largest |difference| "
                f"between the two code bases' probabilities. Target: round ratio >= {e['target_round_ratio']:g} at "
                "equal numbers. What changed since ac0cb6a: packed batches (no compute on padding), fair-esm's "
                "erf GELU as one fused kernel, equal-length windows in one attention call, and 3 passes a round "
                f"instead of 5. Load average before / after the section: {e.get('load_average_before')} / "
                f"{e.get('load_average_after')}.", "", e["table"], ""]
    if "aggregation" in r:
        a = r["aggregation"]
        out += ["## 2. FRA-LoRA aggregation vs NVFLARE's HLoRA-style peer and a dense SVD (server, per round)", "",
                "From `bench/bench_aggregation.py`, all in one process on "
                f"{a.get('threads', '?')} torch thread(s): K sites' rank-16 factors (numpy float32, LoRA-like "
                "scales) merged to rank 16. Ours = `fra_lora` (one matrix) and `aggregate(..., 'fra')` (a whole "
                "model: every adapted matrix, pairs of one shape in batched calls), float32, route picked by shape "
                "(`factored`: QR of the stacked A, eigen-decomposition of the small Gram; `dense`: the d x d average, "
                "when K*r >= 0.9 d). Peer = the HLoRA-style merge of NVFLARE's MedGemma example, re-implemented in "
                "the bench (torch float32, `linalg.qr` of both stacks + SVD of the core, S into A, one call per "
                "matrix, a Python loop for a model; given ready-made torch tensors). Dense = the float32 d x d "
                "average + full SVD. Medians of interleaved repetitions (ours, peer, peer, ours, ...); peer/ours > 1 "
                "means ours is faster. rel diff = max |B A - reference| / max |reference| against a float64 dense "
                "SVD.", "",
                "Per adapted matrix (d x d):", "",
                _md_table(["d", "sites", "route", "ours ms", "peer ms", "dense ms", "peer / ours",
                           "dense / ours", "spread ours / peer", "reps", "rel diff ours", "rel diff peer"],
                          [[x["d"], x["sites"], x["route"], f"{x['ours_ms']:.2f}", f"{x['peer_ms']:.2f}",
                            f"{x['dense_ms']:.1f}", f"**{x['peer_over_ours']:.2f}x**", f"{x['speedup']:.1f}x",
                            f"{x['ours_spread']:.2f} / {x['peer_spread']:.2f}", x["reps"],
                            f"{x['rel_max_diff']:.1e}", f"{x['peer_rel_max_diff']:.1e}"] for x in a["rows"]]), ""]
        if a.get("models"):
            out += ["Whole model (all q, k, v LoRA pairs of the architecture + the head; ours = one `aggregate` "
                    "call on the sites' numpy state dicts, peer = its per-matrix merge in a loop over the same "
                    "matrices; ours CPU s = process CPU time of the same calls, which leaves out waiting for a core "
                    "on a loaded machine; dense = a float32 d x d SVD per matrix, in the same interleaved loop up "
                    "to d = 640, above that per-matrix time x matrices, marked est.):", "",
                    _md_table(["model", "matrices", "sites", "route", "ours s", "ours CPU s", "peer s", "peer / ours",
                               "dense s", "dense / ours", "spread ours / peer", "reps"],
                              [[x["arch"], x["n_matrices"], x["sites"], x["route"], f"{x['ours_s']:.3f}",
                                _fmt(x.get("cpu_s", {}).get("ours"), 3),
                                f"{x['peer_s']:.3f}", f"**{x['peer_over_ours']:.2f}x**",
                                _fmt(x.get("dense_s"), 2) if x.get("dense_s") else
                                _fmt(x.get("dense_s_est"), 2) + " est.",
                                f"{(x.get('dense_s') or x.get('dense_s_est') or 0) / x['ours_s']:.1f}x",
                                f"{x['ours_spread']:.2f} / {x['peer_spread']:.2f}", x["reps"]]
                               for x in a["models"]]), ""]
    if "comm" in r:
        c = r["comm"]
        out += ["## 3. Communication per site per round", "",
                "Serialized size as NVFLARE sends it (`shareable_nbytes(make_weights_shareable(...))`, fobs). "
                "Sent = the "
                "site's LoRA adapters + head with the executor's metrics meta; received = the global adapters + head "
                "(float32, as ScatterAndGather's train task). Full = the whole fair-esm state dict + head in float32, "
                "both ways (what full-model FedAvg exchanges). Full sizes are serialized for real up to "
                f"{c['measure_full_max_params'] / 1e6:.0f}M parameters (on zero arrays of the right shapes: values "
                "do not change the size) and computed above that (parameters x 4 bytes + the per-tensor framing "
                "measured on a skeleton of the same tensors); on the measured models the computation is "
                f"{_max_pred_error(c['rows'])}. MB = 10^6 bytes.", "",
                _md_table(["arch", "LoRA + head params", "full params", "sent fp32 MB", "sent fp16 MB", "received MB",
                           "full MB (each way)", "full size", "sent fp32 / full", "sent fp16 / full",
                           "round (sent+recv) / full"],
                          [[x["arch"], f"{x['lora_parameters']:,}", f"{x['full_parameters']:,}",
                            f"{x['lora_sent_fp32'] / 1e6:.3f}", f"{x['lora_sent_fp16'] / 1e6:.3f}",
                            f"{x['lora_received'] / 1e6:.3f}", f"{x['full_sent_fp32'] / 1e6:.1f}",
                            x["full_how"].split(" (")[0], f"{100 * x['ratio_sent_fp32']:.2f}%",
                            f"{100 * x['ratio_sent_fp16']:.2f}%", f"{100 * x['ratio_round_fp32']:.2f}%"]
                           for x in c["rows"]]), ""]
        out += _comm_cross_check(c, r.get("overhead"))
    if "secure" in r:
        out += _secure_markdown(r["secure"])
    if "fp16" in r:
        f = r["fp16"]["comparison"]
        rows = [["float32", f"{f['f1_fp32']:.4f}", "", f"{f['auprc_fp32']:.4f}", "", f"{f['sent_bytes_fp32']:,}"],
                ["float16", f"{f['f1_fp16']:.4f}", f"{f['f1_difference']:+.4f}", f"{f['auprc_fp16']:.4f}",
                 f"{f['auprc_difference']:+.4f}", f"{f['sent_bytes_fp16']:,}"]]
        if "seed_noise" in f:
            rows.append(["float32, another seed (noise)", f"{f['f1_fp32_other_seed']:.4f}",
                         f"{f['seed_noise']:+.4f}", f"{f['auprc_fp32_other_seed']:.4f}",
                         f"{f['auprc_seed_noise']:+.4f}", f"{f['sent_bytes_fp32']:,}"])
        out += ["## 3b. float16 transfer and F1", "",
                f"`transfer_dtype` in the job's client config; a demo-style simulator run ({f['arch']}, "
                f"{f['sites']} sites, {f['rounds']} rounds x {f['steps_per_round']} steps, synthetic data, FRA-LoRA), "
                "once per setting, same seed. F1 = the global model after the last round on each site's validation "
                f"split, mean over sites (round 0: {f['global_f1_round0']:.3f}). Bytes = `sent_bytes` per site per "
                "round from the run's own metrics table.", "",
                _md_table(["transfer", "global F1", "difference vs float32", "global AUPRC",
                           "difference vs float32", "bytes sent per site per round"], rows), ""]
        if "within_noise" in f:
            out += [f"float16 difference within run-to-run noise: **{f['within_noise']}**.", ""]
    if "overhead" in r:
        o = r["overhead"]
        out += ["## 4. Orchestration overhead per round (nvflare simulator)", "",
                "From the run's metrics table: `round_seconds` (server row: ROUND_STARTED to ROUND_DONE) and, per "
                "site, `task_seconds` (the whole train task) and `train_seconds` (optimizer steps only); sites run "
                "concurrently, so a round's training/task time is the slowest site's. Orchestration = round - task: "
                "task dispatch, serialization, transport, aggregation, persistence. Site evaluation (global and local "
                "model on the validation split, every round) is shown on its own. 2 sites on 2 cores, "
                "`cpu_threads: 1` each. Medians over rounds 2+; round 1 also holds each site's one-time set-up.", ""]
        rows = []
        for run in o["runs"]:
            s, x = run["settings"], run["split"]
            rows.append([s["arch"], f"{s['steps_per_round']} x batch {s['batch_size']}",
                         f"{x['round_seconds']:.2f}", f"{x['train_seconds']:.2f}", f"{x['site_eval_seconds']:.2f}",
                         f"{x['orchestration_seconds']:.2f}", f"{100 * x['train_fraction']:.1f}%",
                         f"{100 * x['orchestration_fraction']:.1f}%", f"{x['first_round_seconds']:.1f}",
                         f"{x['first_round_orchestration_seconds']:.1f}"])
        out += [_md_table(["arch", "steps/round", "round s", "training s", "site eval s", "orchestration s",
                           "training %", "orchestration %", "round 1 s", "round 1 orchestration s"], rows), ""]
        phases = [[run["settings"]["arch"], f"{run['split']['orchestration_seconds']:.3f}",
                   f"{run['split']['aggregation_seconds']:.3f}", f"{run['split']['persist_seconds']:.3f}",
                   f"{run['split']['result_wait_seconds']:.3f}", f"{run['split']['dispatch_transport_seconds']:.3f}"]
                  for run in o["runs"] if "aggregation_seconds" in run["split"]]
        if phases:
            out += ["Orchestration split with the server's log (ScatterAndGather's own messages; medians over "
                    "rounds 2+): aggregation (FRA-LoRA) and persistence (PEFT-layout save, best model), the wait "
                    "from the last site's result to the start of aggregation (the workflow's polling), and the "
                    "rest: task dispatch, the sites' task pick-up and payload transport. In the simulator a site "
                    "asks for its next task only after the fetch interval the server sent with the last one "
                    "(the log's `interval: 2`), so the rest is mostly that wait, the same for every model size.", "",
                    _md_table(["arch", "orchestration s", "aggregation s", "persistence s", "result wait s",
                               "dispatch, pick-up, transport s"], phases), ""]
        per_round = []
        for run in o["runs"]:
            for x in run["rounds"]:
                per_round.append([run["settings"]["arch"], x["round"], f"{x['round_seconds']:.2f}",
                                  f"{x['train_seconds']:.2f}", f"{x['site_eval_seconds']:.2f}",
                                  f"{x['orchestration_seconds']:.2f}", _fmt(x.get("aggregation_seconds"), 3),
                                  _fmt(x.get("dispatch_transport_seconds"), 2)])
        out += ["Per round:", "", _md_table(["arch", "round", "round s", "training s", "site eval s",
                                             "orchestration s", "aggregation s", "dispatch, pick-up, transport s"],
                                            per_round), ""]
    return "\n".join(out)


def _attention_markdown(att: dict) -> list[str]:
    rows = []
    for x in att["rows"]:
        if "skipped" in x:
            rows.append([x["arch"], x["device"], x.get("length") or "", "skipped: " + x["skipped"]] + [""] * 8)
            continue
        for arm in x["arms"]:
            mem = x.get("memory", {}).get(arm, {}).get("peak_above_resident_mib")
            rows.append([x["arch"], x["device"], x["length"], f"{x['batch_size']} ({x['residues_per_batch']} res.)",
                         x["precision"], x["threads"], arm, f"{x['residues_per_s'][arm]:.1f}",
                         f"**{x['ratio_vs_stock'][arm]:.2f}x**" if arm in x.get("ratio_vs_stock", {}) else "-",
                         f"{x['spread'][arm]:.2f}", _fmt(mem, 0),
                         f"**{x['memory_ratio_vs_stock'][arm]:.2f}x**" if arm in x.get("memory_ratio_vs_stock", {})
                         else "-"])
    return ["## 1b. Fused vs stock attention, and activation checkpointing (site training)", "",
            "From `bench/bench_attention.py`: one `LocalTrainer` per arm on separate copies of the same random-init "
            "weights (LoRA r=16 on q,k,v), all fed one fixed batch (the last chain 75% long, so padded). `stock` = "
            "fair-esm's attention (explicit fp32 softmax over every head's L x L weights), `fused` = "
            "`scaled_dot_product_attention` (the default, `model.attention`), `fused+ckpt` = fused with "
            "`training.activation_checkpointing`. One optimizer step per repetition, repetitions interleaved (order "
            "reversed every other one); residues/s = labelled residues / wall seconds, medians; x stock = arm / "
            "stock. Peak memory: CUDA `max_memory_allocated` above what was resident; CPU the peak resident set "
            "size of the arm's steps in a fresh process above what was resident before them (VmHWM - VmRSS). "
            "Every arm's logits on the batch were compared before timing: max |difference| vs stock "
            + ", ".join(f"{x['arch']}/{x['length']}: {x['max_abs_logit_diff_vs_stock']:.1e}" for x in att["rows"]
                        if x.get("max_abs_logit_diff_vs_stock") is not None) + ".", "",
            _md_table(["arch", "device", "length", "batch", "precision", "threads", "arm", "residues/s", "x stock",
                       "spread", "peak MiB", "memory x stock"], rows), ""]


def _secure_markdown(sec: dict) -> list[str]:
    return ["## 3a. Secure aggregation (masked two-pass FRA-LoRA) vs plain FRA-LoRA, per round", "",
            "From `bench/secure_bytes.py`, shapes only (no model): q, k, v adapted in every layer at LoRA r=16, a "
            "d -> 2 head; random factors; equal site weights. Bytes per site per round, counted: plain up = the "
            "site's adapters + head as float32 arrays (raw bytes, no NVFLARE framing); secure up = its signed "
            f"key (counted as {sec['key_bytes']} bytes: X25519 key, RSA-2048 signature, kit certificate) + the "
            "pass-1 (d x s per matrix, the head) and pass-2 (s x d per matrix) masked messages, each with its "
            "check word, in 64- or 32-bit words; down (in the ratio `round bytes x`) adds every site's key, the "
            "float64 bases Q and the global model. The messages the timed round made have exactly these "
            "sizes (`secure_up_measured_bytes` in the JSON; the key there is its real length). s = the sketch "
            "width min(d, K r + 8). The server receives K x up. Seconds, on "
            f"{sec['threads']} thread(s), in one process: plain = `aggregate(..., 'fra')` (the server's whole "
            "merge); site = one site's key pair and signature, key agreement (K - 1 X25519 agreements and "
            "certificate checks) and its two masked messages (sketch products and 2 (K - 1) AES-CTR mask "
            "streams), mean over the K sites; server = the two unmasked sums, the bases and the re-factoring. "
            "Sites work in parallel in a federation, so a round adds about one site's part + the server's; "
            "`all sites + server` is the CPU the whole federation spends. Mask words: 64-bit (32 fractional "
            "bits); 32-bit at the default public bound 64 on a site's |value| (`masking.BOUND_32`: 31 - "
            "ceil(log2 K) - 6 fractional bits); 32-bit at bound 4 (4 bits more, the same bytes). Repetitions "
            "interleaved (plain, then the mask arms, their order reversed every other repetition), medians. "
            "max abs diff = the largest "
            "|secure - plain| over the global model's tensors (factors and head); update rel diff = the largest "
            "max |B A - B' A'| / max |B' A'| over the adapted matrices (the update the model applies). Both come "
            "from the fixed-point rounding (2^-32 per value with 64-bit words; with 32-bit words at bound 64 "
            "2^-24 at 2 sites, 2^-22 at 8), the sketch's round-off and plain FRA's own float32 arithmetic (the "
            "secure server computes in float64); random factors give the merged update a flat spectrum (about 1% between the 16th and 17th "
            "singular values), where the rank-16 cut turns a small error in the sums into a larger rotation of "
            "the factors.",
            "", sec["table"], ""]


def _fmt(v, digits: int) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _comm_cross_check(comm: dict, overhead: dict | None) -> list[str]:
    """The simulator runs' own `sent_bytes` beside this table's value for the same architecture."""
    lines = []
    by_arch = {x["arch"]: x for x in comm["rows"]}
    for run in (overhead or {}).get("runs", []):
        arch, sent = run["settings"]["arch"], run["sent_bytes"]
        if arch in by_arch and sent and run["settings"]["lora_r"] == by_arch[arch]["lora_r"]:
            measured = max(sent.values())
            ours = by_arch[arch]["lora_sent_fp32"]
            lines += [f"Cross-check: in the {arch} simulator run (section 4) each site sent {measured:,} bytes "
                      "per round "
                      f"(the server's `sent_bytes`, with NVFLARE's own headers); this table says {ours:,} "
                      f"({100 * (measured - ours) / ours:+.2f}%).", ""]
    return lines


def _throughput_cells(row: dict, t: dict) -> list:
    if "skipped" in row:
        return [row["arch"], row["device"], "skipped: " + row["skipped"]] + [""] * 11
    mem = row.get("memory")
    return [row["arch"], row["device"], row["precision"], row["threads"],
            f"{row['batch_size']} x {row['residues_per_batch_mean'] / row['batch_size']:.0f}",
            f"{row['reps']} x {row['steps_per_rep']}", f"{row['ours_median']:.1f}", f"{row['plain_median']:.1f}",
            f"**{row['ratio']:.3f}**", f"{row['median_pair_ratio']:.3f}", bench_throughput._cpu_ratio(row),
            f"{row['ours_spread']:.2f} / {row['plain_spread']:.2f}",
            f"{mem['ours']['peak_mib']:.0f} / {mem['plain']['peak_mib']:.0f}" if mem else "-",
            str(row.get("load_average", t.get("load_average_before", "")))]


def _max_pred_error(rows: list[dict]) -> str:
    errs = [abs(e["predicted_error"]) for x in rows for e in x["full"].values() if "predicted_error" in e]
    if not errs:
        return "not checked (no model measured)"
    return "exact, to the byte" if max(errs) == 0 else f"off by at most {max(errs):.1e} (relative)"


def _md_table(head: list, rows: list[list]) -> str:
    lines = ["| " + " | ".join(map(str, head)) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(lines)


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; results are for everyone to read
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------------------------


def run_all(sections=SECTIONS, quick: bool = False, work_dir=None, sizes: dict | None = None, echo=print) -> dict:
    """Run `sections` (in the canonical order) and return the results document."""
    sizes = sizes or (QUICK if quick else FULL)
    t0 = time.perf_counter()
    doc = {"quick": quick, "sections": [s for s in SECTIONS if s in sections], "machine": machine_info()}
    own_dir = work_dir is None
    work = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="fedesm_bench_"))
    try:
        bench = Bench(sizes, work, echo)
        for name in doc["sections"]:
            bench.section(name, getattr(bench, name))
    finally:
        if own_dir:
            shutil.rmtree(work, ignore_errors=True)
    doc["results"] = bench.results
    doc["load_average_end"] = load_average()
    doc["total_seconds"] = round(time.perf_counter() - t0, 1)
    return doc


def summary_lines(doc: dict) -> list[str]:
    """The headline numbers, one line each."""
    r, lines = doc["results"], []
    for row in r.get("peer", {}).get("rows", []):
        lines.append(f"peer {row['arch']} crop {row['crop']} batch {row['batch_size']}: fedesm/HF = "
                     f"{row['ratio']:.2f}x per CPU-second (padding {100 * row['padding_share']:.0f}%)")
    for row in r.get("eval", {}).get("rows", []):
        lines.append(f"eval {row['arch']} (demo test split): pass {row['pass_ratio']:.2f}x, per round "
                     f"{row['round_ratio']:.2f}x cheaper than {row['baseline']}, probabilities within "
                     f"{row['max_abs_prob_diff']:.1e}")
    for row in r.get("throughput", {}).get("rows", []):
        if "skipped" not in row:
            cpu = f", CPU time {row['cpu_time_ratio']:.3f}" if row["device"] == "cpu" else ""
            lines.append(f"throughput {row['arch']} ({row['device']}, {row['threads']} thread(s)): ours/plain = "
                         f"{row['ratio']:.3f}{cpu} ({'ok' if row['ok'] else 'BELOW ' + str(row['min_ratio'])})")
    for row in r.get("attention", {}).get("rows", []):
        if "skipped" not in row:
            mem = row.get("memory_ratio_vs_stock", {})
            lines.append(f"attention {row['arch']} {row['device']} {row['length']} residues: " + ", ".join(
                f"{arm} {ratio:.2f}x stock residues/s" + (f", {mem[arm]:.2f}x memory" if arm in mem else "")
                for arm, ratio in row.get("ratio_vs_stock", {}).items()))
    for row in r.get("aggregation", {}).get("rows", []):
        lines.append(f"aggregation d={row['d']} K={row['sites']} ({row['route']}): {row['ours_ms']:.2f} ms per matrix, "
                     f"peer/ours {row['peer_over_ours']:.2f}x, dense/ours {row['speedup']:.1f}x, "
                     f"rel diff {row['rel_max_diff']:.1e}")
    for row in r.get("aggregation", {}).get("models", []):
        lines.append(f"aggregation {row['arch']} K={row['sites']}: whole model {row['ours_s']:.3f} s, "
                     f"peer's loop {row['peer_s']:.3f} s (peer/ours {row['peer_over_ours']:.2f}x)")
    for row in r.get("comm", {}).get("rows", []):
        lines.append(f"comm {row['arch']}: sends {row['lora_sent_fp32'] / 1e6:.3f} MB fp32 / "
                     f"{row['lora_sent_fp16'] / 1e6:.3f} MB fp16 vs {row['full_sent_fp32'] / 1e6:.1f} MB full "
                     f"= {100 * row['ratio_sent_fp32']:.2f}% / {100 * row['ratio_sent_fp16']:.2f}%")
    for row in r.get("secure", {}).get("rows", []):
        label = secure_bytes.mask_label(row["word_bits"], row.get("bound"))
        lines.append(f"secure {row['arch']} K={row['sites']} {label}: up "
                     f"{row['secure_up_bytes'] / 2**20:.2f} MiB = {row['up_ratio']:.1f}x plain; site "
                     f"{row['secure_site_s']:.3f}s ({row['site_over_plain']:.1f}x plain FRA's {row['plain_s']:.3f}s), "
                     f"server {row['secure_server_s']:.3f}s ({row['server_over_plain']:.1f}x); "
                     f"max |diff| {row['max_abs_diff']:.1e}, update rel diff {row['max_update_rel_diff']:.1e}")
    if "fp16" in r:
        c = r["fp16"]["comparison"]
        lines.append(f"fp16 transfer: F1 {c['f1_fp16']:.4f} vs fp32 {c['f1_fp32']:.4f} ({c['f1_difference']:+.4f}"
                     + (f"; seed noise {c['seed_noise']:+.4f}" if "seed_noise" in c else "")
                     + f"), AUPRC {c['auprc_difference']:+.4f}; sent bytes x{c['sent_bytes_ratio']:.3f}")
    for run in r.get("overhead", {}).get("runs", []):
        x = run["split"]
        detail = ""
        if "aggregation_seconds" in x:
            detail = (f": aggregation {x['aggregation_seconds']:.3f}s, persistence {x['persist_seconds']:.3f}s, "
                      f"result wait {x['result_wait_seconds']:.2f}s, dispatch/pick-up/transport "
                      f"{x['dispatch_transport_seconds']:.2f}s")
        lines.append(f"overhead {run['settings']['arch']}: round {x['round_seconds']:.2f}s = training "
                     f"{x['train_seconds']:.2f}s + site eval {x['site_eval_seconds']:.2f}s + orchestration "
                     f"{x['orchestration_seconds']:.2f}s ({100 * x['orchestration_fraction']:.1f}%){detail}")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="fedesm benchmarks: training throughput, aggregation cost, "
                                            "communication volume and orchestration overhead, as ratios.")
    p.add_argument("--out", default=str(HERE / "results.json"), help="results JSON (a .md table is written beside)")
    p.add_argument("--md", help="Markdown tables path (default: --out with .md)")
    p.add_argument("--quick", action="store_true", help="smaller sizes, ~2-3 minutes")
    p.add_argument("--only", nargs="+", choices=SECTIONS, help="run only these sections")
    p.add_argument("--skip", nargs="+", choices=SECTIONS, default=[], help="leave these sections out")
    p.add_argument("--work-dir", help="keep simulator runs here (default: a temporary folder, removed after)")
    p.add_argument("--threads", type=int, help="torch CPU threads for the in-process sections (default: torch's)")
    p.add_argument("--merge", action="store_true",
                   help="keep the other sections of an existing --out and replace only the ones run now "
                        "(results.md then says which sections come from which run)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sections = [s for s in (args.only or SECTIONS) if s not in args.skip]
    if not sections:
        p.error("no section left to run")
    doc = run_all(sections, quick=args.quick, work_dir=args.work_dir)
    out = Path(args.out)
    if args.merge and out.exists():
        doc = merge_documents(json.loads(out.read_text()), doc)
    md_path = Path(args.md) if args.md else out.with_suffix(".md")
    _write_atomic(out, json.dumps(doc, indent=1) + "\n")
    _write_atomic(md_path, to_markdown(doc) + "\n")
    print("\n== summary")
    print("\n".join(summary_lines(doc)))
    print(f"\nwrote {out} and {md_path} ({doc['total_seconds']:.0f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
