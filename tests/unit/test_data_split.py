"""Splits: parts add up and never overlap, families stay together, skew/Dirichlet shape label ratios, output is all-or-nothing."""

import json
from pathlib import Path

import numpy as np
import pytest

import fedesm.data.split as split_mod
from fedesm.cli import main
from fedesm.data.readers import read_records, write_records
from fedesm.data.records import Record
from fedesm.data.split import split_records, write_split
from fedesm.data.synth import synth_records
from fedesm.errors import FedesmError

REPO = Path(__file__).resolve().parents[2]


def positive_fraction(records):
    return sum(r.n_positive for r in records) / sum(len(r) for r in records)


def graded_records(n=100, length=100):
    """n family-less records whose positive fractions are all different (0, 1, ..., n-1 positives)."""
    out = []
    for i in range(n):
        labels = np.zeros(length, dtype=np.uint8)
        labels[: i % length] = 1
        out.append(Record(f"r{i:03d}", "A" * length, labels))
    return out


@pytest.fixture(scope="module")
def synth():
    return synth_records(200, 10, 0.1, 60, 200, seed=1)


def parts(result):
    out = {"val": result.val, "test": result.test}
    for name in result.sites:
        out[f"{name}/train"] = result.sites[name]
        out[f"{name}/val"] = result.site_val[name]
    return out


def assert_partition(result, records):
    ids = [r.id for recs in parts(result).values() for r in recs]
    assert len(ids) == len(set(ids)), "a sequence in two places"
    assert sorted(ids) == sorted(r.id for r in records), "sizes do not add up"


def families(recs):
    return {r.family for r in recs}


def test_iid_partition_sizes_and_determinism():
    records = graded_records(100)
    result = split_records(records, "iid", n_sites=3, val_frac=0.1, test_frac=0.2, seed=3)
    assert_partition(result, records)
    assert (len(result.val), len(result.test)) == (10, 20)
    assert list(result.sites) == ["site-1", "site-2", "site-3"]
    shares = [len(result.sites[s]) + len(result.site_val[s]) for s in result.sites]
    assert sorted(shares) == [23, 23, 24]
    assert all(len(v) in (2, 3) for v in result.site_val.values())  # ~10% of each share
    again = split_records(records, "iid", n_sites=3, val_frac=0.1, test_frac=0.2, seed=3)
    assert {k: [r.id for r in v] for k, v in parts(again).items()} == {k: [r.id for r in v] for k, v in parts(result).items()}
    other = split_records(records, "iid", n_sites=3, val_frac=0.1, test_frac=0.2, seed=4)
    assert [r.id for r in other.val] != [r.id for r in result.val]


@pytest.mark.parametrize("mode", ["iid", "family", "dirichlet"])
def test_held_out_sets_are_family_disjoint(synth, mode):
    result = split_records(synth, mode, n_sites=2 if mode != "dirichlet" else 4, seed=0)
    assert_partition(result, synth)
    site_fams = set().union(*(families(result.sites[s]) | families(result.site_val[s]) for s in result.sites))
    assert families(result.val) and families(result.test)
    assert not families(result.val) & families(result.test)
    assert not (families(result.val) | families(result.test)) & site_fams


def test_family_mode_no_family_in_two_sites_and_balanced(synth):
    result = split_records(synth, "family", n_sites=3, val_frac=0.1, test_frac=0.1, seed=0)
    assert_partition(result, synth)
    per_site = [families(result.sites[s]) | families(result.site_val[s]) for s in result.sites]
    for i in range(3):
        for j in range(i + 1, 3):
            assert not per_site[i] & per_site[j]
    residues = [sum(len(r) for r in result.sites[s] + result.site_val[s]) for s in result.sites]
    assert max(residues) / min(residues) < 1.6  # whole families, greedy balanced
    assert all(result.site_val[s] for s in result.sites)  # a local val even for few, big families


def test_family_mode_needs_enough_families(synth):
    with pytest.raises(FedesmError, match="at least as many families as sites"):
        split_records(synth, "family", n_sites=12)


def test_skew_composition_is_80_20():
    records = graded_records(100)
    result = split_records(records, "skew", n_sites=2, val_frac=0.1, test_frac=0.1, seed=0, site_val_frac=0.0)
    assert_partition(result, records)
    pool = result.sites["site-1"] + result.sites["site-2"]
    median_cut = sorted(r.n_positive for r in pool)[len(pool) // 2]  # all fractions differ: exact median split
    above = lambda recs: sum(r.n_positive >= median_cut for r in recs)
    below = lambda recs: sum(r.n_positive < median_cut for r in recs)
    n_above, n_below = above(pool), below(pool)
    assert (n_above, n_below) == (40, 40)
    assert (above(result.sites["site-1"]), below(result.sites["site-1"])) == (32, 8)
    assert (above(result.sites["site-2"]), below(result.sites["site-2"])) == (8, 32)
    assert positive_fraction(result.sites["site-1"]) > 1.5 * positive_fraction(result.sites["site-2"])


def test_skew_on_real_gpsite_data():
    records = read_records(REPO / "data/gpsite/ATP_train.txt.gz")
    result = split_records(records, "skew", n_sites=2, seed=0)
    assert_partition(result, records)
    s1 = positive_fraction(result.sites["site-1"] + result.site_val["site-1"])
    s2 = positive_fraction(result.sites["site-2"] + result.site_val["site-2"])
    assert s1 > 1.3 * s2


def test_skew_needs_two_sites(synth):
    with pytest.raises(FedesmError, match="exactly 2 sites"):
        split_records(synth, "skew", n_sites=3)


def test_dirichlet_four_sites():
    records = graded_records(200)
    result = split_records(records, "dirichlet", n_sites=4, seed=0, alpha=0.1)
    assert_partition(result, records)
    assert len(result.sites) == 4 and all(result.sites.values())
    again = split_records(records, "dirichlet", n_sites=4, seed=0, alpha=0.1)
    assert [r.id for r in again.sites["site-3"]] == [r.id for r in result.sites["site-3"]]

    def ratio_spread(alpha):
        res = split_records(records, "dirichlet", n_sites=4, seed=0, alpha=alpha)
        ratios = [positive_fraction(res.sites[s] + res.site_val[s]) for s in res.sites]
        return max(ratios) - min(ratios)

    assert ratio_spread(0.1) > 0.2 > ratio_spread(1000.0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(mode="nope"), "unknown split mode"),
        (dict(val_frac=0.6, test_frac=0.4), "val \\+ test"),
        (dict(mode="dirichlet", alpha=0), "alpha must be > 0"),
        (dict(n_sites=0), "at least one site"),
    ],
)
def test_bad_split_arguments(kwargs, message):
    with pytest.raises(FedesmError, match=message):
        split_records(graded_records(20), **kwargs)


def test_duplicate_ids_refused():
    records = graded_records(10) + graded_records(1)
    with pytest.raises(FedesmError, match="duplicate record id 'r000'"):
        split_records(records)


# ---------------------------------------------------------------------------------- writing and CLI


@pytest.mark.parametrize("fmt, ext", [("fasta", "fa"), ("csv", "csv"), ("parquet", "parquet"), ("jsonl", "jsonl")])
def test_write_split_layout(tmp_path, synth, fmt, ext):
    result = split_records(synth, "family", n_sites=2, seed=0)
    out = write_split(result, tmp_path / "split", fmt)
    names = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert names == sorted(["split.json", f"val.{ext}", f"test.{ext}", f"site-1/train.{ext}", f"site-1/val.{ext}",
                            f"site-2/train.{ext}", f"site-2/val.{ext}"])
    assert [r.id for r in read_records(out / f"site-2/train.{ext}")] == [r.id for r in result.sites["site-2"]]
    summary = json.loads((out / "split.json").read_text())
    assert summary["mode"] == "family" and summary["seed"] == 0 and summary["format"] == fmt
    site1 = summary["sites"]["site-1"]["train"]
    assert site1["sequences"] == len(result.sites["site-1"])
    assert site1["positive_fraction"] == pytest.approx(positive_fraction(result.sites["site-1"]))
    assert [p.name for p in tmp_path.iterdir()] == ["split"]  # no temp dirs left


def test_failing_write_leaves_no_output(tmp_path, synth, monkeypatch):
    calls = []

    def failing_write(records, path, comment=None):
        calls.append(path)
        if len(calls) == 4:
            raise OSError("disk full")
        return write_records(records, path, comment)

    monkeypatch.setattr(split_mod, "write_records", failing_write)
    result = split_records(synth, "iid", n_sites=2, seed=0)
    with pytest.raises(OSError, match="disk full"):
        write_split(result, tmp_path / "out")
    assert len(calls) == 4
    assert list(tmp_path.iterdir()) == []


def test_existing_output_dir_rules(tmp_path, synth):
    result = split_records(synth, "iid", n_sites=2, seed=0)
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(FedesmError, match="not empty"):
        write_split(result, other)
    with pytest.raises(FedesmError, match="not a previous split"):
        write_split(result, other, overwrite=True)
    assert (other / "keep.txt").read_text() == "mine"
    out = write_split(result, tmp_path / "s")
    write_split(split_records(synth, "iid", n_sites=3, seed=0), out, overwrite=True)
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["site-1", "site-2", "site-3"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other", "s"]


def test_cli_split(tmp_path, capsys):
    data = tmp_path / "in.csv"
    write_records(graded_records(100), data)
    out = tmp_path / "out"
    assert main(["data", "split", str(data), "--out", str(out), "--sites", "2", "--mode", "skew",
                 "--format", "jsonl", "--seed", "1"]) == 0
    printed = capsys.readouterr().out
    assert "site-1 train" in printed and "site-2 val" in printed
    assert (out / "site-1" / "train.jsonl").is_file()
    summary = json.loads((out / "split.json").read_text())
    assert summary["sites"]["site-1"]["train"]["positive_fraction"] > summary["sites"]["site-2"]["train"]["positive_fraction"]


def test_cli_split_error_leaves_nothing(tmp_path, capsys):
    data = tmp_path / "in.fa"
    write_records(graded_records(20), data)
    out = tmp_path / "out"
    assert main(["data", "split", str(data), "--out", str(out), "--sites", "3", "--mode", "skew"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "fedesm: error: skew mode splits between exactly 2 sites, got 3 (use dirichlet for more)"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.fa"]
    bad = tmp_path / "bad.fa"
    bad.write_text(">a\nMK\n0\n")
    assert main(["data", "split", str(bad), "--out", str(out), "--sites", "2"]) == 2
    assert "bad.fa:1, record 'a': label length 1 != sequence length 2" in capsys.readouterr().err
    assert not out.exists()
