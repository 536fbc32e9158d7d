"""Where a federated job's outputs live in the server's run folder: one definition for the writers
(persistor, metrics recorder) and the readers (simulator runner, demo, experiments, predict).

    <run dir>/fedesm/
      metrics.jsonl|csv          per (round, site) table (`fedesm.tables`)
      payload_manifest.json      names of the tensors each site sent
      rounds/round_NNN/          the global adapters after NNN aggregation rounds (round_000 = initial)
      last/  best/               the latest round, and the one with the best mean validation metric
"""

from __future__ import annotations

from pathlib import Path

OUTPUT_DIR = "fedesm"
METRICS = "metrics.jsonl"
PAYLOAD_MANIFEST = "payload_manifest.json"
ROUNDS = "rounds"
LAST = "last"
BEST = "best"


def output_dir(run_dir) -> Path:
    return Path(run_dir) / OUTPUT_DIR


def round_dir(out_dir, rounds_done: int) -> Path:
    return Path(out_dir) / ROUNDS / f"round_{rounds_done:03d}"


def round_dirs(out_dir) -> list[Path]:
    """The saved rounds in order (round_000 first)."""
    return sorted((Path(out_dir) / ROUNDS).glob("round_*"))


def round_number(path) -> int:
    return int(Path(path).name.split("_")[1])
