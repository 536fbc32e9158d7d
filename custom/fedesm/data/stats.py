"""Summary numbers of a binding-site set: what `fedesm data validate` and `fedesm data split` print."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from fedesm.data.records import Record

PERCENTILES = (0, 5, 25, 50, 75, 95, 100)


def label_counts(records: Sequence[Record]) -> dict:
    """Sequences, residues, positive residues and the token label ratio (positive fraction)."""
    residues = sum(len(r) for r in records)
    positive = sum(r.n_positive for r in records)
    return {
        "sequences": len(records),
        "residues": residues,
        "positive": positive,
        "positive_fraction": positive / residues if residues else 0.0,
    }


def dataset_stats(records: Sequence[Record], max_len: int = 1000) -> dict:
    """label_counts plus length percentiles, family count and how many sequences exceed max_len."""
    stats = label_counts(records)
    lengths = np.array([len(r) for r in records], dtype=np.int64)
    names = ("min", "p5", "p25", "p50", "p75", "p95", "max")
    if len(lengths):
        values = np.percentile(lengths, PERCENTILES)
        stats["length"] = {k: int(round(float(v))) for k, v in zip(names, values)}
    else:
        stats["length"] = {k: 0 for k in names}
    families = {r.family for r in records if r.family is not None}
    stats["families"] = len(families)
    stats["max_len"] = max_len
    stats["longer_than_max_len"] = int((lengths > max_len).sum())
    return stats


def format_stats(stats: dict) -> str:
    """Human-readable lines for dataset_stats' dict."""
    ln = stats["length"]
    lines = [
        f"  sequences          {stats['sequences']:,}",
        f"  residues           {stats['residues']:,}",
        f"  positive residues  {stats['positive']:,} ({100 * stats['positive_fraction']:.1f}%)",
        "  length             min {min} | 5% {p5} | 25% {p25} | median {p50} | 75% {p75} | 95% {p95} | max {max}".format(**ln),
        f"  families           {stats['families'] if stats['families'] else 'none'}",
        f"  longer than {stats['max_len']:<6} {stats['longer_than_max_len']:,}",
    ]
    return "\n".join(lines)
