"""The experiment report on a small hand-written run folder: the numbers in its tables are right."""

from __future__ import annotations

import json

import pytest
import yaml

from fedesm.errors import FedesmError
from fedesm.experiments.report import build_report, human_bytes, rounds_to_target


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _site_row(rnd, site, f1, gf1, eps=None, sent=None):
    row = {"round": rnd, "site": site, "global_f1": gf1, "global_precision": gf1 + 0.1, "global_recall": gf1 - 0.1,
           "global_accuracy": 0.9, "global_auprc": gf1 / 2}
    if rnd > 0:
        row.update(f1=f1, precision=f1, recall=f1, accuracy=0.9, train_seconds=2.0 if site == "site-1" else 3.0)
        row.update(sent_bytes=sent, sent_parameters=1000)
        if eps is not None:
            row["epsilon"] = eps
    return row


@pytest.fixture()
def run_dir(tmp_path):
    run = tmp_path / "run"
    (run / "e1" / "fed").mkdir(parents=True)
    (run / "e1" / "central").mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({
        "name": "t", "title": "Test run", "caption": "SYNTHETIC test numbers", "status": "done",
        "plan": ["plan line"], "wall_seconds": 321.0, "started": "a", "finished": "b"}))
    (run / "config.yaml").write_text(yaml.safe_dump({"name": "t", "experiments": [{"id": "e1"}]}))
    (run / "e1" / "experiment.json").write_text(json.dumps({"id": "e1", "title": "Experiment one",
                                                            "arms": ["fed", "central"]}))
    training = {"dp_noise_multiplier": 1.0, "dp_max_grad_norm": 1.0, "dp_delta": 1e-5, "grad_noise_std": 0.0}
    (run / "e1" / "fed" / "arm.json").write_text(json.dumps({
        "id": "fed", "label": "FRA-LoRA", "kind": "federated", "strategy": "fra", "status": "done",
        "wall_seconds": 100.4, "training": training}))
    _jsonl(run / "e1" / "fed" / "metrics.jsonl", [
        _site_row(0, "site-1", None, 0.10), _site_row(0, "site-2", None, 0.12),
        {"round": 1, "site": "server", "round_seconds": 10.0},
        _site_row(1, "site-1", 0.50, 0.45, eps=1.5, sent=1024), _site_row(1, "site-2", 0.40, 0.52, eps=1.7, sent=2048),
        {"round": 2, "site": "server", "round_seconds": 14.0},
        _site_row(2, "site-1", 0.70, 0.66, eps=2.5, sent=1024), _site_row(2, "site-2", 0.60, 0.58, eps=3.1, sent=4096),
    ])
    _jsonl(run / "e1" / "fed" / "heldout.jsonl", [
        {"arm": "fed", "site": "held-out", "round": 0, "split": "val", "f1": 0.10, "precision": 0.1, "recall": 0.1,
         "accuracy": 0.5, "auprc": 0.1},
        {"arm": "fed", "site": "held-out", "round": 1, "split": "val", "f1": 0.60, "precision": 0.7, "recall": 0.5,
         "accuracy": 0.9, "auprc": 0.6},
        {"arm": "fed", "site": "held-out", "round": 2, "split": "val", "f1": 0.55, "precision": 0.65, "recall": 0.48,
         "accuracy": 0.91, "auprc": 0.62},
        {"arm": "fed", "site": "held-out", "round": 2, "split": "test", "f1": 0.44, "precision": 0.5, "recall": 0.4,
         "accuracy": 0.88, "auroc": 0.75, "auprc": 0.5, "mcc": 0.3, "f1_tuned": 0.52, "mcc_tuned": 0.45,
         "precision_tuned": 0.5, "recall_tuned": 0.54, "threshold_tuned": 0.3},
    ])
    (run / "e1" / "fed" / "test_pr_curve.json").write_text(json.dumps({"precision": [0.04, 0.5, 1.0],
                                                                     "recall": [1.0, 0.5, 0.0]}))
    (run / "e1" / "reference.json").write_text(json.dumps({
        "model": "logistic regression on one-hot windows of +-7 residues (scikit-learn)", "test_auroc": 0.7,
        "test_auprc": 0.4, "test_f1_tuned": 0.45, "test_mcc_tuned": 0.35, "test_precision_tuned": 0.4,
        "test_recall_tuned": 0.5, "threshold_tuned": 0.2, "test_f1": 0.1, "test_mcc": 0.05,
        "test_positive_fraction": 0.04, "pr_curve": {"precision": [0.04, 0.4, 1.0], "recall": [1.0, 0.4, 0.0]}}))
    (run / "e1" / "central" / "arm.json").write_text(json.dumps({
        "id": "central", "label": "centralized", "kind": "centralized", "status": "done", "wall_seconds": 50.0,
        "training": {"dp_noise_multiplier": 0.0, "grad_noise_std": 0.0}}))
    _jsonl(run / "e1" / "central" / "metrics.jsonl", [
        {"arm": "central", "site": "central", "round": r, "f1": f, "train_seconds": 4.0 if r else None}
        for r, f in ((0, 0.2), (1, 0.4), (2, 0.7))])
    _jsonl(run / "e1" / "central" / "heldout.jsonl", [
        {"arm": "central", "site": "held-out", "round": r, "split": "val", "f1": f, "precision": f, "recall": f,
         "accuracy": 0.8, "auprc": a} for r, f, a in ((0, 0.2, None), (1, 0.4, 0.3), (2, 0.7, 0.55))] + [
        {"arm": "central", "site": "held-out", "round": 2, "split": "test", "f1": 0.5, "auroc": 0.8, "auprc": 0.6,
         "f1_tuned": 0.55, "mcc_tuned": 0.5, "precision_tuned": 0.6, "recall_tuned": 0.5, "threshold_tuned": 0.4,
         "mcc": 0.4}])
    return run


def _table(md: str, first_header: str, column: str = "") -> list[dict]:
    """Rows of the first markdown table whose header starts with `| first_header |` and has `column`."""
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines)
                 if line.startswith(f"| {first_header} |") and f"| {column}" in line)
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(header, (c.strip() for c in line.strip("|").split("|")))))
    return rows


def test_heldout_table_numbers(run_dir):
    md = build_report(run_dir).read_text()
    assert "SYNTHETIC test numbers" in md
    rows = {r["arm"]: r for r in _table(md, "arm", "final F1")}
    fed, central = rows["FRA-LoRA (fra)"], rows["centralized"]
    assert fed["final F1"] == "**0.550**"
    assert fed["best F1 (round)"] == "0.600 (r1)"
    assert (fed["precision"], fed["recall"], fed["accuracy"], fed["AUPRC"]) == ("0.650", "0.480", "0.910", "0.620")
    assert fed["rounds to F1 ≥ 0.5"] == "1"
    assert fed["test F1"] == "0.440"
    assert fed["wall time"] == "100 s"
    assert fed["sent / site / round"] == "2.0 KiB"  # mean of 1024, 1024, 2048, 4096 bytes
    assert fed["ε spent (worst site)"] == "3.10 (δ=1e-05)"
    assert central["final F1"] == "**0.700**" and central["best F1 (round)"] == "0.700 (r2)"
    assert central["rounds to F1 ≥ 0.5"] == "2"
    assert central["AUPRC"] == "0.550" and central["ε spent (worst site)"] == "–" and central["test F1"] == "0.500"
    assert "AUPRC -0.100 vs centralized" in md  # test AUPRC 0.5 - 0.6


def test_test_table_puts_the_reference_beside_the_arms(run_dir):
    md = build_report(run_dir).read_text()
    rows = {r["arm"]: r for r in _table(md, "arm", "F1@thr")}
    fed, central = rows["FRA-LoRA"], rows["centralized"]
    base = rows["*reference: logistic regression, one-hot ±7 window*"]
    assert (fed["AUROC"], fed["AUPRC"], fed["F1@thr"], fed["MCC@thr"], fed["thr"], fed["F1@0.5"]) == (
        "0.750", "0.500", "0.520", "0.450", "0.300", "0.440")
    assert (central["AUROC"], central["AUPRC"], central["precision@thr"]) == ("0.800", "0.600", "0.600")
    assert (base["AUROC"], base["AUPRC"], base["F1@thr"], base["recall@thr"], base["thr"]) == (
        "0.700", "0.400", "0.450", "0.500", "0.200")
    assert "positive rate, 4.0%" in md
    assert "reference, logistic regression on one-hot windows of +-7 residues (scikit-learn): test AUROC 0.700" in md
    assert (run_dir / "plots" / "e1_test_pr_curves.png").is_file()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["experiments"]["e1"]["arms"]["fed"]["test_final"]["f1_tuned"] == 0.52


def test_site_table_numbers(run_dir):
    md = build_report(run_dir).read_text()
    sites = {r["site"]: r for r in _table(md, "arm", "site")}
    s1, s2 = sites["site-1"], sites["site-2"]
    assert s1["global F1 final"] == "**0.660**" and s2["global F1 final"] == "**0.580**"
    assert s1["best (round)"] == "0.660 (r2)"
    assert s1["precision"] == "0.760" and s1["recall"] == "0.560"
    assert s1["rounds to F1 ≥ 0.5"] == "2" and s2["rounds to F1 ≥ 0.5"] == "1"
    assert s1["local model F1 final"] == "0.700"
    assert s1["sent / round"] == "1.0 KiB" and s2["sent / round"] == "3.0 KiB"
    assert s1["parameters sent"] == "1,000"
    assert (s1["ε spent"], s2["ε spent"]) == ("2.50", "3.10")


def test_round_table_time_and_summary(run_dir):
    md = build_report(run_dir).read_text()
    rounds = _table(md, "round")
    assert [r["round"] for r in rounds] == ["0", "1", "2"]
    assert rounds[1]["FRA-LoRA"] == "0.600" and rounds[1]["centralized"] == "0.300"  # AUPRC per round
    times = {r["arm"]: r for r in _table(md, "arm", "training s / round")}
    assert times["FRA-LoRA"]["training s / round"] == "3.0 s"  # the slower site, each round
    assert times["FRA-LoRA"]["round wall time"] == "12 s"
    assert times["centralized"]["training s / round"] == "4.0 s"
    summary = json.loads((run_dir / "summary.json").read_text())
    fed = summary["experiments"]["e1"]["arms"]["fed"]
    assert fed["heldout_val_final"]["f1"] == 0.55 and fed["heldout_rounds_to_target_f1"] == 1
    assert fed["sites"]["site-2"]["epsilon"] == 3.1 and fed["epsilon"] == 3.1


def test_target_f1_and_other_output_folder(run_dir, tmp_path):
    out = tmp_path / "docs"
    md = build_report(run_dir, target_f1=0.65, out_dir=out).read_text()
    rows = {r["arm"]: r for r in _table(md, "arm", "final F1")}
    assert rows["FRA-LoRA (fra)"]["rounds to F1 ≥ 0.65"] == "not reached"
    assert rows["centralized"]["rounds to F1 ≥ 0.65"] == "2"
    pngs = sorted((out / "plots").glob("*.png"))
    assert {p.name for p in pngs} >= {"e1_arms_f1.png", "e1_fed_f1.png", "e1_fed_accuracy.png",
                                      "e1_fed_precision_recall.png"}
    assert all(p.stat().st_size < 200_000 for p in pngs)
    for p in pngs:
        assert f"(plots/{p.name})" in md
    assert not (run_dir / "report.md").exists()


def test_failed_arm_is_reported(run_dir):
    info = json.loads((run_dir / "e1" / "central" / "arm.json").read_text())
    info.update(status="failed", error="nvflare simulator failed (exit 1)")
    (run_dir / "e1" / "central" / "arm.json").write_text(json.dumps(info))
    md = build_report(run_dir).read_text()
    assert "**failed**: nvflare simulator failed (exit 1)" in md
    assert "vs centralized" not in md


def test_helpers_and_errors(tmp_path):
    assert rounds_to_target([{"round": 0, "f1": 0.1}, {"round": 3, "f1": 0.5}, {"round": 2, "f1": 0.6}], 0.5) == 2
    assert rounds_to_target([{"round": 1, "f1": None}], 0.5) is None
    assert human_bytes(512) == "512 B" and human_bytes(3 * 1024 * 1024) == "3.0 MiB"
    with pytest.raises(FedesmError, match="no run.json"):
        build_report(tmp_path)
