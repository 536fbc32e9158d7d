"""The per-round metrics table: one writer and one reader for every place that keeps one.

A table is a list of rows (dicts), stored twice side by side: `<stem>.jsonl` (one JSON object a line,
what fedesm reads back) and `<stem>.csv` (the union of the columns: round, site, arm first, then by name; for spreadsheets). NaN is
written as null. The server's recorder, the centralized run, the experiments and the demo all write
through `write_table` (whole table, atomically) or `TableLog` (row by row), and read with `read_table`.

Row conventions (per round n, per site s): the metrics of s's local model after its n-th round,
`global_*` for the global model after n aggregations; `SERVER_ROW` rows hold the server's own
figures (round wall time).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Iterable

from fedesm.fileio import atomic_path, atomic_write_text

SERVER_ROW = "server"  # the `site` of the server's own rows


def _clean(v):
    if isinstance(v, float) and math.isnan(v):
        return None
    if hasattr(v, "item"):
        return v.item()
    return v


LEAD_COLUMNS = ("round", "site", "arm")  # first, in this order; the rest sorted by name (a stable header
# whatever order the metrics arrived in)


def _columns(rows: Iterable[dict]) -> list[str]:
    columns: set[str] = set()
    for row in rows:
        columns.update(row)
    return [c for c in LEAD_COLUMNS if c in columns] + sorted(columns - set(LEAD_COLUMNS))


def _write_csv(path: Path, rows: list[dict]) -> None:
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=_columns(rows))
        writer.writeheader()
        writer.writerows(rows)


def write_table(path, rows: Iterable[dict]) -> Path:
    """Write `rows` to `path` (.jsonl) and its .csv twin, each atomically; returns the .jsonl path."""
    path = Path(path).with_suffix(".jsonl")
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{k: _clean(v) for k, v in r.items()} for r in rows]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
    _write_csv(path.with_suffix(".csv"), rows)
    return path


def read_table(path) -> list[dict]:
    """The rows of a .jsonl table ([] when the file does not exist)."""
    path = Path(path)
    if not path.is_file():
        return []
    with path.open() as f:
        return [json.loads(line) for line in f if line.strip()]


class TableLog:
    """A table that grows row by row (a long local run): appends to the .jsonl, rewrites the .csv."""

    def __init__(self, path):
        self.path = Path(path).with_suffix(".jsonl")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.rows = read_table(self.path)

    def append(self, row: dict) -> None:
        row = {k: _clean(v) for k, v in row.items()}
        self.rows.append(row)
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        _write_csv(self.path.with_suffix(".csv"), self.rows)
