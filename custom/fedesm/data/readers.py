"""Read and write per-residue binding-site sets in the formats public benchmarks ship in.

Formats, chosen by file extension (each also readable and writable gzip-compressed, e.g. ``.fa.gz``):

- 3-line FASTA (``.fa``, ``.fasta``, ``.txt``), as used by GPSite and most binding-site benchmarks::

      >1abc_A family=kinase
      MKVLAAGIT...
      00011000...

  Header: ``>ID`` optionally followed by whitespace-separated ``key=value`` fields; ``family=NAME``
  sets the record's family (used by family-disjoint splits), other fields are ignored. The next line
  is the sequence, the one after it one 0/1 label per residue. Blank lines and lines starting with
  ``#`` (comments) are ignored.
- Tables: CSV (``.csv``), TSV (``.tsv``), Parquet (``.parquet``; written with page checksums, which
  are verified on reading when a file has them), JSON Lines (``.jsonl``) with
  columns ``id``, ``sequence``, ``labels`` (a 0/1 string like ``"00110"``, or a list of 0/1 ints;
  in CSV/TSV also ``"[0, 0, 1]"``) and optional ``family`` (empty = none). In CSV, TSV and JSONL,
  ``#`` lines before the data are comments.

Text is UTF-8 (a leading byte-order mark, as spreadsheet exports write, is skipped). Sequences are
upper-cased and whitespace is removed. Structural problems (a missing label line, a
label that is not 0/1, a label count that differs from the sequence length, a missing column, bad
JSON) raise ``DataError`` naming the file, the record id and the line (Parquet: ``row N``, 0-based).
Content checks (alphabet, duplicate ids, empty sequences) are ``fedesm.data.validate``'s job.
Writes are atomic: a temp file beside the target, renamed into place.

Limits, each a setting a user can raise (an environment variable, named in the message that refuses):
``FEDESM_MAX_CHAIN_LENGTH`` residues per chain (default 100,000: titin, the longest known, has 34,350) and
``FEDESM_MAX_INPUT_BYTES`` bytes of (decompressed) text per file (default 4 GiB). Both are checked while
the file is read and decompressed, so a small gzip that expands to gigabytes is refused within its first
line, and a JSON label list nested deeper than a list of 0/1 is refused as such (never a RecursionError).
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import zlib
from pathlib import Path
from typing import Iterable, Iterator, Optional, Union

import numpy as np

from fedesm.data.records import Record
from fedesm import fileio
from fedesm.errors import DataError

PathLike = Union[str, os.PathLike]
Location = Union[int, str]  # a 1-based line number, or "row N" for Parquet

FORMATS = ("fasta", "csv", "tsv", "parquet", "jsonl")
_EXTENSIONS = {
    ".fa": "fasta",
    ".fasta": "fasta",
    ".faa": "fasta",
    ".txt": "fasta",
    ".csv": "csv",
    ".tsv": "tsv",
    ".tab": "tsv",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
}
# The extension write_split and friends use for each format.
FORMAT_EXTENSION = {"fasta": "fa", "csv": "csv", "tsv": "tsv", "parquet": "parquet", "jsonl": "jsonl"}
_REQUIRED_COLUMNS = ("id", "sequence", "labels")
# What a damaged file can raise while it is decompressed and decoded (zlib.error is not an OSError).
_UNREADABLE = (OSError, EOFError, UnicodeDecodeError, zlib.error)
# A CSV field may hold a whole chain with its labels (titin: 34,350 residues, 3 characters each as "[0, 1, ...]").
_CSV_FIELD_LIMIT = 1 << 28
MAX_CHAIN_LENGTH_ENV, DEFAULT_MAX_CHAIN_LENGTH = "FEDESM_MAX_CHAIN_LENGTH", 100_000
MAX_INPUT_BYTES_ENV, DEFAULT_MAX_INPUT_BYTES = "FEDESM_MAX_INPUT_BYTES", 4 << 30
_READ_CHUNK = 1 << 20


def _limit(env: str, default: int) -> int:
    text = os.environ.get(env, "").strip().replace("_", "").replace(",", "")
    if not text:
        return default
    if not text.isdigit() or not 0 < int(text) < 1 << 62:
        raise DataError(f"{env}={os.environ[env]!r} is not a positive whole number")
    return int(text)


def max_chain_length() -> int:
    """Residues a chain may have (FEDESM_MAX_CHAIN_LENGTH, default 100,000)."""
    return _limit(MAX_CHAIN_LENGTH_ENV, DEFAULT_MAX_CHAIN_LENGTH)


def max_input_bytes() -> int:
    """Bytes of (decompressed) text a data file may hold (FEDESM_MAX_INPUT_BYTES, default 4 GiB)."""
    return _limit(MAX_INPUT_BYTES_ENV, DEFAULT_MAX_INPUT_BYTES)


def _max_line_chars() -> int:
    # A line holds at most one chain and its labels ("[0, 1, ...]": 3 characters a residue), plus an id and a family.
    return 4 * max_chain_length() + 65_536


def _too_long_line(path, line) -> DataError:
    limit = max_chain_length()
    return DataError(f"a line longer than {_max_line_chars():,} characters: more than a chain of at most {limit:,} "
                     f"residues and its labels ({MAX_CHAIN_LENGTH_ENV}={limit}; raise it to read longer chains)",
                     path=path, line=line)


class _BoundedReader(io.RawIOBase):
    """A binary stream (a file, or gzip's decompressed one) that refuses to yield more than `limit` bytes."""

    def __init__(self, inner, path, limit: int):
        self.inner, self.path, self.limit, self.count = inner, path, limit, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self.inner.readinto(buffer)
        self.count += n or 0
        if self.count > self.limit:
            raise DataError(f"more than {self.limit:,} bytes{' once decompressed' if isinstance(self.inner, gzip.GzipFile) else ''} "
                            f"({MAX_INPUT_BYTES_ENV}={self.limit}; raise it to read larger files)", path=self.path)
        return n

    def close(self) -> None:
        self.inner.close()
        super().close()


def _open_binary(path: Path, gz: bool):
    """The file's (decompressed) bytes, refused past FEDESM_MAX_INPUT_BYTES while they are read."""
    inner = gzip.open(path, "rb") if gz else open(path, "rb")
    return io.BufferedReader(_BoundedReader(inner, path, max_input_bytes()), buffer_size=_READ_CHUNK)


def no_records_error(path: PathLike, detail: str) -> DataError:
    """The one message for a file that holds no records (`fedesm.data.validate` and the table readers)."""
    err = DataError(f"no records in {path} ({detail})")
    err.path = path
    return err


def _unreadable(path: PathLike, e: BaseException) -> DataError:
    if isinstance(e, UnicodeDecodeError):
        bad = e.object[e.start:e.start + 1]
        return DataError(f"cannot read file: not UTF-8 text (byte 0x{bad.hex()} at offset {e.start})", path=path)
    return DataError(f"cannot read file: {e}", path=path)


def detect_format(path: PathLike) -> tuple[str, bool]:
    """(format, gzipped) from the file name; DataError for an extension we do not read."""
    name = Path(path).name.lower()
    gz = name.endswith(".gz")
    if gz:
        name = name[: -len(".gz")]
    fmt = _EXTENSIONS.get(Path(name).suffix)
    if fmt is None:
        known = ", ".join(sorted(_EXTENSIONS))
        raise DataError(f"unknown file extension (known: {known}, each optionally .gz)", path=path)
    return fmt, gz


# ----------------------------------------------------------------------------------------- reading


def read_records(path: PathLike) -> list[Record]:
    """All records of one file. Raises DataError on the first format error."""
    records, _ = read_records_with_lines(path)
    return records


def read_records_with_lines(
    path: PathLike, problems: Optional[list[DataError]] = None
) -> tuple[list[Record], list[Location]]:
    """Records plus where each came from (line number, or ``"row N"`` for Parquet).

    With ``problems`` given, per-record errors are appended there and the record is skipped, so a
    caller can report every problem at once; errors that make the whole file unreadable (missing
    file, unknown extension, missing column) still raise.
    """
    from fedesm.data.catalog import resolve

    path = resolve(path)  # a shipped set's name (gpsite:ATP) -> its file
    max_chain_length(), max_input_bytes()  # a bad limit setting: one error for the file, before any record
    fmt, gz = detect_format(path)
    p = Path(path)
    if not p.exists():
        raise DataError("no such file", path=path)
    if p.is_dir():
        raise DataError("is a directory, expected a data file", path=path)
    records: list[Record] = []
    lines: list[Location] = []
    for item in _PARSERS[fmt](p, gz):
        try:
            if isinstance(item, DataError):  # a record the parser could not make sense of
                raise item
            rid, seq, labels, family, loc = item
            records.append(make_record(rid, seq, labels, family, path=path, line=loc))
            lines.append(loc)
        except DataError as e:
            if problems is None:
                raise
            problems.append(e)
    return records, lines


def read_sequences(path: PathLike, label_lines: Optional[list] = None) -> list[tuple[str, str]]:
    """(id, sequence) pairs of a file to predict on: FASTA with or without label lines (2-line, wrapped
    or 3-line; label lines are skipped, and their line numbers appended to ``label_lines`` when given),
    or a table in any format `read_records` reads. Residues are checked against ESM-2's alphabet; an
    empty file, an empty or duplicated id and a chain past the length limit are refused as in training."""
    from fedesm.data.records import ESM_RESIDUES

    path = Path(path)
    max_chain_length(), max_input_bytes()
    fmt, gz = detect_format(path)
    if path.is_dir():
        raise DataError("is a directory, expected a data file", path=path)
    if not path.is_file():
        raise DataError("no such file", path=path)
    if fmt != "fasta":
        records, lines = read_records_with_lines(path)
        if not records:
            raise no_records_error(path, "a table with no rows")
        _refuse_duplicate_ids([r.id for r in records], lines, path)
        return [(r.id, r.sequence) for r in records]
    entries: list[list] = []  # [id, sequence or None, header line]
    for n, text in _numbered_lines(path, gz):
        line = text.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith(">"):
            entries.append([_parse_header(line)[0], None, n])
        elif not entries:
            raise DataError("sequence line before any '>id' header", path=path, line=n)
        elif entries[-1][1] is None:
            entries[-1][1] = line.upper()
        elif _looks_like_labels(line):
            if label_lines is not None:
                label_lines.append(n)
            continue  # the label line of a 3-line FASTA
        else:
            entries[-1][1] += line.upper()  # a wrapped sequence
            check_chain_length(len(entries[-1][1]), path, entries[-1][0] or None, entries[-1][2])
    if not entries:
        raise no_records_error(path, "empty, or only blank lines and comments")
    _refuse_duplicate_ids([e[0] for e in entries], [e[2] for e in entries], path)
    out = []
    for rid, seq, n in entries:
        if not rid:
            raise DataError("empty record id", path=path, line=n)
        if not seq:
            raise DataError("empty sequence", path=path, record_id=rid, line=n)
        check_chain_length(len(seq), path, rid, n)
        bad = set(seq) - ESM_RESIDUES
        if bad:
            raise DataError(f"residues not in ESM's alphabet: {''.join(sorted(bad))}", path=path, record_id=rid, line=n)
        out.append((rid, seq))
    return out


def check_chain_length(n: int, path=None, record_id=None, line=None) -> None:
    """A chain longer than FEDESM_MAX_CHAIN_LENGTH residues is refused (the limit named in the message)."""
    limit = max_chain_length()
    if n > limit:
        raise DataError(f"chain of {n:,} residues is longer than the limit of {limit:,} ({MAX_CHAIN_LENGTH_ENV}={limit}; "
                        "raise it to read longer chains)", path, record_id, line)


def _refuse_duplicate_ids(ids: list, lines: list, path) -> None:
    first: dict = {}
    for rid, line in zip(ids, lines):
        if rid in first and rid:
            raise DataError(f"duplicate id (first at {'line ' if isinstance(first[rid], int) else ''}{first[rid]})",
                            path=path, record_id=rid, line=line)
        first.setdefault(rid, line)


def make_record(rid, sequence, labels, family=None, path=None, line=None) -> Record:
    """Normalise raw fields into a Record: id as text, upper-case sequence without whitespace, uint8 labels."""
    if isinstance(rid, (list, tuple, dict, set, bytes)):
        raise DataError(f"record id must be text or a number, got {type(rid).__name__}", path=path, line=line)
    rid = "" if rid is None else str(rid).strip()
    if not rid:
        raise DataError("empty record id", path=path, line=line)
    if not isinstance(sequence, (str, type(None))):
        raise DataError(f"sequence must be text, got {type(sequence).__name__}", path, rid, line)
    seq = "".join(str(sequence if sequence is not None else "").split()).upper()
    check_chain_length(len(seq), path, rid, line)
    arr = parse_labels(labels, path=path, record_id=rid, line=line)
    if len(arr) != len(seq):
        raise DataError(f"label length {len(arr)} != sequence length {len(seq)}", path, rid, line)
    family = None if family is None or str(family).strip() == "" else str(family).strip()
    return Record(id=rid, sequence=seq, labels=arr, family=family)


def parse_labels(labels, path=None, record_id=None, line=None) -> np.ndarray:
    """A 0/1 string (whitespace ignored), a JSON-style ``"[0, 1]"`` string, or a sequence of 0/1 ints."""
    if labels is None:
        raise DataError("missing labels", path, record_id, line)
    if isinstance(labels, str):
        text = "".join(labels.split())
        if text.startswith("["):
            if text.startswith("[["):  # a list of 0/1 is flat: refuse nesting before the parser recurses into it
                raise DataError("labels are a nested list; expected a 0/1 string or a flat list of 0/1",
                                path, record_id, line)
            try:
                labels = json.loads(text)
            except (json.JSONDecodeError, RecursionError):
                raise DataError(f"labels {text[:30]!r} are not a 0/1 string or a list of 0/1", path, record_id, line)
        else:
            bad = next((i for i, c in enumerate(text) if c not in "01"), None)
            if bad is not None:
                raise DataError(f"label {text[bad]!r} at position {bad + 1} is not 0 or 1", path, record_id, line)
            return (np.frombuffer(text.encode("ascii"), dtype=np.uint8) - ord("0")).astype(np.uint8)
    if isinstance(labels, (bytes, dict, set)) or not hasattr(labels, "__iter__"):
        raise DataError(f"labels must be a 0/1 string or a list of 0/1, got {type(labels).__name__}",
                        path, record_id, line)
    values = list(labels)
    for i, v in enumerate(values):
        if isinstance(v, (bool, np.bool_)) or (isinstance(v, (int, np.integer)) and v in (0, 1)):
            continue
        shown = "a nested list" if isinstance(v, (list, tuple, dict)) else repr(v)[:30]
        raise DataError(f"label {shown} at position {i + 1} is not 0 or 1", path, record_id, line)
    return np.asarray(values, dtype=np.uint8)


def _open_text(path: Path, gz: bool):
    # newline=None: universal newlines, so CRLF files (as GPSite ships) read the same as LF ones;
    # utf-8-sig: a leading byte-order mark is not part of the first line.
    return io.TextIOWrapper(_open_binary(path, gz), encoding="utf-8-sig", newline=None)


def _numbered_lines(path: Path, gz: bool) -> Iterator[tuple[int, str]]:
    longest = _max_line_chars()
    try:
        with _open_text(path, gz) as f:
            n = 0
            while True:
                line = f.readline(longest + 1)  # never more than a line's worth in memory
                if not line:
                    return
                n += 1
                if len(line) > longest:
                    raise _too_long_line(path, n)
                yield n, line.rstrip("\r\n")
    except _UNREADABLE as e:  # truncated or damaged gzip, binary file, another encoding...
        raise _unreadable(path, e) from None


def _read_text(path: Path, gz: bool) -> str:
    """The whole (decompressed) text, refused as soon as one line runs past what a chain can need."""
    longest, parts, run = _max_line_chars(), [], 0
    try:
        with _open_text(path, gz) as f:
            while True:
                chunk = f.read(_READ_CHUNK)
                if not chunk:
                    break
                parts.append(chunk)
                cut = max(chunk.rfind("\n"), chunk.rfind("\r"))
                run = run + len(chunk) if cut < 0 else len(chunk) - cut - 1
                if run > longest:
                    raise _too_long_line(path, None)
    except _UNREADABLE as e:
        raise _unreadable(path, e) from None
    return "".join(parts)


def _parse_header(text: str) -> tuple[str, Optional[str]]:
    fields = text[1:].split()
    if not fields:
        return "", None
    family = None
    for field in fields[1:]:
        key, sep, value = field.partition("=")
        if sep and key == "family":
            family = value
    return fields[0], family


def _looks_like_labels(text: str) -> bool:
    # Digits only: a label line (parse_labels then names any digit other than 0/1).
    return "".join(text.split()).isdigit()


def _read_fasta(path: Path, gz: bool):
    """3-line FASTA: header, sequence, labels. A broken record is reported and skipped to the next header."""
    lines = [(n, t) for n, t in _numbered_lines(path, gz) if t.strip() and not t.lstrip().startswith("#")]
    i = 0
    while i < len(lines):
        n, text = lines[i]
        if not text.startswith(">"):
            # Not at a header: report once, then resynchronise at the next header.
            j = i
            while j < len(lines) and not lines[j][1].startswith(">"):
                j += 1
            yield DataError("expected a '>' header line (3-line FASTA: >id, sequence, labels)", path, None, n)
            i = j
            continue
        rid, family = _parse_header(text)
        body = []
        j = i + 1
        while j < len(lines) and not lines[j][1].startswith(">") and len(body) < 3:
            body.append(lines[j][1])
            j += 1
        if len(body) == 0:
            yield DataError("missing sequence and label lines", path, rid or None, n)
        elif len(body) == 1:
            yield DataError("missing label line (3-line FASTA: >id, sequence, labels)", path, rid or None, n)
        elif len(body) == 3 or not _looks_like_labels(body[1]):
            # A multi-line FASTA sequence, or an unlabelled FASTA file.
            yield DataError(
                "line after the sequence is not a 0/1 label line (expected 3-line FASTA: >id, sequence, labels)",
                path, rid or None, n,
            )
            while j < len(lines) and not lines[j][1].startswith(">"):
                j += 1
        else:
            yield rid, body[0], body[1], family, n
        i = j


def _skip_leading_comments(lines: list[str]) -> int:
    n = 0
    while n < len(lines) and (not lines[n].strip() or lines[n].lstrip().startswith("#")):
        n += 1
    return n


def _check_columns(path, columns, line) -> None:
    missing = [c for c in _REQUIRED_COLUMNS if c not in columns]
    if missing:
        found = ", ".join(map(str, columns)) or "none"
        raise DataError(f"missing column {missing[0]!r} (found: {found})", path=path, line=line)
    twice = [c for c in (*_REQUIRED_COLUMNS, "family") if list(columns).count(c) > 1]
    if twice:
        raise DataError(f"column {twice[0]!r} appears {list(columns).count(twice[0])} times", path=path, line=line)


def _read_delimited(path: Path, gz: bool, delimiter: str):
    text = _read_text(path, gz)
    lines = text.splitlines(keepends=True)
    skip = _skip_leading_comments(lines)
    if csv.field_size_limit() < _CSV_FIELD_LIMIT:
        csv.field_size_limit(_CSV_FIELD_LIMIT)
    reader = csv.reader(lines[skip:], delimiter=delimiter)
    try:
        header = next(reader)
    except StopIteration:
        raise no_records_error(path, "the file is empty" if not text else
                               "only blank lines and comments, no header row")
    except csv.Error as e:
        raise DataError(f"malformed {'TSV' if delimiter == chr(9) else 'CSV'} header: {e}", path=path, line=skip + 1)
    header = [h.strip() for h in header]
    _check_columns(path, header, skip + 1)
    col = {name: header.index(name) for name in header}
    try:
        for row in reader:
            n = skip + reader.line_num
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                yield DataError(f"{len(row)} fields, header has {len(header)}", path, row[0] if row else None, n)
                continue
            family = row[col["family"]] if "family" in col else None
            yield row[col["id"]], row[col["sequence"]], row[col["labels"]], family, n
    except csv.Error as e:
        raise DataError(f"malformed {'TSV' if delimiter == chr(9) else 'CSV'}: {e}", path=path, line=skip + reader.line_num)


def _read_csv(path, gz):
    return _read_delimited(path, gz, ",")


def _read_tsv(path, gz):
    return _read_delimited(path, gz, "\t")


def _read_jsonl(path: Path, gz: bool):
    for n, text in _numbered_lines(path, gz):
        if not text.strip() or text.lstrip().startswith("#"):
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            yield DataError(f"invalid JSON: {e.msg}", path, None, n)
            continue
        except RecursionError:  # C json recurses per bracket: [[[[...]]]] 100,000 deep
            yield DataError("invalid JSON: nested too deep (a record is one flat object)", path, None, n)
            continue
        if not isinstance(obj, dict):
            yield DataError("expected a JSON object per line", path, None, n)
            continue
        missing = [c for c in _REQUIRED_COLUMNS if c not in obj]
        if missing:
            yield DataError(f"missing field {missing[0]!r}", path, obj.get("id"), n)
            continue
        yield obj["id"], obj["sequence"], obj["labels"], obj.get("family"), n


def _read_parquet(path: Path, gz: bool):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if gz:
            with _open_binary(path, gz) as f:
                table = pq.read_table(io.BytesIO(f.read()), page_checksum_verification=True)
        else:
            if path.stat().st_size > max_input_bytes():
                raise DataError(f"more than {max_input_bytes():,} bytes ({MAX_INPUT_BYTES_ENV}={max_input_bytes()}; "
                                "raise it to read larger files)", path=path)
            # pages carrying a CRC (fedesm writes them) are verified: damage inside a data page can otherwise
            # decode into other, valid-looking labels
            table = pq.read_table(path, page_checksum_verification=True)
    except (OSError, EOFError, zlib.error, pa.ArrowException) as e:
        raise DataError(f"cannot read Parquet file: {str(e).splitlines()[0] if str(e) else type(e).__name__}",
                        path=path) from None
    _check_columns(path, table.column_names, None)
    ids = table.column("id").to_pylist()
    seqs = table.column("sequence").to_pylist()
    labels = table.column("labels").to_pylist()
    families = table.column("family").to_pylist() if "family" in table.column_names else [None] * len(ids)
    for i in range(len(ids)):
        yield ids[i], seqs[i], labels[i], families[i], f"row {i}"


# Each parser yields (id, sequence, labels, family, location) per record, or a DataError for a
# record it could not parse (the reader raises it, or collects it and goes on).
_PARSERS = {
    "fasta": _read_fasta,
    "csv": _read_csv,
    "tsv": _read_tsv,
    "jsonl": _read_jsonl,
    "parquet": _read_parquet,
}


# ----------------------------------------------------------------------------------------- writing


def write_records(records: Iterable[Record], path: PathLike, comment: Optional[str] = None) -> Path:
    """Write records in the format the extension names; atomic (temp file + rename).

    ``comment`` (e.g. "SYNTHETIC ...") becomes ``#`` lines at the top of text formats and the
    ``comment`` key of Parquet's schema metadata.
    """
    fmt, gz = detect_format(path)
    path = Path(path)
    records = list(records)
    if fmt == "parquet":
        payload = _parquet_bytes(records, comment)
    else:
        payload = _TEXT_WRITERS[fmt](records, comment).encode("utf-8")
    if gz:
        buf = io.BytesIO()
        # mtime=0 and no file name: the same records give byte-identical files.
        with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0) as g:
            g.write(payload)
        payload = buf.getvalue()
    atomic_write_bytes(path, payload)
    return path


def atomic_write_bytes(path: PathLike, payload: bytes) -> None:
    """Write to a temp file in the target's directory, then rename it over the target."""
    path = Path(path)
    if not path.parent.is_dir():
        raise DataError("output directory does not exist", path=path.parent)
    fileio.atomic_write_bytes(path, payload)


def _labels_str(r: Record) -> str:
    return (np.asarray(r.labels, dtype=np.uint8) + ord("0")).tobytes().decode("ascii")


def _comment_lines(comment: Optional[str]) -> str:
    if not comment:
        return ""
    return "".join(f"# {line}\n" for line in comment.splitlines())


def _fasta_text(records: list[Record], comment: Optional[str]) -> str:
    out = [_comment_lines(comment)]
    for r in records:
        if any(c.isspace() for c in r.id) or (r.family and any(c.isspace() for c in r.family)):
            raise DataError("ids and families written to FASTA must not contain whitespace", record_id=r.id)
        header = f">{r.id}" + (f" family={r.family}" if r.family else "")
        out.append(f"{header}\n{r.sequence}\n{_labels_str(r)}\n")
    return "".join(out)


def _delimited_text(records: list[Record], comment: Optional[str], delimiter: str) -> str:
    buf = io.StringIO()
    buf.write(_comment_lines(comment))
    w = csv.writer(buf, delimiter=delimiter, lineterminator="\n")
    w.writerow(["id", "sequence", "labels", "family"])
    for r in records:
        w.writerow([r.id, r.sequence, _labels_str(r), r.family or ""])
    return buf.getvalue()


def _jsonl_text(records: list[Record], comment: Optional[str]) -> str:
    out = [_comment_lines(comment)]
    for r in records:
        obj = {"id": r.id, "sequence": r.sequence, "labels": _labels_str(r), "family": r.family}
        out.append(json.dumps(obj) + "\n")
    return "".join(out)


_TEXT_WRITERS = {
    "fasta": _fasta_text,
    "csv": lambda recs, c: _delimited_text(recs, c, ","),
    "tsv": lambda recs, c: _delimited_text(recs, c, "\t"),
    "jsonl": _jsonl_text,
}


def _parquet_bytes(records: list[Record], comment: Optional[str]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(
        {
            "id": pa.array([r.id for r in records], pa.string()),
            "sequence": pa.array([r.sequence for r in records], pa.string()),
            "labels": pa.array([_labels_str(r) for r in records], pa.string()),
            "family": pa.array([r.family for r in records], pa.string()),
        }
    )
    if comment:
        table = table.replace_schema_metadata({"comment": comment})
    buf = io.BytesIO()
    pq.write_table(table, buf, write_page_checksum=True)
    return buf.getvalue()
