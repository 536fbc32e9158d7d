"""Hostile inputs (issue 23): deep nesting, decompression bombs, and predict held to training's checks.

Each case is one line and exit 2 in `data validate`, `train` and `predict`, never a RecursionError or a
run that reads gigabytes; the limits name the setting that raises them.
"""

from __future__ import annotations

import gzip
import resource
import time
from pathlib import Path

import pytest

from fedesm.cli import main
from fedesm.data.readers import read_records, write_records
from fedesm.data.synth import synth_records


def _every_line(capsys, *needles) -> None:
    """`data validate` lists every problem: one line each, each naming the limit."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines and all(line.startswith("fedesm: error: ") and all(n in line for n in needles) for line in lines), lines


def _one_line(capsys, *needles) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err and "RecursionError" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny model trained for one step, for predict."""
    root = tmp_path_factory.mktemp("model")
    records = synth_records(n=12, n_families=3, pos_rate=0.2, min_len=40, max_len=60, seed=0)
    write_records(records[:8], root / "train.fa")
    write_records(records[8:], root / "val.fa")
    assert main(["train", "--train", str(root / "train.fa"), "--val", str(root / "val.fa"), "--backbone",
                 "random:esm2_t2_tiny", "--out", str(root / "model"), "--rounds", "1", "--steps-per-round", "1",
                 "--batch-size", "2", "--max-len", "64", "--no-progress", "--lora-r", "2"]) == 0
    return root / "model"


def _predict(model_dir, path, out) -> int:
    return main(["predict", "--model", str(model_dir), "--input", str(path), "--out", str(out), "--device", "cpu"])


def _all_commands(tmp_path, path, model_dir):
    """(name, exit code, run folder or output) of validate, train and predict on `path`."""
    yield "validate", main(["data", "validate", str(path)]), None
    out = tmp_path / "run"
    yield "train", main(["train", "--train", str(path), "--val", str(path), "--backbone", "random:esm2_t2_tiny",
                         "--out", str(out), "--no-progress"]), out
    csv_out = tmp_path / "pred.csv"
    yield "predict", _predict(model_dir, path, csv_out), csv_out


@pytest.mark.parametrize("name, text", [
    ("deep.jsonl", '{"id": "a", "sequence": "MK", "labels": ' + "[" * 100_000 + "]" * 100_000 + "}\n"),
    ("deep_obj.jsonl", '{"id": "a", "sequence": "MK", "labels": "01", "x": ' + '{"a":' * 100_000 + "1"
     + "}" * 100_000 + "}\n"),
    ("deep.csv", "id,sequence,labels\na,MK," + "[" * 100_000 + "]" * 100_000 + "\n"),
    ("shallow.jsonl", '{"id": "a", "sequence": "MK", "labels": [[0], [1]]}\n'),
])
def test_labels_nested_100000_deep_are_one_line_everywhere(tmp_path, capsys, model_dir, name, text):
    path = tmp_path / name
    path.write_text(text)
    for command, rc, out in _all_commands(tmp_path, path, model_dir):
        assert rc == 2, command
        _one_line(capsys, str(path))
        assert out is None or not out.exists(), command


def _bomb(path: Path, residues: int) -> Path:
    """A gzip FASTA of one chain `residues` long: a few hundred KB that expands to 2x `residues` bytes."""
    with gzip.open(path, "wb", compresslevel=9) as f:
        f.write(b">bomb\n")
        block = b"A" * (1 << 20)
        for _ in range(residues >> 20):
            f.write(block)
        f.write(b"\n")
        for _ in range(residues >> 20):
            f.write(b"0" * (1 << 20))
        f.write(b"\n")
    return path


def test_a_gzip_bomb_is_refused_fast_without_reading_it(tmp_path, capsys, model_dir):
    """611 KB that expand to 600 MB (one 300 M-residue chain): refused within its first line, in well under a
    second of reading and without holding the chain in memory; the message names the limit to raise."""
    path = _bomb(tmp_path / "bomb.fa.gz", 300 << 20)
    assert path.stat().st_size < 1_000_000
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    for command, rc, out in _all_commands(tmp_path, path, model_dir):
        assert rc == 2, command
        _one_line(capsys, str(path), "FEDESM_MAX_CHAIN_LENGTH=100000")
        assert out is None or not out.exists(), command
    took = time.perf_counter() - start
    grew_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grew_mb < 200, grew_mb  # 300 M residues read whole would be 300+ MB
    assert took < 30, took  # the three commands, model loading for predict included; reading it all took 51 s


def test_the_limits_are_settings_a_user_can_raise(tmp_path, capsys, monkeypatch):
    records = synth_records(n=3, n_families=1, pos_rate=0.2, min_len=40, max_len=60, seed=1)
    longest = max(len(r) for r in records)
    for ext in ("fa", "csv.gz", "jsonl", "parquet"):
        path = write_records(records, tmp_path / f"set.{ext}")
        monkeypatch.setenv("FEDESM_MAX_CHAIN_LENGTH", str(longest - 1))
        assert main(["data", "validate", str(path)]) == 2
        _every_line(capsys, f"longer than the limit of {longest - 1}", f"FEDESM_MAX_CHAIN_LENGTH={longest - 1}",
                    "raise it")
        monkeypatch.setenv("FEDESM_MAX_CHAIN_LENGTH", str(longest))
        assert len(read_records(path)) == 3
        monkeypatch.delenv("FEDESM_MAX_CHAIN_LENGTH")
        monkeypatch.setenv("FEDESM_MAX_INPUT_BYTES", "100")
        assert main(["data", "validate", str(path)]) == 2
        _one_line(capsys, "more than 100 bytes", "FEDESM_MAX_INPUT_BYTES=100", "raise it")
        monkeypatch.setenv("FEDESM_MAX_INPUT_BYTES", "10_000_000")
        assert len(read_records(path)) == 3
        monkeypatch.delenv("FEDESM_MAX_INPUT_BYTES")
    monkeypatch.setenv("FEDESM_MAX_CHAIN_LENGTH", "lots")
    assert main(["data", "validate", str(path)]) == 2
    _one_line(capsys, "FEDESM_MAX_CHAIN_LENGTH='lots' is not a positive whole number")


@pytest.mark.parametrize("name, content, needle", [
    ("empty.fa", "", "no records"),
    ("blank.fa", "  \n\t\n   \n", "no records"),
    ("header_only.csv", "id,sequence,labels\n", "no records"),
    ("no_rows.jsonl", "# only a comment\n", "no records"),
    ("dup.fa", ">a\nMKV\n>a\nMKL\n", "duplicate id"),
    ("dup_labelled.fa", ">a\nMKV\n010\n>a\nMKL\n001\n", "duplicate id"),
    ("empty_id.fa", ">\nMKV\n", "empty record id"),
    ("blank_id.fa", ">   \nMKV\n", "empty record id"),
    ("empty_id.csv", "id,sequence,labels\n ,MKV,010\n", "empty record id"),
    ("bad_labels.fa", ">a\nMKV\n012\n", "label '2' at position 3 is not 0 or 1"),
    ("short_labels.fa", ">a\nMKV\n01\n", "label length 2 != sequence length 3"),
    ("bad_labels.csv", "id,sequence,labels\na,MKV,0x1\n", "label 'x' at position 2"),
])
def test_predict_has_the_same_input_checks_as_train(tmp_path, capsys, model_dir, name, content, needle):
    path = tmp_path / name
    path.write_text(content)
    out = tmp_path / "pred.csv"
    assert _predict(model_dir, path, out) == 2
    _one_line(capsys, str(path), needle)
    assert not out.exists()


def test_predict_names_a_directory_as_one(tmp_path, capsys, model_dir):
    folder = tmp_path / "inputs.fa"
    folder.mkdir()
    assert _predict(model_dir, folder, tmp_path / "pred.csv") == 2
    _one_line(capsys, "is a directory")


def test_predict_still_reads_unlabelled_fasta(tmp_path, capsys, model_dir):
    path = tmp_path / "new.fa"
    path.write_text(">x\nMKVLAAGIT\n>y\nMKT\nLLA\n")  # 2-line and wrapped
    out = tmp_path / "pred.csv"
    assert _predict(model_dir, path, out) == 0
    assert len(out.read_text().splitlines()) == 1 + 9 + 6


def test_crlf_input_is_accepted_as_documented(tmp_path, model_dir):
    """A deliberate choice (README: CRLF and a byte-order mark are accepted): GPSite ships CRLF files."""
    path = tmp_path / "crlf.fa"
    path.write_bytes(b"\xef\xbb\xbf>a\r\nMKV\r\n010\r\n")
    assert [r.id for r in read_records(path)] == ["a"]
    assert _predict(model_dir, path, tmp_path / "pred.csv") == 0
    assert "crlf" in (Path(__file__).resolve().parents[2] / "README.md").read_text().lower()


@pytest.mark.parametrize("argv, needle", [
    (["data", "split", "gpsite:ATP", "--sites", "2", "--seed", "-1"], "--seed must be in 0 .. 4,294,967,295"),
    (["data", "split", "gpsite:ATP", "--sites", "2", "--alpha", "inf"], "--alpha must be a finite number > 0"),
    (["data", "split", "gpsite:ATP", "--sites", "2", "--alpha", "nan"], "--alpha must be a finite number > 0"),
    (["data", "split", "gpsite:ATP", "--sites", "99999999999999999999"], "--sites must be in 1 .. 2,147,483,647"),
    (["data", "synth", "--seed", "-5"], "--seed must be in 0 .. 4,294,967,295"),
    (["data", "synth", "--n", "99999999999999"], "--n must be in 1 .. 2,147,483,647"),
    (["data", "validate", "gpsite:ATP", "--max-len", "-3"], "--max-len must be in 1 .. 2,147,483,647"),
])
def test_the_data_commands_hold_their_numbers_to_the_same_rule(tmp_path, capsys, argv, needle):
    out = tmp_path / "out.fa" if argv[1] == "synth" else tmp_path / "split"
    if argv[1] != "validate":
        argv = [*argv, "--out", str(out)]
    assert main(argv) == 2
    _one_line(capsys, needle)
    assert not out.exists()
