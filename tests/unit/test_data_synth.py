"""Synthetic sets: deterministic, labelled SYNTHETIC, motif residues labelled, positive rate on target."""

import gzip
import re

import numpy as np
import pyarrow.parquet as pq
import pytest

from fedesm.cli import main
from fedesm.data.readers import read_records
from fedesm.data.records import STANDARD_AA
from fedesm.data.synth import MOTIFS, synth_records
from fedesm.data.validate import find_problems
from fedesm.errors import FedesmError

# Regexes of the planted motifs (lookahead: overlapping matches) and their binding offsets.
PATTERNS = {
    "p_loop": (r"(?=(G....GK[ST]))", range(8)),
    "zinc_finger_c2h2": (r"(?=(C..C.{12}H...H))", (0, 3, 16, 20)),
    "ef_hand": (r"(?=(D.D.DG.I...E))", (0, 2, 4, 6, 11)),
    "heme_cxxch": (r"(?=(C..CH))", (0, 3, 4)),
}


def as_tuples(records):
    return [(r.id, r.sequence, r.labels.tobytes(), r.family) for r in records]


def positive_rate(records):
    return sum(r.n_positive for r in records) / sum(len(r) for r in records)


def test_deterministic_for_a_seed():
    a = synth_records(60, 6, 0.1, 60, 150, seed=5)
    assert as_tuples(a) == as_tuples(synth_records(60, 6, 0.1, 60, 150, seed=5))
    assert as_tuples(a) != as_tuples(synth_records(60, 6, 0.1, 60, 150, seed=6))


def test_shape_ids_families_alphabet():
    records = synth_records(200, 10, 0.1, 60, 300, seed=0)
    assert [r.id for r in records[:2]] == ["synth_0001", "synth_0002"] and records[-1].id == "synth_0200"
    fams = [r.family for r in records]
    assert len(set(fams)) == 10 and all(fams.count(f) == 20 for f in set(fams))
    assert all(60 <= len(r) <= 300 for r in records)
    assert all(set(r.sequence) <= set(STANDARD_AA) for r in records)
    assert find_problems(records) == []
    assert all(r.n_positive > 0 for r in records)  # every family binds


def test_family_members_are_mutated_copies_with_shared_sites():
    records = synth_records(40, 2, 0.1, 100, 100, seed=0, mutation_rate=0.1)
    fam = [r for r in records if r.family == records[0].family]
    a, b = fam[0], fam[1]
    assert np.array_equal(a.labels, b.labels)  # binding sites at family-specific positions
    identity = np.mean([x == y for x, y in zip(a.sequence, b.sequence)])
    assert 0.7 < identity < 1.0
    other = next(r for r in records if r.family != a.family)
    assert not np.array_equal(a.labels, other.labels)


def test_every_label_sits_on_a_planted_motif():
    records = synth_records(100, 20, 0.15, 60, 200, seed=2)
    seen = set()
    for r in records:
        covered = np.zeros(len(r), dtype=bool)
        for name, (pattern, offsets) in PATTERNS.items():
            for m in re.finditer(pattern, r.sequence):
                covered[[m.start() + k for k in offsets]] = True
                if r.labels[m.start() + offsets[0]]:
                    seen.add(name)
        assert not (r.labels.astype(bool) & ~covered).any(), r.id
    assert seen == {m.name for m in MOTIFS}


@pytest.mark.parametrize("n, fams, rate, lo, hi", [(200, 10, 0.1, 60, 300), (400, 20, 0.05, 60, 300),
                                                   (200, 10, 0.2, 60, 300), (300, 30, 0.03, 100, 400)])
def test_positive_rate_on_target(n, fams, rate, lo, hi):
    for seed in range(3):
        got = positive_rate(synth_records(n, fams, rate, lo, hi, seed=seed))
        assert abs(got - rate) <= 0.05 * rate, (seed, got)


def test_families_differ_in_binding_density():
    records = synth_records(200, 10, 0.1, 60, 300, seed=0)
    by_family = {}
    for r in records:
        by_family.setdefault(r.family, []).append(r)
    rates = [positive_rate(v) for v in by_family.values()]
    assert max(rates) > 1.5 * min(rates)  # so label-skewed splits have something to skew


@pytest.mark.parametrize("kwargs, message", [(dict(n_families=0), "--families"), (dict(pos_rate=0.5), "--pos-rate"),
                                             (dict(min_len=100, max_len=50), "--min-len")])
def test_bad_arguments(kwargs, message):
    with pytest.raises(FedesmError, match=message):
        synth_records(**{"n": 20, "n_families": 2, **kwargs})


def test_cli_synth_fasta_gz_and_parquet(tmp_path, capsys):
    out = tmp_path / "syn.fa.gz"
    assert main(["data", "synth", "--out", str(out), "--n", "30", "--families", "3", "--seed", "4"]) == 0
    assert "wrote 30 SYNTHETIC sequences (3 families" in capsys.readouterr().out
    assert gzip.open(out, "rt").readline().startswith("# SYNTHETIC binding-site data")
    assert as_tuples(read_records(out)) == as_tuples(synth_records(30, 3, 0.1, 60, 300, seed=4))

    pq_out = tmp_path / "syn.parquet"
    assert main(["data", "synth", "--out", str(pq_out), "--n", "10", "--families", "2"]) == 0
    assert pq.read_schema(pq_out).metadata[b"comment"].startswith(b"SYNTHETIC")
    assert main(["data", "synth", "--out", str(tmp_path / "x.fa"), "--n", "5", "--families", "9"]) == 2
    assert capsys.readouterr().err.strip() == "fedesm: error: --families must be between 1 and --n (5), got 9"
    assert not (tmp_path / "x.fa").exists()
