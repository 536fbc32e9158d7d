"""Crops, tiles, tokenisation and residue-level metrics."""

from __future__ import annotations

import numpy as np
import pytest

from fedesm.data.batching import IGNORE_INDEX, RandomBatchSampler, Tokenizer, eval_batches, tile_windows
from fedesm.data.records import Record
from fedesm.evaluation.metrics import best_f1_threshold, binary_metrics


@pytest.fixture(scope="module")
def tokenizer():
    import esm

    return Tokenizer(esm.data.Alphabet.from_architecture("ESM-1b"))


def test_tokenizer_matches_fair_esm_batch_converter(tokenizer):
    import esm

    alphabet = esm.data.Alphabet.from_architecture("ESM-1b")
    seqs = ["MKTAYIAKQR", "GAVXBZUO"]
    _, _, ref = alphabet.get_batch_converter()([("a", seqs[0]), ("b", seqs[1])])
    ours, labels = tokenizer.collate([(s, None) for s in seqs])
    assert (ours.numpy() == ref.numpy()).all()
    assert (labels == IGNORE_INDEX).all()


def test_labels_only_on_residues(tokenizer):
    tokens, labels = tokenizer.collate([("ACDE", np.array([0, 1, 1, 0])), ("AC", np.array([1, 0]))])
    assert labels[0].tolist() == [IGNORE_INDEX, 0, 1, 1, 0, IGNORE_INDEX]
    assert labels[1].tolist() == [IGNORE_INDEX, 1, 0, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]


@pytest.mark.parametrize("n,max_len", [(10, 10), (11, 10), (1000, 100), (257, 64), (5, 64)])
def test_tiles_cover_every_residue(n, max_len):
    windows = tile_windows([n], max_len)
    covered = np.zeros(n, int)
    for w in windows:
        assert w.end - w.start <= max_len
        covered[w.start : w.end] += 1
    assert covered.min() >= 1
    if n > max_len:
        assert len(windows) >= 2


def test_eval_batches_respect_token_budget(tokenizer):
    seqs = ["A" * n for n in (30, 300, 90, 45, 1200)]
    seen = []
    for windows, tokens in eval_batches(seqs, tokenizer, max_len=100, batch_tokens=400):
        assert tokens.shape[0] == len(windows)
        assert tokens.numel() <= 400 or len(windows) == 1
        seen += windows
    assert {w.record for w in seen} == set(range(5))


def test_random_crop_keeps_labels_aligned(tokenizer):
    rng = np.random.default_rng(0)
    seq = "".join(rng.choice(list("ACDEFGHIKL"), 500))
    labels = np.array([c == "C" for c in seq], np.uint8)
    sampler = RandomBatchSampler([Record("x", seq, labels)], tokenizer, batch_size=4, max_len=50, seed=1)
    c_idx = tokenizer.encode("C")[0]
    starts = set()
    for _ in range(5):
        tokens, lab = sampler.next_batch()
        assert tokens.shape == (4, 52)
        body, body_lab = tokens[:, 1:51].numpy(), lab[:, 1:51].numpy()
        assert ((body == c_idx) == (body_lab == 1)).all()
        starts.add(tuple(body[:, 0]))
    assert len(starts) > 1  # crops move


def test_bucketed_batches_group_similar_lengths(tokenizer):
    recs = [Record(str(i), "A" * (20 + 10 * i), np.zeros(20 + 10 * i, np.uint8)) for i in range(64)]
    plain = RandomBatchSampler(recs, tokenizer, 8, 1000, seed=0, bucket=False)
    bucketed = RandomBatchSampler(recs, tokenizer, 8, 1000, seed=0, bucket=True)
    pad = lambda s: np.mean([(s.next_batch()[0] == tokenizer.padding_idx).float().mean().item() for _ in range(20)])
    assert pad(bucketed) < 0.5 * pad(plain)


def test_binary_metrics_against_sklearn():
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef, precision_score, recall_score

    rng = np.random.default_rng(0)
    y = rng.random(2000) < 0.1
    p = np.clip(y * 0.4 + rng.random(2000) * 0.7, 0, 1)
    m = binary_metrics(y, p, 0.5)
    pred = p >= 0.5
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert m["precision"] == pytest.approx(precision_score(y, pred))
    assert m["recall"] == pytest.approx(recall_score(y, pred))
    assert m["f1"] == pytest.approx(f1_score(y, pred))
    assert m["mcc"] == pytest.approx(matthews_corrcoef(y, pred))
    assert 0.5 < m["auroc"] <= 1 and 0.1 < m["auprc"] <= 1


def test_metrics_edge_cases():
    m = binary_metrics(np.zeros(10), np.zeros(10))
    assert m["precision"] == 0 and m["f1"] == 0 and m["accuracy"] == 1 and np.isnan(m["auroc"])
    y = np.array([0, 0, 1, 1])
    assert best_f1_threshold(y, np.array([0.1, 0.3, 0.35, 0.9])) == pytest.approx(0.35)
