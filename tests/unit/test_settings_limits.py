"""One rule for numbers in every settings block, whatever the way in (issue 23's cases, one test each).

Every float is finite, every integer within its field's range (the LoRA rank within the model, a batch
within what a machine holds, thresholds in (0, 1)); a bad value is one line naming block.field and
exit 2, from a flag, `--set` (job export, experiment --dry-run), an experiment YAML or a site config.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from fedesm.cli import main
from fedesm.errors import FedesmError
from fedesm.settings import JobSettings, LoraSettings, SitePrivacySettings, TrainConfig


def _one_line(capsys, *needles) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


def _train(tmp_path, *flags) -> int:
    """`fedesm train` with bad settings: refused before any data is read (the files do not exist)."""
    return main(["train", "--train", str(tmp_path / "absent.fa"), "--val", str(tmp_path / "absent.fa"),
                 "--backbone", "random:esm2_t2_tiny", "--out", str(tmp_path / "run"), *flags])


@pytest.mark.parametrize("flags, field, shown", [
    (["--lr", "inf"], "training.lr", "finite"),
    (["--lr", "nan"], "training.lr", "finite"),
    (["--lora-alpha", "inf"], "lora.alpha", "finite"),
    (["--weight-decay", "nan"], "training.weight_decay", "finite"),
    (["--grad-clip", "nan"], "training.grad_clip", "finite"),
    (["--focal-gamma", "nan"], "training.focal_gamma", "finite"),
    (["--grad-noise-std", "inf"], "training.grad_noise_std", "finite"),
    (["--dp-noise-multiplier", "nan"], "training.dp_noise_multiplier", "finite"),
    (["--class-weights", "inf,1"], "training.class_weights", "finite"),
    (["--class-weights", "0,0"], "training.class_weights", "not both 0"),
    (["--lora-targets", "q_proj,nothing_here"], "lora.targets", "'nothing_here' names no module"),
    (["--batch-size", "99999999999999999999"], "training.batch_size", "at most 65,536"),
    (["--lora-r", "1000000"], "lora.r", "at most"),
    (["--seed", "-1"], "training.seed", ">= 0"),
    (["--device", "cuda:x"], "training.device", "not auto, cpu, cuda or cuda:N"),
    (["--head-dropout", "1"], "model.head_dropout", "must be in [0, 1)"),
    (["--head-dropout", "nan"], "model.head_dropout", "finite"),
    (["--num-labels", "1"], "model.num_labels", "at least 2"),
    (["--arch", "esm3"], "model.arch", "unknown ESM-2 architecture"),
])
def test_a_bad_training_flag_is_one_line_and_no_run_folder(tmp_path, capsys, flags, field, shown):
    assert _train(tmp_path, *flags) == 2
    _one_line(capsys, field, shown)
    assert not (tmp_path / "run").exists()


def test_the_rank_is_checked_against_the_backbone_it_adapts(tmp_path, capsys):
    """esm2_t2_tiny is 64 wide: r=65 passes the block's own bound (5120) but not the model."""
    with pytest.raises(FedesmError, match=r"lora.r: the LoRA rank must be at most 64, .* esm2_t2_tiny, got 65"):
        JobSettings.from_dict({"model": {"arch": "esm2_t2_tiny"}, "lora": {"r": 65}})
    from fedesm.model.adapters import build_lora_model
    from fedesm.model.backbone import load_backbone

    with pytest.raises(FedesmError, match=r"lora.r: the LoRA rank must be at most 64"):
        build_lora_model(load_backbone("random:esm2_t2_tiny"), LoraSettings(r=65))
    assert main(["params", "--arch", "esm2_t2_tiny", "--lora-r", "65"]) == 2
    _one_line(capsys, "lora.r", "at most 64")


@pytest.mark.parametrize("item, field", [
    ("training.lr=.inf", "training.lr"),
    ("training.lr=.nan", "training.lr"),
    ("training.grad_noise_std=.nan", "training.grad_noise_std"),
    ("training.dp_noise_multiplier=.nan", "training.dp_noise_multiplier"),
    ("lora.r=1000000", "lora.r"),
    ("training.batch_size=99999999999999999999", "training.batch_size"),
    ("federation.server_lr=-.inf", "federation.server_lr"),
    ("federation.max_update_norm=.inf", "federation.max_update_norm"),
    ("training.threshold=2", "training.threshold"),
])
def test_job_export_and_experiment_dry_run_refuse_the_same_values(tmp_path, capsys, item, field):
    out = tmp_path / "job"
    assert main(["job", "export", "esm2_cyclic", "--out", str(out), "--set", item]) == 2
    _one_line(capsys, field)
    assert not out.exists()
    assert main(["experiment", "run", "cpu", "--dry-run", "--set", item]) == 2
    _one_line(capsys, field)


@pytest.mark.parametrize("text, field", [
    ("grad_noise_std: .nan", "training.grad_noise_std"),  # was: trains with no noise
    ("dp_noise_multiplier: .nan", "training.dp_noise_multiplier"),  # was: trains without DP
    ("dp_max_grad_norm: .inf", "training.dp_max_grad_norm"),
    ("lr: .inf", "training.lr"),
    ("min_lr_ratio: .nan", "training.min_lr_ratio"),
])
def test_yaml_nan_and_inf_never_silently_change_a_runs_meaning(text, field):
    with pytest.raises(FedesmError) as e:
        TrainConfig.from_dict(yaml.safe_load(text))
    assert str(e.value).startswith(field) and "finite" in str(e.value)


def test_an_experiment_yaml_with_nan_noise_is_refused(tmp_path, capsys):
    from fedesm.experiments.config import PRESETS_DIR

    raw = yaml.safe_load((Path(PRESETS_DIR) / "cpu.yaml").read_text())
    raw.setdefault("training", {})["grad_noise_std"] = math.nan
    path = tmp_path / "nan.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["experiment", "run", str(path), "--dry-run"]) == 2
    _one_line(capsys, "training.grad_noise_std", "finite")


@pytest.mark.parametrize("privacy, field", [
    ({"min_noise_multiplier": math.nan}, "privacy.min_noise_multiplier"),
    ({"target_epsilon": math.inf}, "privacy.target_epsilon"),
    ({"max_grad_norm": math.nan}, "privacy.max_grad_norm"),
    ({"debug_noise_seed": -3}, "privacy.debug_noise_seed"),
])
def test_a_site_privacy_policy_holds_only_finite_numbers(privacy, field):
    with pytest.raises(FedesmError) as e:
        SitePrivacySettings.from_dict(privacy, where="site.yaml")
    assert f"site.yaml: {field}" in str(e.value) and "\n" not in str(e.value)


def test_a_json_job_with_infinity_is_refused():
    """Python's json reads Infinity and NaN: a job config carrying them is refused at construction."""
    import json

    with pytest.raises(FedesmError, match=r"^job: training.lr: must be a finite number, got inf$"):
        JobSettings.from_dict(json.loads('{"training": {"lr": Infinity}}'), where="job")
    with pytest.raises(FedesmError, match=r"^job: lora.alpha: must be a finite number, got nan$"):
        JobSettings.from_dict(json.loads('{"lora": {"alpha": NaN}}'), where="job")


def test_a_block_that_is_not_a_mapping_is_one_line():
    with pytest.raises(FedesmError, match=r"^lora: expected a mapping of settings, got 5$"):
        JobSettings.from_dict({"lora": 5})


def test_predict_threshold_and_window_are_checked_before_anything_loads(tmp_path, capsys):
    # the flags are the training settings' own, so their checks and one-line messages are too
    for flags, needle in ((["--threshold", "2"], "training.threshold: must be in (0, 1), got 2"),
                          (["--threshold", "nan"], "training.threshold: must be a finite number"),
                          (["--threshold", "0"], "training.threshold: must be in (0, 1), got 0"),
                          (["--max-len", "5000"], "training.max_len: ESM-2 takes 1 to 1022 residues"),
                          (["--device", "gpu"], "training.device: 'gpu' is not auto, cpu, cuda or cuda:N")):
        out = tmp_path / "p.csv"
        assert main(["predict", "--model", str(tmp_path / "absent"), "--input", str(tmp_path / "absent.fa"),
                     "--out", str(out), *flags]) == 2
        _one_line(capsys, needle)
        assert not out.exists()


def test_a_usage_error_is_one_line_too(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--attention", "nope"])
    assert e.value.code == 2
    _one_line(capsys, "fedesm train: error:", "invalid choice")


def test_good_values_still_pass_and_round_trip():
    s = JobSettings.from_dict({"model": {"arch": "esm2_t2_tiny"}, "lora": {"r": 64, "targets": "fc1,fc2"},
                               "training": {"batch_size": 65536, "seed": 2**32 - 1, "class_weights": "0,1"}})
    assert (s.lora.r, s.training.batch_size, s.training.class_weights) == (64, 65536, [0.0, 1.0])
    assert JobSettings.from_dict(s.to_dict()) == s
