"""The experiment report on a small hand-written run folder (2 seeds): the numbers in its tables are right."""

from __future__ import annotations

import json

import pytest
import yaml

from fedesm.errors import FedesmError
from fedesm.experiments.numbers import rounds_to_target, spread, verdict
from fedesm.experiments.report import build_report, human_bytes


def _jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _site_row(rnd, site, auprc, g_auprc, eps=None, sent=None):
    row = {"round": rnd, "site": site, "global_f1": g_auprc, "global_auprc": g_auprc, "global_auroc": 0.7}
    if rnd > 0:
        row.update(f1=auprc, precision=auprc, recall=auprc, accuracy=0.9, auprc=auprc, auroc=0.7,
                   train_seconds=2.0 if site == "site-1" else 3.0, sent_bytes=sent, sent_parameters=1000)
        if eps is not None:
            row["epsilon"] = eps
    return row


def _held(arm, rounds, test, model=None):
    """Held-out rows: val AUPRC per round, and the final model's test metrics."""
    rows = [{"arm": arm, "site": "held-out", "round": r, "split": "val", "auprc": a, "auroc": a + 0.4, "f1": a,
             "precision": a, "recall": a} for r, a in rounds]
    rows.append({"arm": arm, "site": "held-out", "round": rounds[-1][0], "split": "test", "f1": 0.4, "mcc": 0.3,
                 "f1_tuned": test["f1_tuned"], "mcc_tuned": 0.3, "precision_tuned": 0.5, "recall_tuned": 0.5,
                 "threshold_tuned": 0.3, **test})
    if model:
        for r in rows:
            r["model"] = model
    return rows


FED_TEST = {0: {"auroc": 0.70, "auprc": 0.10, "f1_tuned": 0.20}, 1: {"auroc": 0.72, "auprc": 0.12, "f1_tuned": 0.22}}
CEN_TEST = {0: {"auroc": 0.71, "auprc": 0.11, "f1_tuned": 0.21}, 1: {"auroc": 0.71, "auprc": 0.13, "f1_tuned": 0.23}}
C2X_TEST = {0: {"auroc": 0.80, "auprc": 0.20, "f1_tuned": 0.30}, 1: {"auroc": 0.82, "auprc": 0.22, "f1_tuned": 0.32}}
ALONE_TEST = {("site-1", 0): 0.60, ("site-1", 1): 0.62, ("site-2", 0): 0.65, ("site-2", 1): 0.69}


@pytest.fixture()
def run_dir(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({
        "name": "t", "title": "Test run", "caption": "SYNTHETIC test numbers", "status": "done",
        "plan": ["plan line"], "wall_seconds": 321.0, "started": "a", "finished": "b"}))
    (run / "config.yaml").write_text(yaml.safe_dump({"name": "t", "seeds": [0, 1], "experiments": [{"id": "e1"}]}))
    (run / "e1").mkdir()
    (run / "e1" / "experiment.json").write_text(json.dumps({"id": "e1", "title": "Experiment one",
                                                            "arms": ["fed", "central", "central2x", "alone"]}))
    base = {"dp_noise_multiplier": 1.0, "dp_max_grad_norm": 1.0, "dp_delta": 1e-5, "grad_noise_std": 0.0,
            "class_weights": "balanced", "focal_gamma": 0.0, "steps_per_round": 10}
    for seed in (0, 1):
        d = run / "e1" / "fed" / f"seed_{seed}"
        d.mkdir(parents=True)
        (d / "arm.json").write_text(json.dumps({"id": "fed", "label": "FRA-LoRA", "kind": "federated",
                                                "strategy": "fra", "status": "done", "seed": seed,
                                                "wall_seconds": 100.0 + seed, "training": base}))
        _jsonl(d / "metrics.jsonl", [
            _site_row(0, "site-1", None, 0.10), _site_row(0, "site-2", None, 0.12),
            {"round": 1, "site": "server", "round_seconds": 10.0},
            _site_row(1, "site-1", 0.50, 0.45, eps=1.5 + seed, sent=1024),
            _site_row(1, "site-2", 0.40, 0.52, eps=1.7 + seed, sent=2048)])
        _jsonl(d / "heldout.jsonl", _held("fed", [(0, 0.05), (1, 0.10 + seed / 10)], FED_TEST[seed]))
        (d / "test_pr_curve.json").write_text(json.dumps({"precision": [0.04, 0.5, 1.0], "recall": [1.0, 0.5, 0.0]}))
        for arm, label, test, steps in (("central", "centralized", CEN_TEST, 10), ("central2x", "centralized 2N",
                                                                                   C2X_TEST, 20)):
            d = run / "e1" / arm / f"seed_{seed}"
            d.mkdir(parents=True)
            (d / "arm.json").write_text(json.dumps({"id": arm, "label": label, "kind": "centralized",
                                                    "status": "done", "seed": seed, "wall_seconds": 50.0,
                                                    "training": {**base, "steps_per_round": steps}}))
            _jsonl(d / "metrics.jsonl", [{"arm": arm, "site": arm, "round": r, "train_seconds": 4.0 if r else None}
                                         for r in (0, 1)])
            _jsonl(d / "heldout.jsonl", _held(arm, [(0, 0.05), (1, 0.3)], test[seed]))
        d = run / "e1" / "alone" / f"seed_{seed}"
        d.mkdir(parents=True)
        (d / "arm.json").write_text(json.dumps({"id": "alone", "label": "site alone", "kind": "site-alone",
                                                "status": "done", "seed": seed, "wall_seconds": 60.0,
                                                "training": base}))
        _jsonl(d / "heldout.jsonl", [row for site in ("site-1", "site-2") for row in _held(
            "alone", [(0, 0.05), (1, 0.2)], {"auroc": ALONE_TEST[(site, seed)], "auprc": 0.05, "f1_tuned": 0.1}, site)])
        _jsonl(run / "e1" / f"seed_{seed}" / "reference.json", [])
        (run / "e1" / f"seed_{seed}" / "reference.json").write_text(json.dumps({
            "model": "logistic regression on one-hot windows of +-7 residues (scikit-learn)",
            "test_auroc": 0.7 + seed / 100, "test_auprc": 0.4, "test_f1_tuned": 0.45, "test_mcc_tuned": 0.35,
            "test_precision_tuned": 0.4, "test_recall_tuned": 0.5, "threshold_tuned": 0.2, "test_f1": 0.1,
            "test_positive_fraction": 0.04, "pr_curve": {"precision": [0.04, 0.4, 1.0], "recall": [1.0, 0.4, 0.0]}}))
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


def test_test_table_gives_mean_and_spread_over_seeds_beside_the_reference(run_dir):
    md = build_report(run_dir).read_text()
    assert "SYNTHETIC test numbers" in md and "seeds 0, 1" in md
    rows = {r["arm"]: r for r in _table(md, "arm", "AUROC per seed")}
    fed = rows["FRA-LoRA"]
    assert fed["seeds"] == "2" and fed["AUROC"] == "0.710 ± 0.014" and fed["AUROC per seed"] == "0.700 / 0.720"
    assert fed["AUPRC"] == "0.110 ± 0.014" and fed["F1@thr"] == "0.210 ± 0.014"
    assert rows["centralized"]["AUROC"] == "0.710 ± 0.000"
    # a site-alone arm is one row per site
    assert rows["site-1 alone"]["AUROC"] == "0.610 ± 0.014" and rows["site-2 alone"]["AUROC per seed"] == "0.650 / 0.690"
    ref = rows["*reference: logistic regression, one-hot ±7 window*"]
    assert ref["AUROC"] == "0.705 ± 0.007" and ref["AUPRC"] == "0.400 ± 0.000"
    assert "positive rate, 4.0%" in md


def test_comparisons_are_paired_by_seed_with_a_verdict(run_dir):
    md = build_report(run_dir).read_text()
    rows = {(r["arm"], r["centralized arm"]): r for r in _table(md, "arm", "centralized arm")}
    equal = rows[("FRA-LoRA", "centralized (equal steps)")]
    assert equal["Δ AUROC"] == "+0.000 ± 0.014" and equal["AUROC"] == "level"  # -0.01, +0.01
    matched = rows[("FRA-LoRA", "centralized 2N (2x the steps per round)")]
    assert matched["Δ AUROC"] == "-0.100 ± 0.000" and matched["AUROC"] == "behind"
    alone = {r["site alone"]: r for r in _table(md, "federated arm", "site alone")}
    assert alone["site-1 alone"]["Δ AUROC"] == "+0.100 ± 0.000" and alone["site-1 alone"]["AUROC"] == "ahead"
    assert alone["site-2 alone"]["Δ AUROC"] == "+0.040 ± 0.014" and alone["site-2 alone"]["AUROC"] == "ahead"
    assert "level with centralized (Δ AUROC +0.000 ± 0.014)" in md  # the key results say it in words
    assert "behind centralized 2N (Δ AUROC -0.100 ± 0.000)" in md
    summary = json.loads((run_dir / "summary.json").read_text())
    cmp_ = {(c["arm"], c["against"]): c for c in summary["experiments"]["e1"]["comparisons"]}
    assert cmp_[("fed", "central2x")]["auroc"]["verdict"] == "behind"


def test_heldout_site_and_round_tables(run_dir):
    md = build_report(run_dir).read_text()
    held = {r["arm"]: r for r in _table(md, "arm", "final AUPRC")}
    assert held["FRA-LoRA (fra)"]["final AUPRC"] == "**0.150 ± 0.071**"  # 0.10, 0.20
    assert held["FRA-LoRA (fra)"]["sent / site / round"] == "1.5 KiB"
    assert held["FRA-LoRA (fra)"]["ε spent (worst site, mean)"] == "2.20 (δ=1e-05)"  # 1.7, 2.7
    sites = {r["site"]: r for r in _table(md, "arm", "site")}
    assert sites["site-1"]["global model AUPRC"] == "**0.450 ± 0.000**" and sites["site-2"]["sent / round"] == "2.0 KiB"
    assert sites["site-2"]["ε spent"] == "2.20 ± 0.71"
    rounds = _table(md, "round")
    assert [r["round"] for r in rounds] == ["0", "1"]
    assert rounds[1]["FRA-LoRA"] == "0.150" and rounds[1]["centralized"] == "0.300"
    times = {r["arm"]: r for r in _table(md, "arm", "training s / round")}
    assert times["FRA-LoRA"]["training s / round"] == "3.0 s" and times["FRA-LoRA"]["round wall time"] == "10 s"


def test_plots_and_other_output_folder(run_dir, tmp_path):
    out = tmp_path / "docs"
    md = build_report(run_dir, out_dir=out).read_text()
    pngs = sorted((out / "plots").glob("*.png"))
    assert {p.name for p in pngs} >= {"e1_arms_auprc.png", "e1_test_pr_curves.png", "e1_fed_f1.png"}
    assert all(p.stat().st_size < 200_000 for p in pngs)
    for p in pngs:
        assert f"(plots/{p.name})" in md
    assert not (run_dir / "report.md").exists()


def test_failed_arm_is_reported(run_dir):
    for seed in (0, 1):
        path = run_dir / "e1" / "central" / f"seed_{seed}" / "arm.json"
        info = json.loads(path.read_text())
        info.update(status="failed", error="nvflare simulator failed (exit 1)")
        path.write_text(json.dumps(info))
    md = build_report(run_dir).read_text()
    assert "**failed**: nvflare simulator failed (exit 1)" in md
    assert "(equal steps)" not in md  # nothing is compared with an arm that did not finish


def test_helpers_and_errors(tmp_path):
    assert rounds_to_target([{"round": 0, "f1": 0.1}, {"round": 3, "f1": 0.5}, {"round": 2, "f1": 0.6}], 0.5) == 2
    assert rounds_to_target([{"round": 1, "f1": None}], 0.5) is None
    assert human_bytes(512) == "512 B" and human_bytes(3 * 1024 * 1024) == "3.0 MiB"
    assert spread([1.0]) == 0.0 and spread([]) is None
    assert verdict([0.05, 0.06], 0.01, 0.02) == "ahead" and verdict([0.01, -0.01], 0.02, 0.0) == "level"
    assert verdict([-0.05, -0.04], 0.01, 0.01) == "behind"
    with pytest.raises(FedesmError, match="no run.json"):
        build_report(tmp_path)


def test_findings_of_the_run_are_included_after_the_key_results(run_dir):
    assert "## What the numbers say" not in build_report(run_dir).read_text()
    (run_dir / "findings.md").write_text("Federated is level with centralized here (measured, see below).\n")
    md = build_report(run_dir).read_text()
    assert md.index("## Key results") < md.index("## What the numbers say") < md.index("Federated is level")
