"""Inputs that must not slip through: files without records, sets a site cannot train or be scored on,
damaged or differently encoded files, and bad settings, each refused with one line naming what is wrong,
by `fedesm data validate`, by `fedesm train` and by a site at job start alike."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from fedesm.cli import main
from fedesm.data.records import Record
from fedesm.data.validate import check_site_data, load_dataset
from fedesm.errors import DataError

EMPTY_INPUTS = {
    "empty.fa": (b"", "no records in {path} (the file is empty)"),
    "blank.fa": (b"\n  \n# only a comment\n\r\n", "no records in {path} (empty, or only blank lines and comments)"),
    "comments.jsonl": (b"# nothing here\n\n", "no records in {path} (empty, or only blank lines and comments)"),
    "header.csv": (b"id,sequence,labels\n", "no records in {path} (a header but no rows)"),
    "header.tsv": (b"# comment\nid\tsequence\tlabels\tfamily\n\n", "no records in {path} (a header but no rows)"),
    "empty.csv": (b"", "no records in {path} (the file is empty)"),
    "blank.csv": (b"# just a comment\n\n", "no records in {path} (only blank lines and comments, no header row)"),
    "empty.fa.gz": (gzip.compress(b""), "no records in {path} (empty, or only blank lines and comments)"),
}


def _write(tmp_path, name, content):
    path = tmp_path / name
    if name.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"id": pa.array([], pa.string()), "sequence": pa.array([], pa.string()),
                                 "labels": pa.array([], pa.string())}), path)
    else:
        path.write_bytes(content)
    return path


@pytest.mark.parametrize("name", [*EMPTY_INPUTS, "rows.parquet"])
def test_files_without_records_are_refused_everywhere(tmp_path, capsys, name):
    content, message = EMPTY_INPUTS.get(name, (b"", "no records in {path} (a table with no rows)"))
    path = _write(tmp_path, name, content)
    expected = f"fedesm: error: {message.format(path=path)}"
    assert main(["data", "validate", str(path)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [expected]
    with pytest.raises(DataError, match="no records in"):
        load_dataset(path)  # what training and every site read their sets with
    out = tmp_path / "run"
    assert main(["train", "--train", str(path), "--val", str(path), "--backbone", "random:esm2_t2_tiny",
                 "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [expected]
    assert not out.exists()


def _record(i, seq="ACDEFGHIKL", positive=True):
    labels = np.zeros(len(seq), np.uint8)
    if positive:
        labels[2] = 1
    return Record(f"r{i}", seq, labels)


def test_a_site_set_without_binding_residues_or_only_long_chains_says_so_at_start():
    good = [_record(i) for i in range(3)]
    negative = [_record(i, positive=False) for i in range(3)]
    with pytest.raises(DataError, match=r"no binding residues in /s/train.fa: all 3 records are labelled 0 only, "
                                        "nothing to learn"):
        check_site_data(negative, good, "/s/train.fa", "/s/val.fa", 1000)
    with pytest.raises(DataError, match="no binding residues in /s/val.fa: .*cannot be scored"):
        check_site_data(good, negative, "/s/train.fa", "/s/val.fa", 1000)
    assert check_site_data(good, good, "/s/train.fa", "/s/val.fa", 1000) == []
    long = [_record(i, "ACDEFGHIKL" * 30) for i in range(2)]
    (note,) = check_site_data(long, good, "/s/train.fa", "/s/val.fa", 200)
    assert note.startswith("all 2 records in /s/train.fa are longer than training.max_len=200")


def test_train_on_a_set_without_binding_residues_is_one_line(tmp_path, capsys):
    neg = tmp_path / "neg.fa"
    neg.write_text(">a\nACDE\n0000\n>b\nKLMN\n0000\n")
    assert main(["train", "--train", str(neg), "--val", str(neg), "--backbone", "random:esm2_t2_tiny",
                 "--out", str(tmp_path / "o")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"fedesm: error: no binding residues in {neg}")


@pytest.mark.parametrize("name, content, message", [
    ("latin1.fa", ">caf\xe9\nACDE\n0101\n".encode("latin-1"), "not UTF-8 text (byte 0xe9 at offset 4)"),
    ("utf16.csv", "id,sequence,labels\na,ACDE,0101\n".encode("utf-16"), "not UTF-8 text (byte 0xff at offset 0)"),
    ("bad.csv.gz", gzip.compress(b"id,sequence,labels\na,ACDE,0101\n")[:12] + b"\x00" * 30, "cannot read file"),
    ("twice.csv", b"id,sequence,labels,id\na,ACDE,0101,b\n", "column 'id' appears 2 times"),
    ("int.jsonl", b'{"id": "a", "sequence": "ACDE", "labels": 5}\n', "labels must be a 0/1 string or a list"),
    ("listid.jsonl", b'{"id": ["a"], "sequence": "ACDE", "labels": "0101"}\n', "record id must be text or a number"),
])
def test_damaged_files_are_one_line_naming_the_file(tmp_path, capsys, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    assert main(["data", "validate", str(path)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"fedesm: error: {path}") and message in line


def test_a_byte_order_mark_and_long_fields_are_read(tmp_path):
    bom = tmp_path / "excel.csv"
    bom.write_bytes("\ufeffid,sequence,labels\na,ACDE,0101\n".encode("utf-8"))
    assert [r.id for r in load_dataset(bom)] == ["a"]
    seq = "ACDEFGHIKLMNPQRSTVWY" * 2500  # 50,000 residues, labels "[0, 1, ...]": 150,000 characters
    big = tmp_path / "big.csv"
    big.write_text(f'id,sequence,labels\nt,{seq},"{[i % 2 for i in range(len(seq))]}"\n')
    (record,) = load_dataset(big)
    assert len(record) == 50_000 and record.n_positive == 25_000


@pytest.mark.parametrize("argv, message", [
    (["params", "--lora-r", "0"], "lora.r: the LoRA rank must be a positive integer, got 0"),
    (["train", "--train", "x.fa", "--val", "x.fa", "--out", "o", "--lr", "-1"],
     "training.lr: the learning rate must be > 0, got -1"),
    (["job", "export", "esm2_fra_lora", "--out", "o", "--set", "strategy=fedavg"],
     "federation.strategy: 'fedavg' is not one of fra, fra-ef, fedit, ffa"),
    (["job", "export", "esm2_fra_lora", "--out", "o", "--set", "federation.max_update_ratio=0.5"],
     "federation.max_update_ratio: must be > 1 (a multiple of the other sites' median) or 0 (off), got 0.5"),
])
def test_invalid_settings_are_one_line_where_they_are_read(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"fedesm: error: {message}"]
    assert list(tmp_path.iterdir()) == []
