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
the demo): `round_ratio` = 5 x baseline pass / (3 x this pass).

    python bench/bench_eval.py [--archs esm2_t2_tiny esm2_t6_8M_UR50D] [--reps 5] [--json out.json]
"""

from __future__ import annotations

import argparse
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


def _worker(tree: str, arch: str, checkpoint: str, max_len: int) -> None:
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
    seqs = [r.sequence for r in load_dataset("gpsite:ATP:test")]
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
    def __init__(self, tree: Path, arch: str, checkpoint: Path, max_len: int):
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", FEDESM_DATA_DIR=str(REPO / "data"))
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker", str(tree), arch, str(checkpoint),
                                      str(max_len)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env=env, cwd=str(tree))
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


def measure(arch: str, baseline_tree: Path, workdir: Path, reps: int, max_len: int = 512) -> dict:
    import numpy as np

    from fedesm.model.checkpoint import make_random_checkpoint

    checkpoint = make_random_checkpoint(arch, workdir / f"{arch}.pt", seed=0)
    workers = {"baseline": Worker(baseline_tree, arch, checkpoint, max_len),
               "current": Worker(REPO, arch, checkpoint, max_len)}
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
    return {"arch": arch, "chains": info["current"]["chains"], "max_len": max_len,
            "attention": {k: v["attention"] for k, v in info.items()},
            "pass_cpu_s": {k: [round(x, 3) for x in v] for k, v in times.items()},
            "pass_median_s": {k: round(v, 3) for k, v in med.items()},
            "pass_ratio": round(med["baseline"] / med["current"], 2),
            "round_cpu_s": {k: round(PASSES_PER_ROUND[k] * v, 2) for k, v in med.items()},
            "round_ratio": round(PASSES_PER_ROUND["baseline"] * med["baseline"]
                                 / (PASSES_PER_ROUND["current"] * med["current"]), 2),
            "max_abs_prob_diff": float(np.abs(probs["baseline"] - probs["current"]).max())}


def main(argv=None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _worker(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--archs", nargs="+", default=["esm2_t2_tiny", "esm2_t6_8M_UR50D"])
    ap.add_argument("--reps", type=int, default=5, help="timed passes of each code base, interleaved")
    ap.add_argument("--baseline", default=BASELINE, help="the commit to compare against (git archive)")
    ap.add_argument("--json", type=Path, help="write the rows here")
    args = ap.parse_args(argv)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tar = subprocess.run(["git", "archive", args.baseline, "custom"], cwd=REPO, capture_output=True, check=True)
        with tarfile.open(fileobj=__import__("io").BytesIO(tar.stdout)) as tf:
            tf.extractall(tmp / "baseline", filter="data")
        for arch in args.archs:
            row = measure(arch, tmp / "baseline", tmp, args.reps)
            rows.append(row)
            print(json.dumps(row), flush=True)
    out = {"baseline": args.baseline, "commit": commit, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_avg": list(os.getloadavg())},
           "threads": 1, "rows": rows}
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
