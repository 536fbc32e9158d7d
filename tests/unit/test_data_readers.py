"""Readers and writers of binding-site sets: every format round-trips, every format error names file, id and line."""

import gzip
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fedesm.data.readers import detect_format, read_records, read_records_with_lines, write_records
from fedesm.data.records import Record
from fedesm.errors import DataError

REPO = Path(__file__).resolve().parents[2]


def rec(rid, seq, labels, family=None):
    return Record(rid, seq, np.array([int(c) for c in labels], dtype=np.uint8), family)


RECORDS = [
    rec("1abc_A", "MKVLAG", "001100", "kinase"),
    rec("2xyz_B", "ACDEFGHIKLMNPQRSTVWYXBZUO", "1" + "0" * 23 + "1"),
    rec("3pqr_C", "GG", "11", "kinase"),
]


def same(a, b):
    assert [r.id for r in a] == [r.id for r in b]
    assert [r.sequence for r in a] == [r.sequence for r in b]
    assert [r.family for r in a] == [r.family for r in b]
    for x, y in zip(a, b):
        assert x.labels.dtype == np.uint8
        np.testing.assert_array_equal(x.labels, y.labels)


EXTENSIONS = ["fa", "fasta", "txt", "csv", "tsv", "parquet", "jsonl"]


@pytest.mark.parametrize("ext", EXTENSIONS + [e + ".gz" for e in EXTENSIONS])
def test_round_trip_every_format(tmp_path, ext):
    path = tmp_path / f"set.{ext}"
    write_records(RECORDS, path, comment="a comment\nover two lines")
    same(read_records(path), RECORDS)
    if ext.endswith(".gz"):
        assert gzip.open(path).read(1)  # really gzip-compressed
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp files left


def test_gzip_output_is_deterministic(tmp_path):
    write_records(RECORDS, tmp_path / "a.fa.gz")
    write_records(RECORDS, tmp_path / "b.fa.gz")
    assert (tmp_path / "a.fa.gz").read_bytes() == (tmp_path / "b.fa.gz").read_bytes()


def test_fasta_header_family_comments_blank_lines_crlf_case(tmp_path):
    path = tmp_path / "x.txt"
    path.write_bytes(
        b"# a comment\r\n\r\n>a family=F1 source=pdb\r\nmk vl\r\n0 1 1 0\r\n\r\n>b extra=1\r\nAC\r\n01\r\n"
    )
    records, lines = read_records_with_lines(path)
    assert [(r.id, r.sequence, r.family) for r in records] == [("a", "MKVL", "F1"), ("b", "AC", None)]
    assert records[0].labels.tolist() == [0, 1, 1, 0]
    assert lines == [3, 7]


def test_table_label_variants(tmp_path):
    csv_path = tmp_path / "x.csv"
    csv_path.write_text("# comment\nsequence,id,labels,family\nMKV,a,010,\nGG,b,\"[1, 1]\",F\n")
    records = read_records(csv_path)
    assert [(r.id, r.family, r.labels.tolist()) for r in records] == [("a", None, [0, 1, 0]), ("b", "F", [1, 1])]

    jsonl = tmp_path / "x.jsonl"
    jsonl.write_text(json.dumps({"id": "a", "sequence": "mkv", "labels": [0, 1, 0]}) + "\n\n")
    assert read_records(jsonl)[0].labels.tolist() == [0, 1, 0]
    assert read_records(jsonl)[0].sequence == "MKV"

    pq_path = tmp_path / "x.parquet"
    pq.write_table(pa.table({"id": ["a"], "sequence": ["MKV"], "labels": [[0, 1, 1]]}), pq_path)
    r = read_records(pq_path)[0]
    assert (r.family, r.labels.tolist()) == (None, [0, 1, 1])


def error_of(path):
    with pytest.raises(DataError) as e:
        read_records(path)
    return str(e.value)


def test_fasta_label_length_error_names_file_record_and_line(tmp_path):
    path = tmp_path / "x.fa"
    path.write_text(">a\nMKV\n010\n>1abc_A\nMKVL\n011\n")
    assert error_of(path) == f"{path}:4, record '1abc_A': label length 3 != sequence length 4"


@pytest.mark.parametrize(
    "text, message",
    [
        (">a\nMKV\n010\n>b\nMKV\n", f":4, record 'b': missing label line"),
        (">a\nMKV\n010\n>b\n>c\nMK\n01\n", f":4, record 'b': missing sequence and label lines"),
        (">a\nMKV\n012\n", ":1, record 'a': label '2' at position 3 is not 0 or 1"),
        (">a\nMKV\nLLA\n010\n", ":1, record 'a': line after the sequence is not a 0/1 label line"),
        ("MKV\n010\n>a\nMK\n01\n", ":1: expected a '>' header line"),
        (">\nMKV\n010\n", ":1: empty record id"),
    ],
)
def test_fasta_format_errors(tmp_path, text, message):
    path = tmp_path / "x.fa"
    path.write_text(text)
    assert message in error_of(path)
    assert error_of(path).startswith(str(path))


def test_csv_tsv_jsonl_errors_name_line(tmp_path):
    p = tmp_path / "x.csv"
    p.write_text("id,sequence,labels\na,MKV,010\nb,MKV,01\n")
    assert error_of(p) == f"{p}:3, record 'b': label length 2 != sequence length 3"
    p = tmp_path / "x.tsv"
    p.write_text("# c\nid\tsequence\tlabels\na\tMKV\t0x0\n")
    assert error_of(p) == f"{p}:3, record 'a': label 'x' at position 2 is not 0 or 1"
    p = tmp_path / "x.csv"
    p.write_text("id,sequence\na,MKV\n")
    assert error_of(p) == f"{p}:1: missing column 'labels' (found: id, sequence)"
    p = tmp_path / "x.jsonl"
    p.write_text('{"id": "a", "sequence": "M", "labels": "0"}\n{"id": "b", \n{"id": "c", "sequence": "M"}\n')
    assert error_of(p).startswith(f"{p}:2: invalid JSON")
    problems = []
    records, _ = read_records_with_lines(p, problems=problems)
    assert [r.id for r in records] == ["a"]
    assert [str(e) for e in problems][1] == f"{p}:3, record 'c': missing field 'labels'"


def test_parquet_errors_name_row(tmp_path):
    p = tmp_path / "x.parquet"
    pq.write_table(pa.table({"id": ["a", "b"], "sequence": ["MK", "MK"], "labels": ["01", "0"]}), p)
    assert error_of(p) == f"{p}:row 1, record 'b': label length 1 != sequence length 2"
    pq.write_table(pa.table({"id": ["a"], "labels": ["01"]}), p)
    assert "missing column 'sequence'" in error_of(p)


def test_unknown_extension_missing_file_and_bad_gzip(tmp_path):
    assert "unknown file extension" in error_of(tmp_path / "x.xlsx")
    assert error_of(tmp_path / "nope.fa") == f"{tmp_path / 'nope.fa'}: no such file"
    bad = tmp_path / "x.fa.gz"
    bad.write_bytes(b"not gzip at all")
    assert "cannot read file" in error_of(bad)
    assert detect_format("A.FASTA.GZ") == ("fasta", True)


def test_failed_write_leaves_nothing_behind(tmp_path):
    target = tmp_path / "out.fa"
    target.write_text("old\n")
    with pytest.raises(DataError, match="whitespace"):
        write_records([rec("has space", "M", "0")], target)
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out.fa"]
    with pytest.raises(DataError, match="output directory does not exist"):
        write_records(RECORDS, tmp_path / "missing" / "x.csv")


def test_reads_shipped_gpsite_benchmark():
    records = read_records(REPO / "data/gpsite/HEM_test.txt.gz")
    assert len(records) == 48
    assert sum(len(r) for r in records) == 15_618
    assert sum(r.n_positive for r in records) == 970
