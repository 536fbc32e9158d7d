"""Content checks on binding-site records, so training never starts on data ESM-2 cannot read.

Each check gives its own DataError naming the file, the record id and the line:
label length == sequence length, labels only 0/1, residues in ESM-2's alphabet (the bad
character and its 1-based position named), no empty sequences, no duplicate ids (both lines named).
A file without records (empty, only blank lines or comments, a header or a table without rows) is
refused too ("no records in FILE"), so `fedesm data validate`, training and a site at job start
all stop on it at once; `check_site_data` adds what a site's sets need before the first round.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from fedesm.data.readers import Location, PathLike, detect_format, no_records_error, read_records_with_lines
from fedesm.data.records import ESM_RESIDUES, Record
from fedesm.errors import DataError


def find_problems(
    records: Sequence[Record], path: Optional[PathLike] = None, lines: Optional[Sequence[Location]] = None
) -> list[DataError]:
    """Every problem in the records, in file order. ``lines[i]`` is where record i came from."""
    problems: list[DataError] = []
    first_seen: dict[str, Optional[Location]] = {}
    for i, r in enumerate(records):
        line = lines[i] if lines is not None else None
        where = dict(path=path, record_id=r.id, line=line)
        if r.id in first_seen:
            seen = first_seen[r.id]
            also = f" (first at line {seen})" if isinstance(seen, int) else (f" (first at {seen})" if seen else "")
            problems.append(DataError(f"duplicate id{also}", **where))
        else:
            first_seen[r.id] = line
        if len(r.sequence) == 0:
            problems.append(DataError("empty sequence", **where))
            continue
        labels = np.asarray(r.labels)
        if labels.shape != (len(r.sequence),):
            problems.append(DataError(f"label length {labels.size} != sequence length {len(r.sequence)}", **where))
        else:
            bad = np.flatnonzero((labels != 0) & (labels != 1))
            if bad.size:
                k = int(bad[0])
                problems.append(DataError(f"label {labels[k].item()!r} at position {k + 1} is not 0 or 1", **where))
        bad_res = next((k for k, c in enumerate(r.sequence) if c not in ESM_RESIDUES), None)
        if bad_res is not None:
            c = r.sequence[bad_res]
            problems.append(
                DataError(f"residue {c!r} at position {bad_res + 1} is not in ESM-2's alphabet "
                          "(20 standard amino acids plus X, B, Z, U, O)", **where)
            )
    return problems


def validate_records(
    records: Sequence[Record], path: Optional[PathLike] = None, lines: Optional[Sequence[Location]] = None
) -> None:
    """Raise the first problem (saying how many more there are), or return if the records are clean."""
    problems = find_problems(records, path, lines)
    if problems:
        raise _first_of(problems)


def check_file(path: PathLike) -> tuple[list[Record], list[DataError]]:
    """Read a file collecting every format and content problem (for `fedesm data validate`).

    Errors that make the whole file unreadable (missing, unknown extension, missing column) raise.
    """
    problems: list[DataError] = []
    records, lines = read_records_with_lines(path, problems=problems)
    problems.extend(find_problems(records, path, lines))
    problems.sort(key=lambda e: _order(e.line))
    if not records and not problems:
        problems.append(no_records_error(path, _why_empty(path)))
    return records, problems


def _why_empty(path: PathLike) -> str:
    from pathlib import Path

    from fedesm.data.catalog import resolve

    local = Path(resolve(path))
    fmt, gz = detect_format(local)
    if not gz and local.stat().st_size == 0:
        return "the file is empty"
    if fmt in ("csv", "tsv"):
        return "a header but no rows"
    if fmt == "parquet":
        return "a table with no rows"
    return "empty, or only blank lines and comments"


def check_site_data(train: Sequence[Record], val: Sequence[Record], train_name, val_name,
                    max_len: int) -> list[str]:
    """What a site's sets need before its first round, said at set-up instead of after it.

    Raises DataError for a set that cannot train (no binding residue at all: nothing to learn, and
    balanced class weights are undefined) or cannot be scored (AUPRC, F1 need binding residues).
    Returns notes worth a warning: every record longer than the training window (they are cropped in
    training and tiled in evaluation, so they still count, but the user should know).
    """
    for name, records, why in ((train_name, train, "nothing to learn"),
                               (val_name, val, "the model cannot be scored on it (AUPRC and F1 need them)")):
        if records and not any(r.n_positive for r in records):
            err = DataError(f"no binding residues in {name}: all {len(records)} records are labelled 0 only, {why}")
            err.path = name
            raise err
    notes = []
    for name, records in ((train_name, train), (val_name, val)):
        if records and all(len(r) > max_len for r in records):
            notes.append(f"all {len(records)} records in {name} are longer than training.max_len={max_len} "
                         "residues: training sees random crops of them, evaluation tiles them")
    return notes


def load_dataset(path: PathLike) -> list[Record]:
    """Read and validate one file: the records the trainer may use, or the file's first problem."""
    records, problems = check_file(path)
    if problems:
        raise _first_of(problems)
    return records


def _first_of(problems: list[DataError]) -> DataError:
    first = problems[0]
    if len(problems) == 1:
        return first
    more = len(problems) - 1
    err = DataError(f"{first.args[0]} (and {more} more problem{'s' if more > 1 else ''}; "
                    "`fedesm data validate` lists them)")
    err.path, err.record_id, err.line = first.path, first.record_id, first.line
    return err


def _order(line) -> tuple:
    if isinstance(line, int):
        return (0, line)
    if isinstance(line, str) and line.startswith("row "):
        return (0, int(line[4:]))
    return (1, 0)
