"""The shipped real sets (GPSite), names for them, long-chain tiling, the field's metrics and the baseline."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from fedesm.cli import main
from fedesm.data.batching import Tokenizer, tile_windows
from fedesm.data.catalog import SETS, list_sets, parse_name, resolve
from fedesm.data.readers import read_records
from fedesm.data.records import Record
from fedesm.errors import DataError, FedesmError
from fedesm.evaluation.metrics import binary_metrics, metrics_with_val_threshold

REPO = Path(__file__).resolve().parents[2]
SOURCE_MD = REPO / "data" / "gpsite" / "SOURCE.md"


def _source_table() -> dict[str, dict]:
    """The counts table of data/gpsite/SOURCE.md, per set: (seqs, residues, positive %) for train and test."""
    rows = {}
    for line in SOURCE_MD.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 8 and cells[0] in SETS:
            num = lambda c: int(c.replace(",", ""))  # noqa: E731
            pct = lambda c: float(c.rstrip("%"))  # noqa: E731
            rows[cells[0]] = {"train": (num(cells[2]), num(cells[3]), pct(cells[4])),
                              "test": (num(cells[5]), num(cells[6]), pct(cells[7]))}
    return rows


def test_source_md_lists_all_six_sets():
    assert set(_source_table()) == {"ATP", "HEM", "DNA", "RNA", "PEP", "PRO"}
    assert (REPO / "data" / "gpsite" / "LICENSE").read_text().startswith("MIT License")


@pytest.mark.parametrize("name", sorted(SETS))
@pytest.mark.parametrize("split", ["train", "test"])
def test_every_shipped_file_reads_with_the_counts_of_source_md(name, split):
    want_seqs, want_res, want_pct = _source_table()[name][split]
    records = read_records(f"gpsite:{name}:{split}")
    n_res = sum(len(r) for r in records)
    n_pos = sum(r.n_positive for r in records)
    assert (len(records), n_res) == (want_seqs, want_res)
    assert round(100 * n_pos / n_res, 1) == want_pct
    assert len({r.id for r in records}) == len(records)
    assert all(set(r.sequence) <= set("ACDEFGHIKLMNPQRSTVWY") for r in records)
    assert max(len(r) for r in records) <= 1500


def test_names_resolve_and_bad_names_say_what_exists():
    assert resolve("gpsite:ATP") == resolve("gpsite:atp:train") == REPO / "data/gpsite/ATP_train.txt.gz"
    assert parse_name("gpsite:PRO:test")[1] == "test"
    assert resolve("some/file.fa") == "some/file.fa"  # not a name: unchanged
    for bad in ("gpsite:XYZ", "gpsite:ATP:val", "gpsite:ATP:test:x"):
        with pytest.raises(DataError, match="gpsite:ATP, gpsite:HEM"):
            resolve(bad)
    assert len(list_sets()) == 12


def test_data_dir_env_var_moves_the_catalogue(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDESM_DATA_DIR", str(tmp_path))
    with pytest.raises(DataError, match="FEDESM_DATA_DIR"):
        resolve("gpsite:ATP")
    (tmp_path / "gpsite").mkdir()
    (tmp_path / "gpsite" / "ATP_train.txt.gz").write_bytes((REPO / "data/gpsite/ATP_train.txt.gz").read_bytes())
    assert len(read_records("gpsite:ATP")) == 347


def test_cli_data_list(capsys):
    assert main(["data", "list"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"gpsite:ATP\s+ATP\s+train\s+347\s+130,655\s+3\.9%\s+1,494", out)
    assert re.search(r"gpsite:PRO:test\s+protein\s+test\s+375\s+78,475\s+14\.6%", out)
    assert "MIT" in out
    assert main(["data", "list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["name"] for r in rows} >= {"gpsite:DNA", "gpsite:DNA:test"}
    assert next(r for r in rows if r["name"] == "gpsite:HEM")["sequences"] == 176


def test_cli_takes_names_where_it_takes_paths(tmp_path, capsys):
    assert main(["data", "validate", "gpsite:HEM:test"]) == 0
    assert "sequences          48" in capsys.readouterr().out
    assert main(["data", "split", "gpsite:HEM", "--sites", "2", "--out", str(tmp_path / "s")]) == 0
    split = json.loads((tmp_path / "s" / "split.json").read_text())
    total = split["val"]["sequences"] + split["test"]["sequences"] + sum(
        v["train"]["sequences"] + v["val"]["sequences"] for v in split["sites"].values())
    assert total == 176
    assert main(["data", "validate", "gpsite:NOPE"]) == 2
    assert "unknown shipped set" in capsys.readouterr().err


def test_shipped_names_are_public_so_the_site_allow_list_does_not_apply(tmp_path):
    from fedesm import storage

    policy = storage.AccessPolicy([str(tmp_path)])
    assert storage.fetch("gpsite:ATP:test", tmp_path, policy=policy).name == "ATP_test.txt.gz"
    with pytest.raises(Exception, match="not allowed|outside"):
        storage.fetch(str(REPO / "data/gpsite/ATP_test.txt.gz"), tmp_path, policy=policy)


# ------------------------------------------------------------------------------ long chains


@pytest.mark.parametrize("n,max_len", [(1500, 1022), (1500, 1000), (1000, 100), (257, 64), (65, 64), (64, 64), (3, 64)])
def test_tile_cores_partition_every_chain(n, max_len):
    windows = tile_windows([n], max_len)
    scored = np.zeros(n, int)
    for w in windows:
        assert 0 <= w.start <= w.keep_start < w.keep_end <= w.end <= n and w.end - w.start <= max_len
        scored[w.keep_start : w.keep_end] += 1
        if w.keep_start > 0:  # a residue scored away from the chain start has context on its left
            assert w.keep_start - w.start >= (max_len // 4) // 2 - 1
        if w.keep_end < n:
            assert w.end - w.keep_end >= (max_len // 4) // 2 - 1
    assert (scored == 1).all()


def test_a_1500_residue_chain_is_scored_once_per_residue_by_its_window(tiny_checkpoint):
    """Every residue's probability is the model's output for it in exactly one window (tiling), no average."""
    import torch

    from fedesm.model.adapters import build_lora_model
    from fedesm.model.backbone import load_backbone
    from fedesm.settings import LoraSettings
    from fedesm.evaluation.scoring import evaluate_probabilities
    from fedesm.training.inference import predict_proba

    backbone = load_backbone(str(tiny_checkpoint))
    model = build_lora_model(backbone, LoraSettings(r=4), seed=0).eval()
    tok = Tokenizer(backbone.alphabet)
    rng = np.random.default_rng(0)
    seq = "".join(rng.choice(list("ACDEFGHIKLMNPQRSTVWY"), 1500))
    labels = (rng.random(1500) < 0.05).astype(np.uint8)
    probs = predict_proba(model, tok, [seq, "MKV"], max_len=1022, batch_tokens=4096)
    assert probs[0].shape == (1500,) and np.isfinite(probs[0]).all() and probs[1].shape == (3,)
    expected = np.full(1500, np.nan)
    windows = [w for w in tile_windows([1500], 1022)]
    assert len(windows) == 2
    with torch.no_grad():
        for w in windows:
            tokens, _ = tok.collate([(seq[w.start : w.end], None)])
            p = torch.softmax(model(tokens).float(), -1)[0, 1 : w.end - w.start + 1, 1].numpy()
            expected[w.keep_start : w.keep_end] = p[w.keep_start - w.start : w.keep_end - w.start]
    np.testing.assert_allclose(probs[0], expected, atol=1e-5)
    m = evaluate_probabilities([Record("long", seq, labels)], probs[:1])
    assert m["residues"] == 1500 and m["positives"] == int(labels.sum())


def test_max_len_beyond_esm2_window_is_refused(tiny_checkpoint, synth_data):
    from fedesm.model.adapters import build_lora_model
    from fedesm.model.backbone import load_backbone
    from fedesm.settings import LoraSettings, TrainConfig
    from fedesm.training.inference import predict_proba

    with pytest.raises(FedesmError, match="training.max_len: ESM-2 takes 1 to 1022 residues"):
        TrainConfig(max_len=1500)
    backbone = load_backbone(str(tiny_checkpoint))
    model = build_lora_model(backbone, LoraSettings(r=4), seed=0)
    with pytest.raises(ValueError, match="1 to 1022 residues"):  # and where a window length is given directly
        predict_proba(model, Tokenizer(backbone.alphabet), ["ACD"], 1500)


# ------------------------------------------------------------------------------ metrics


Y = np.array([0, 0, 1, 1, 0, 1, 0, 0, 1, 0, 0, 0], dtype=np.uint8)
P = np.array([0.10, 0.40, 0.35, 0.80, 0.20, 0.70, 0.65, 0.05, 0.45, 0.30, 0.55, 0.15])


def test_metrics_match_scikit_learn_on_fixed_arrays():
    from sklearn.metrics import (accuracy_score, average_precision_score, f1_score, matthews_corrcoef,
                                 precision_score, recall_score, roc_auc_score)

    for thr in (0.5, 0.3, 0.42):
        m = binary_metrics(Y, P, thr)
        pred = P >= thr
        assert m["accuracy"] == pytest.approx(accuracy_score(Y, pred))
        assert m["precision"] == pytest.approx(precision_score(Y, pred))
        assert m["recall"] == pytest.approx(recall_score(Y, pred))
        assert m["f1"] == pytest.approx(f1_score(Y, pred))
        assert m["mcc"] == pytest.approx(matthews_corrcoef(Y, pred))
    assert m["auroc"] == pytest.approx(roc_auc_score(Y, P))
    assert m["auprc"] == pytest.approx(average_precision_score(Y, P))
    # by hand: 4 positives, 8 negatives; positive-negative pairs ranked right = 5 + 8 + 8 + 6 of 32
    assert m["auroc"] == pytest.approx(27 / 32)
    assert binary_metrics(Y, P, 0.5)["f1"] == pytest.approx(2 * (2 / 4) * (2 / 4) / 1.0)  # tp 2, fp 2, fn 2


def test_threshold_tuned_on_validation_is_applied_to_test():
    from sklearn.metrics import f1_score, matthews_corrcoef

    val_y, val_p = Y, P
    test_y = np.array([1, 0, 0, 1, 0, 0, 1, 0], dtype=np.uint8)
    test_p = np.array([0.36, 0.2, 0.5, 0.9, 0.1, 0.38, 0.3, 0.6])
    m = metrics_with_val_threshold(val_y, val_p, test_y, test_p)
    # F1 on val is best when calling P >= 0.35 (tp 4, fp 3: F1 8/11) -> that threshold, then applied to test
    assert m["threshold_tuned"] == pytest.approx(0.35)
    assert m["f1"] == pytest.approx(0.5)  # val, at 0.5
    pred = test_p >= 0.35
    assert m["test_f1_tuned"] == pytest.approx(f1_score(test_y, pred))
    assert m["test_mcc_tuned"] == pytest.approx(matthews_corrcoef(test_y, pred))
    assert m["test_f1"] == pytest.approx(f1_score(test_y, test_p >= 0.5))
    assert set(m) >= {"test_auroc", "test_auprc", "test_precision_tuned", "test_recall_tuned", "auroc"}
    assert "test_auroc_tuned" not in m  # ranking metrics do not depend on a threshold


# ------------------------------------------------------------------------------ losses


def test_focal_loss_and_class_weights():
    import torch
    import torch.nn.functional as F

    from fedesm.training.losses import token_losses

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 2, generator=g)
    labels = torch.randint(0, 2, (3, 7), generator=g)
    labels[0, 0] = labels[2, 6] = -100
    w = torch.tensor([0.6, 3.0])
    losses, weights = token_losses(logits, labels, w)
    ref = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), weight=w, ignore_index=-100)
    assert (losses.sum() / weights.sum()).item() == pytest.approx(ref.item(), rel=1e-6)
    focal, _ = token_losses(logits, labels, None, focal_gamma=2.0)
    ce, _ = token_losses(logits, labels, None)
    p_t = torch.softmax(logits, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(focal, ce * (1 - p_t) ** 2, atol=1e-6)
    assert focal[0, 0] == 0 and (focal <= ce + 1e-7).all()


# ------------------------------------------------------------------------------ the reference baseline


def test_window_features_encode_the_neighbourhood():
    from fedesm.evaluation.reference import window_features

    x = window_features("ACD", half_window=1).toarray()
    assert x.shape == (3, 3 * 21) and (x.sum(1) == 3).all()
    # residue 0 ("A"): left neighbour outside the chain (symbol 20), itself A (0), right neighbour C (1)
    assert x[0, 0 * 21 + 20] == 1 and x[0, 1 * 21 + 0] == 1 and x[0, 2 * 21 + 1] == 1
    assert x[2, 2 * 21 + 20] == 1  # right of the last residue: outside


def test_baseline_learns_a_motif_and_scores_real_atp_above_chance():
    from fedesm.evaluation.reference import WindowLogReg
    from fedesm.data.synth import synth_records

    recs = synth_records(n=200, n_families=10, pos_rate=0.1, min_len=60, max_len=200, seed=0)
    model = WindowLogReg().fit(recs[:150])
    y = np.concatenate([r.labels for r in recs[150:]])
    p = np.concatenate(model.predict_proba([r.sequence for r in recs[150:]]))
    assert binary_metrics(y, p)["auroc"] > 0.9

    train, test = read_records("gpsite:ATP"), read_records("gpsite:ATP:test")
    model = WindowLogReg().fit(train)
    probs = model.predict_proba([r.sequence for r in test])
    assert [len(p) for p in probs] == [len(r) for r in test]
    m = binary_metrics(np.concatenate([r.labels for r in test]), np.concatenate(probs))
    assert 0.65 < m["auroc"] < 0.8 and m["auprc"] > 0.1  # measured 0.712 / 0.153; chance is 0.5 / 0.031
