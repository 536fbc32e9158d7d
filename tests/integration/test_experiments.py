"""`fedesm experiment`: presets validate (dry run), and one small config with every kind of arm runs
end to end through `nvflare simulator` (1 round x 5 steps; 3 simulator runs, a few minutes on 2 cores)."""

from __future__ import annotations

import json

import pytest
import yaml

from fedesm.cli import main
from fedesm.training.privacy.accountant import compute_epsilon
from fedesm.errors import FedesmError
from fedesm.experiments.config import load_config, parse_config

SMALL = {
    "name": "small",
    "title": "small end-to-end",
    "caption": "SYNTHETIC",
    "seeds": [0],
    "sites": 2,
    "data": {"synthetic": {"n": 120, "families": 12, "pos_rate": 0.1, "min_len": 60, "max_len": 120},
             "val_frac": 0.15, "test_frac": 0.1, "site_val_frac": 0.2},
    "model": {"arch": "esm2_t2_tiny", "backbone": "random"},
    "lora": {"r": 4, "alpha": 8, "dropout": 0.05},
    "training": {"rounds": 1, "steps_per_round": 5, "batch_size": 4, "lr": 0.003, "max_len": 128},
    "runtime": {"device": "cpu", "cpu_threads": 1, "simulator_timeout": 300},
    "experiments": [
        {"id": "exp1", "title": "IID", "split": "iid", "job": "esm2_fra_lora",
         "arms": [{"id": "fra", "federation": {"strategy": "fra"}}, {"id": "centralized", "kind": "centralized"},
                  {"id": "alone", "kind": "site-alone"}]},
        {"id": "exp2", "title": "skew + noise", "split": "skew", "job": "esm2_fra_lora_skew_dp",
         "training": {"grad_noise_std": 1.0e-4},
         "arms": [{"id": "ffa", "federation": {"strategy": "ffa"}, "training": {"freeze_lora_a": True}},
                  {"id": "centralized", "kind": "centralized"},
                  {"id": "dpsgd",
                   "training": {"grad_noise_std": 0.0, "dp_noise_multiplier": 1.2, "dp_max_grad_norm": 0.5,
                                "dp_delta": 1.0e-4, "class_weights": "1,4"}}]},
    ],
}


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("preset", ["cpu", "paper"])
def test_presets_dry_run(preset, capsys):
    assert main(["experiment", "run", preset, "--dry-run"]) == 0
    out = capsys.readouterr().out
    sims, central = (30, 24) if preset == "cpu" else (18, 15)  # 3 seeds each
    assert f"{sims} simulator run(s), {central} centralized run(s)" in out and "3 seed(s)" in out
    assert "job export(s) accept their settings" in out
    cpu_only = ("central-2b", "fra-slr") if preset == "cpu" else ()
    for arm in ("fra", "fra-ef", "fedit", "ffa", "centralized", "central-2x", "alone", "fra-dpsgd") + cpu_only:
        assert f"- {arm} " in out
    assert "347 labelled sequences + 79 test sequences" in out  # both run on the shipped GPSite ATP set
    if preset == "paper":
        assert "30 rounds x 5000 steps" in out and "r=16" in out and "max_len 1000" in out
    else:
        assert "class_weights balanced" in out and "- fra-keep" in out and "optimizer_state=keep" in out
        assert "- fra-low-rank" in out and "site config: site-1 lora_r 2" in out


def test_config_errors_are_one_line(tmp_path):
    bad = yaml.safe_load(yaml.safe_dump(SMALL))
    bad["experiments"][1]["arms"][0]["training"] = {}
    with pytest.raises(FedesmError, match="ffa trains only LoRA B"):
        parse_config(bad)
    bad = yaml.safe_load(yaml.safe_dump(SMALL))
    bad["training"]["rounds_x"] = 1
    with pytest.raises(FedesmError, match=r"unknown key\(s\) \['rounds_x'\]"):
        parse_config(bad)
    cfg = load_config("cpu", ["training.rounds=2", "experiments.exp2_skew.training.grad_noise_std=0.001"])
    assert cfg.training["rounds"] == 2 and cfg.experiments[1].training["grad_noise_std"] == 0.001
    with pytest.raises(FedesmError, match="no entry with id 'nope'"):
        load_config("cpu", ["experiments.nope.training.rounds=2"])
    bad = yaml.safe_load(yaml.safe_dump(SMALL))
    bad["training"]["lr"] = -1
    with pytest.raises(FedesmError, match="training.lr: the learning rate must be > 0"):
        parse_config(bad)
    bad = yaml.safe_load(yaml.safe_dump(SMALL))
    bad["training"]["seed"] = 3
    with pytest.raises(FedesmError, match="training.seed: set by the experiment for every arm; use the top-level"):
        parse_config(bad)


@pytest.mark.parametrize("job", ["esm2_fra_lora", "esm2_fra_lora_skew_dp", "esm2_cyclic"])
def test_an_experiment_can_use_every_shipped_job(job, capsys):
    """Each job exports with an experiment's settings (the cyclic job once lacked keys and failed here)."""
    cfg = load_config("cpu", [f"experiments.exp1_iid.job={job}"])
    assert cfg.experiments[0].job == job
    from fedesm.experiments.plan import dry_run

    federated = sum(a.kind == "federated" for e in cfg.experiments for a in e.arms)  # one export each
    assert federated >= 9 and f"  checked: {federated} job export(s) accept their settings" in dry_run(cfg)


def test_both_set_flags_parse_values_alike(tmp_path):
    """`experiment run --set` and `job export --set` read a value the same way (YAML): numbers, null,
    booleans, lists, and text."""
    from fedesm.launch.jobs import export_job, read_job_settings

    items = {"training.lr": "1e-3", "training.warmup_steps": "null", "training.freeze_lora_a": "true",
             "training.class_weights": "[1, 9]", "lora.targets": "[q_proj, v_proj]", "training.schedule": "linear"}
    assignments = [f"{k}={v}" for k, v in items.items()]
    cfg = load_config("cpu", assignments)
    job = read_job_settings(export_job("esm2_fra_lora", tmp_path, assignments, include_package=False))
    from fedesm.experiments.config import arm_settings

    exp_side = arm_settings(cfg, cfg.experiments[0], cfg.experiments[0].arms[0], seed=0)
    for key in items:
        block, name = key.split(".")
        assert getattr(getattr(exp_side, block), name) == getattr(getattr(job, block), name), key
    assert job.training.lr == 1e-3 and job.training.warmup_steps is None and job.training.freeze_lora_a is True
    assert job.training.class_weights == [1.0, 9.0] and job.lora.targets == ("q_proj", "v_proj")


@pytest.mark.slow
def test_small_config_runs_every_arm_and_reports(tmp_path, capsys):
    config = tmp_path / "small.yaml"
    config.write_text(yaml.safe_dump(SMALL))
    out = tmp_path / "run"
    assert main(["experiment", "run", str(config), "--out", str(out)]) == 0
    log = capsys.readouterr().out
    assert "[exp1/fra seed 0] round 1/1" in log and "[exp2/centralized seed 0] round 1/1" in log

    split = json.loads((out / "seed_0" / "data" / "skew" / "split.json").read_text())
    round0 = {}
    for exp, arm in (("exp1", "fra"), ("exp1", "centralized"), ("exp1", "alone"), ("exp2", "ffa"),
                     ("exp2", "centralized"), ("exp2", "dpsgd")):
        d = out / exp / arm / "seed_0"
        info = json.loads((d / "arm.json").read_text())
        assert info["status"] == "done" and info["wall_seconds"] > 0 and info["shared_start"]
        held = _rows(d / "heldout.jsonl")
        models = sorted({r.get("model") for r in held}, key=str)
        assert models == (["site-1", "site-2"] if arm == "alone" else [None])
        for m in models:
            mine = [r for r in held if r.get("model") == m]
            assert [r["round"] for r in mine if r["split"] == "val"] == [0, 1]
            assert [r["round"] for r in mine if r["split"] == "test"] == [1]
            assert all(0 <= r["f1"] <= 1 for r in mine)
            test = next(r for r in mine if r["split"] == "test")
            assert 0 <= test["f1_tuned"] <= 1 and 0 <= test["auroc"] <= 1 and 0 < test["threshold_tuned"] < 1
            round0[(exp, arm, m)] = next(r for r in mine if r["round"] == 0 and r["split"] == "val")["auprc"]
        assert (d / ("site-1_test_pr_curve.json" if arm == "alone" else "test_pr_curve.json")).is_file()
    # one shared start: before any training, every arm's model is the same, so it scores the same
    assert len({round(v, 12) for v in round0.values()}) == 1, round0
    # federated metrics: both sites, local + global metrics, bytes sent, and epsilon only under DP-SGD
    for arm in ("fra", "ffa", "dpsgd"):
        exp = "exp1" if arm == "fra" else "exp2"
        rows = [r for r in _rows(out / exp / arm / "seed_0" / "metrics.jsonl")
                if r["round"] == 1 and r["site"] != "server"]
        assert sorted(r["site"] for r in rows) == ["site-1", "site-2"]
        for r in rows:
            assert r["sent_bytes"] > 0 and r["steps"] == 5 and r.get("global_f1") is not None
            assert ("epsilon" in r) == (arm == "dpsgd")
    dp_rows = {r["site"]: r for r in _rows(out / "exp2" / "dpsgd" / "seed_0" / "metrics.jsonl") if r.get("epsilon")}
    for site, r in dp_rows.items():
        q = 4 / split["sites"][site]["train"]["sequences"]
        assert r["dp_delta"] == 1e-5  # the stricter of the job's 1e-4 and the site's default target_delta
        assert r["epsilon"] == pytest.approx(compute_epsilon(1.2, q, 5, 1e-5), rel=1e-9)

    report = (out / "report.md").read_text()
    assert "SYNTHETIC" in report and "ε spent" in report
    for exp in ("exp1", "exp2"):  # the sequence-only reference, on each experiment's pooled training data
        base = json.loads((out / exp / "seed_0" / "reference.json").read_text())
        assert base["test_auroc"] > 0.5 and base["pr_curve"]["recall"]
    assert "*reference: logistic regression, one-hot ±7 window*" in report
    assert (out / "plots" / "exp1_test_pr_curves.png").is_file()
    summary = json.loads((out / "summary.json").read_text())
    eps = summary["experiments"]["exp2"]["arms"]["dpsgd"]["epsilon"]
    assert eps == pytest.approx(max(r["epsilon"] for r in dp_rows.values()))
    assert f"{eps:.2f} (δ=1e-05)" in report
    assert "| site-1 alone |" in report and "Against each site training alone" in report
    for png in (out / "plots").glob("*.png"):
        assert f"(plots/{png.name})" in report and png.stat().st_size < 200_000
    assert (out / "plots" / "exp2_dpsgd_f1.png").is_file() and (out / "plots" / "exp1_arms_auprc.png").is_file()

    # --resume skips finished arms; a second run without it refuses to overwrite
    assert main(["experiment", "run", str(config), "--out", str(out), "--resume", "--only", "exp1"]) == 0
    assert "already done; skipped" in capsys.readouterr().out
    assert main(["experiment", "run", str(config), "--out", str(out)]) == 2
    assert "--resume" in capsys.readouterr().err


def test_every_seed_repeats_every_arm_from_its_own_shared_start(tmp_path, capsys):
    """Two seeds, centralized and site-alone arms (no simulator: seconds): each seed has its own split,
    backbone and initial adapters, the report gives mean and spread over both."""
    cfg = yaml.safe_load(yaml.safe_dump(SMALL))
    cfg["seeds"] = [0, 1]
    cfg["experiments"] = [{"id": "e", "title": "two seeds", "split": "iid",
                           "arms": [{"id": "centralized", "kind": "centralized"}, {"id": "alone", "kind": "site-alone"}]}]
    config = tmp_path / "two.yaml"
    config.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    assert main(["experiment", "run", str(config), "--out", str(out)]) == 0
    from fedesm.model.cards import read_adapter_state

    initial = [read_adapter_state(out / f"seed_{s}" / "initial") for s in (0, 1)]
    assert any(not initial[0][k].equal(initial[1][k]) for k in initial[0])  # each seed its own start
    for s in (0, 1):
        assert json.loads((out / "e" / "centralized" / f"seed_{s}" / "arm.json").read_text())["seed"] == s
    splits = [json.loads((out / f"seed_{s}" / "data" / "iid" / "split.json").read_text()) for s in (0, 1)]
    assert splits[0]["sites"]["site-1"] != splits[1]["sites"]["site-1"]
    report = (out / "report.md").read_text()
    assert "seeds 0, 1" in report and " ± " in report and "| centralized | 2 |" in report
