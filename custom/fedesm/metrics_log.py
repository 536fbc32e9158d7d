"""One tidy per-round table (JSONL + CSV) shared by the centralized run, the server and the reports."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from fedesm.fileio import atomic_path


class MetricsLog:
    """Appends rows (dicts) to `<stem>.jsonl` and rewrites `<stem>.csv` with the union of columns."""

    def __init__(self, jsonl_path):
        self.jsonl = Path(jsonl_path)
        self.csv = self.jsonl.with_suffix(".csv")
        self.jsonl.parent.mkdir(parents=True, exist_ok=True)
        self.rows = read_rows(self.jsonl) if self.jsonl.exists() else []

    def append(self, row: dict) -> None:
        row = {k: _clean(v) for k, v in row.items()}
        self.rows.append(row)
        with self.jsonl.open("a") as f:
            f.write(json.dumps(row) + "\n")
        self._write_csv()

    def _write_csv(self) -> None:
        columns: list[str] = []
        for row in self.rows:
            columns += [k for k in row if k not in columns]
        with atomic_path(self.csv) as tmp, tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(self.rows)


def _clean(v):
    if isinstance(v, float) and math.isnan(v):
        return None
    if hasattr(v, "item"):
        return v.item()
    return v


def read_rows(path) -> list[dict]:
    with Path(path).open() as f:
        return [json.loads(line) for line in f if line.strip()]
