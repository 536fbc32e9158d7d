"""Validation: each check is its own error naming file, id and line; the CLI prints one line per problem and exits 2."""

import json
from pathlib import Path

import numpy as np
import pytest

from fedesm.cli import main
from fedesm.data.records import Record
from fedesm.data.stats import dataset_stats
from fedesm.data.validate import check_file, find_problems, load_dataset, validate_records
from fedesm.errors import DataError

REPO = Path(__file__).resolve().parents[2]


def rec(rid, seq, labels, family=None):
    return Record(rid, seq, np.array(labels, dtype=np.uint8), family)


def messages(path):
    _, problems = check_file(path)
    return [str(p) for p in problems]


def test_clean_file_has_no_problems(tmp_path):
    p = tmp_path / "ok.fa"
    p.write_text(">a\nMKV\n010\n>b\nXBZUO\n00000\n")
    assert messages(p) == []
    assert [r.id for r in load_dataset(p)] == ["a", "b"]


def test_duplicate_id_names_both_lines(tmp_path):
    p = tmp_path / "x.fa"
    p.write_text(">a\nMK\n01\n>b\nMK\n01\n>a\nMK\n00\n")
    assert messages(p) == [f"{p}:7, record 'a': duplicate id (first at line 1)"]


def test_bad_residue_named_with_position(tmp_path):
    p = tmp_path / "x.fa"
    p.write_text(">a\nMK\n01\n>b\nMKJ*\n0000\n")
    assert messages(p) == [
        f"{p}:4, record 'b': residue 'J' at position 3 is not in ESM-2's alphabet "
        "(20 standard amino acids plus X, B, Z, U, O)"
    ]


def test_empty_sequence(tmp_path):
    p = tmp_path / "x.csv"
    p.write_text("id,sequence,labels\na,MK,01\nb,,\n")
    assert messages(p) == [f"{p}:3, record 'b': empty sequence"]


def test_label_problems_in_files_are_collected_with_lines(tmp_path):
    p = tmp_path / "x.tsv"
    p.write_text("id\tsequence\tlabels\na\tMKV\t01\nb\tMKV\t012\nc\tMKV\t010\nc\tMK#\t00\n")
    assert messages(p) == [
        f"{p}:2, record 'a': label length 2 != sequence length 3",
        f"{p}:3, record 'b': label '2' at position 3 is not 0 or 1",
        f"{p}:5, record 'c': label length 2 != sequence length 3",
    ]


def test_in_memory_label_checks():
    records = [rec("a", "MKV", [0, 1]), rec("b", "MKV", [0, 2, 1]), rec("c", "", [])]
    problems = [str(e) for e in find_problems(records, "mem.fa", [1, 4, 7])]
    assert problems == [
        "mem.fa:1, record 'a': label length 2 != sequence length 3",
        "mem.fa:4, record 'b': label 2 at position 2 is not 0 or 1",
        "mem.fa:7, record 'c': empty sequence",
    ]


def test_validate_records_raises_first_and_counts_the_rest():
    with pytest.raises(DataError) as e:
        validate_records([rec("a", "MJ", [0, 0]), rec("a", "", [])], "x.fa")
    assert str(e.value).startswith("x.fa, record 'a': residue 'J' at position 2")
    assert "(and 2 more problems;" in str(e.value)
    validate_records([rec("a", "MK", [0, 1])])  # clean: no error


def test_load_dataset_raises_on_bad_file(tmp_path):
    p = tmp_path / "x.fa"
    p.write_text(">a\nMK\n01\n>a\nMK\n01\n")
    with pytest.raises(DataError, match=r"x.fa:4, record 'a': duplicate id \(first at line 1\)"):
        load_dataset(p)


def test_stats():
    records = [rec(f"s{i}", "M" * n, [1] * (n // 10) + [0] * (n - n // 10), "F" if i < 2 else None)
               for i, n in enumerate([10, 20, 30, 40, 1500])]
    s = dataset_stats(records, max_len=1000)
    assert (s["sequences"], s["residues"], s["positive"]) == (5, 1600, 160)
    assert s["positive_fraction"] == pytest.approx(0.1)
    assert s["length"]["min"] == 10 and s["length"]["p50"] == 30 and s["length"]["max"] == 1500
    assert s["families"] == 1 and s["longer_than_max_len"] == 1


# -------------------------------------------------------------------------------------------- CLI


def test_cli_validate_gpsite_counts(capsys):
    path = str(REPO / "data/gpsite/ATP_train.txt.gz")
    assert main(["data", "validate", path]) == 0
    out = capsys.readouterr().out
    assert f"{path}: OK" in out
    assert "sequences          347" in out
    assert "residues           130,655" in out
    assert "(3.9%)" in out
    assert main(["data", "validate", "--json", path]) == 0
    report = json.loads(capsys.readouterr().out)
    stats = report["files"][0]["stats"]
    assert report["ok"] and (stats["sequences"], stats["residues"]) == (347, 130_655)
    assert round(stats["positive_fraction"], 3) == 0.039


def test_cli_validate_problems_one_line_each_exit_2(tmp_path, capsys):
    p = tmp_path / "x.fa"
    p.write_text("".join(f">a\nMK\n0{i % 2}\n" for i in range(15)))
    assert main(["data", "validate", str(p), "--max-problems", "3"]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert err == [
        f"fedesm: error: {p}:4, record 'a': duplicate id (first at line 1)",
        f"fedesm: error: {p}:7, record 'a': duplicate id (first at line 1)",
        f"fedesm: error: {p}:10, record 'a': duplicate id (first at line 1)",
        f"fedesm: error: {p}: ... and 11 more problems",
    ]
    assert "Traceback" not in captured.err and "OK" not in captured.out


def test_cli_validate_several_files_and_missing_file(tmp_path, capsys):
    good = tmp_path / "good.csv"
    good.write_text("id,sequence,labels,family\na,MK,01,F\n")
    missing = tmp_path / "missing.fa"
    assert main(["data", "validate", "--json", str(good), str(missing)]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip() == f"fedesm: error: {missing}: no such file"
    report = json.loads(captured.out)
    assert report["ok"] is False
    assert [f["ok"] for f in report["files"]] == [True, False]
    assert report["files"][0]["stats"]["families"] == 1


def test_cli_bad_args_are_one_line_errors(capsys):
    assert main(["data", "validate", "x.fa", "--max-problems", "0"]) == 2
    assert capsys.readouterr().err.strip() == "fedesm: error: --max-problems must be in 1 .. 2,147,483,647, got 0"
