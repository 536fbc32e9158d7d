"""What scoring the demo's test split costs: this code against an earlier commit's, interleaved in one run.

The demo scores each round's models on the GPSite ATP test split (79 chains, `max_len` 512, long
chains tiled). This measures one such pass (`predict_proba` over the split, the default
`model.attention` of each code base) in process CPU seconds, one thread, random-init weights of the
named shape (one checkpoint file, read by both), LoRA r=8 as the demo. The earlier code runs from a
`git archive` of `--baseline` (ac0cb6a: before issue 25, padded fused attention) in a worker process
beside one running this tree; passes alternate between the two workers (ABBA) after a warm-up pass
each, so both see the same machine load. Both workers' probabilities are compared (max |difference|).

Per round the demo scored the test split 5 times before issue 25 (each site: the global model and
its own; the demo: the global model) and 3 times since (`federation.evaluate_global_test: false` in
the demo): `round_ratio` = 5 x baseline pass / (3 x this pass). Target (issue 25): >= 2 at equal
numbers (probabilities within 1e-5). `make bench` runs it as section `eval`.

    python bench/bench_eval.py [--archs esm2_t2_tiny esm2_t6_8M_UR50D] [--reps 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BASELINE = "ac0cb6a"  # the last commit before issue 25's work
PASSES_PER_ROUND = {"baseline": 5, "current": 3}  # test-split passes per demo round, before and after
TARGET_ROUND_RATIO = 2.0  # issue 25: the demo's test-split evaluation >= 2x cheaper than before it
MAX_PROB_DIFF = 1e-5  # ... at equal numbers


def _worker(tree: str, arch: str, checkpoint: str, max_len: int, chains: int) -> None:
    """One code base in its own process: a pass per 'pass' line on stdin, its CPU seconds on stdout."""
    sys.path.insert(0, str(Path(tree) / "custom"))
    import numpy as np
    import torch

    torch.set_num_threads(1)
    import fedesm
    from fedesm.data.batching import Tokenizer
    from fedesm.data.validate import load_dataset
    from fedesm.model.adapters import build_lora_model
    from fedesm.model.backbone import load_backbone
    from fedesm.settings import LoraSettings
    from fedesm.training.inference import predict_proba

    assert Path(fedesm.__file__).resolve().is_relative_to(Path(tree).resolve()), fedesm.__file__
    seqs = [r.sequence for r in load_dataset("gpsite:ATP:test")][: chains or None]
    backbone = load_backbone(checkpoint)
    model = build_lora_model(backbone, LoraSettings(r=8, alpha=16), seed=0)  # the code base's default attention
    tokenizer = Tokenizer(backbone.alphabet)
    print(json.dumps({"ready": True, "chains": len(seqs), "attention": model.base_model.model.attention}), flush=True)
    for line in sys.stdin:
        cmd, *arg = line.split()
        if cmd == "pass":
            t0 = time.process_time()
            probs = predict_proba(model, tokenizer, seqs, max_len)
            print(json.dumps({"cpu_s": time.process_time() - t0}), flush=True)
        elif cmd == "save":
            np.save(arg[0], np.concatenate(probs))
            print(json.dumps({"saved": arg[0]}), flush=True)
        else:
            return


class Worker:
    def __init__(self, tree: Path, arch: str, checkpoint: Path, max_len: int, chains: int):
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", FEDESM_DATA_DIR=str(REPO / "data"))
        cmd = [sys.executable, __file__, "--worker", str(tree), arch, str(checkpoint), str(max_len), str(chains)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                                     cwd=str(tree))
        self.info = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker exited ({self.proc.wait()})")
        return json.loads(line)

    def ask(self, cmd: str) -> dict:
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.proc.stdin.write("quit\n")
        self.proc.stdin.close()
        self.proc.wait()


def measure(arch: str, baseline_tree: Path, workdir: Path, reps: int, max_len: int = 512, chains: int = 0) -> dict:
    """One row: `reps` passes of each code base, interleaved, and their probabilities compared."""
    import numpy as np

    from fedesm.model.checkpoint import make_random_checkpoint

    checkpoint = make_random_checkpoint(arch, workdir / f"{arch}.pt", seed=0)
    workers = {"baseline": Worker(baseline_tree, arch, checkpoint, max_len, chains),
               "current": Worker(REPO, arch, checkpoint, max_len, chains)}
    try:
        for w in workers.values():  # warm-up pass each
            w.ask("pass")
        times = {k: [] for k in workers}
        for i in range(reps):
            order = ("baseline", "current") if i % 2 == 0 else ("current", "baseline")
            for k in order:
                times[k].append(workers[k].ask("pass")["cpu_s"])
        probs = {}
        for k, w in workers.items():
            w.ask(f"save {workdir / (k + '.npy')}")
            probs[k] = np.load(workdir / (k + ".npy"))
        info = {k: w.info for k, w in workers.items()}
    finally:
        for w in workers.values():
            w.close()
    med = {k: statistics.median(v) for k, v in times.items()}
    round_ratio = PASSES_PER_ROUND["baseline"] * med["baseline"] / (PASSES_PER_ROUND["current"] * med["current"])
    diff = float(np.abs(probs["baseline"] - probs["current"]).max())
    return {"arch": arch, "chains": info["current"]["chains"], "max_len": max_len,
            "attention": {k: v["attention"] for k, v in info.items()},
            "pass_cpu_s": {k: [round(x, 3) for x in v] for k, v in times.items()},
            "pass_median_s": {k: round(v, 3) for k, v in med.items()},
            "pass_ratio": round(med["baseline"] / med["current"], 2),
            "round_cpu_s": {k: round(PASSES_PER_ROUND[k] * v, 2) for k, v in med.items()},
            "round_ratio": round(round_ratio, 2), "max_abs_prob_diff": diff,
            "ok": round_ratio >= TARGET_ROUND_RATIO and diff <= MAX_PROB_DIFF}


def baseline_tree(commit: str, into: Path) -> Path:
    """`commit`'s custom/ (its fedesm package), from `git archive`, under `into`."""
    tar = subprocess.run(["git", "archive", commit, "custom"], cwd=REPO, capture_output=True, check=True)
    with tarfile.open(fileobj=io.BytesIO(tar.stdout)) as tf:
        tf.extractall(into, filter="data")
    return into


def run(archs, reps: int = 3, baseline: str = BASELINE, chains: int = 0, echo=print) -> list[dict]:
    """A row per architecture (`chains`: the first n test chains only, 0 = all 79; for smoke tests)."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tree = baseline_tree(baseline, Path(tmp) / "baseline")
        for arch in archs:
            row = {**measure(arch, tree, Path(tmp), reps, chains=chains), "baseline": baseline}
            echo(f"   eval {arch}: pass {row['pass_median_s']['baseline']:.2f} s ({baseline}) -> "
                 f"{row['pass_median_s']['current']:.2f} s, per round {row['round_ratio']:.2f}x")
            rows.append(row)
    return rows


def format_table(rows) -> str:
    head = ["arch", "chains", "attention before -> now", "pass CPU s before", "pass CPU s now", "pass ratio",
            "per round CPU s (5 passes -> 3)", "round ratio", "max prob diff", "target"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join(str(x) for x in [
            r["arch"], r["chains"], f"{r['attention']['baseline']} -> {r['attention']['current']}",
            f"{r['pass_median_s']['baseline']:.3f}", f"{r['pass_median_s']['current']:.3f}", f"{r['pass_ratio']:.2f}",
            f"{r['round_cpu_s']['baseline']:.2f} -> {r['round_cpu_s']['current']:.2f}", f"**{r['round_ratio']:.2f}**",
            f"{r['max_abs_prob_diff']:.1e}", f">= {TARGET_ROUND_RATIO:g}" + ("" if r["ok"] else " (missed)")]) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _worker(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), int(sys.argv[6]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--archs", nargs="+", default=["esm2_t2_tiny", "esm2_t6_8M_UR50D"])
    ap.add_argument("--reps", type=int, default=5, help="timed passes of each code base, interleaved")
    ap.add_argument("--baseline", default=BASELINE, help="the commit to compare against (git archive)")
    ap.add_argument("--json", type=Path, help="write the rows here")
    args = ap.parse_args(argv)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()
    rows = run(args.archs, args.reps, args.baseline)
    print(format_table(rows))
    out = {"baseline": args.baseline, "commit": commit, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_avg": list(os.getloadavg())},
           "threads": 1, "rows": rows}
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
