"""The settings blocks: one name, default, check and parser per setting, whatever the way in."""

from __future__ import annotations

import argparse

import pytest

from fedesm.cli import main
from fedesm.errors import FedesmError
from fedesm.settings import (FederationSettings, JobSettings, LoraSettings, ModelSettings, TrainConfig, add_arguments,
                             apply_overrides, from_arguments, parse_value)


def test_defaults_are_the_papers_and_round_trip_through_dicts():
    s = JobSettings()
    assert (s.lora.r, s.lora.alpha, s.lora.dropout, s.lora.targets) == (16, 32, 0.05, ("q_proj", "k_proj", "v_proj"))
    assert s.training.class_weights == "sqrt" and s.federation.strategy == "fra"
    assert JobSettings.from_dict(s.to_dict()) == s
    assert TrainConfig.from_dict({"lr": 0.002}).lr == 0.002  # missing keys take their defaults


@pytest.mark.parametrize("value, expected", [("1e-3", 1e-3), (3, 3.0), ("0.5", 0.5)])
def test_values_are_coerced_to_the_fields_type(value, expected):
    assert TrainConfig(lr=value).lr == expected


@pytest.mark.parametrize("make, message", [
    (lambda: LoraSettings(r=0), "lora.r: the LoRA rank must be a positive integer, got 0"),
    (lambda: LoraSettings(r="x"), "lora.r: expected an integer, got 'x'"),
    (lambda: LoraSettings(r=True), "lora.r: expected an integer"),
    (lambda: LoraSettings(dropout=1.5), "lora.dropout: must be in [0, 1)"),
    (lambda: TrainConfig(lr=-1), "training.lr: the learning rate must be > 0"),
    (lambda: TrainConfig(schedule="step"), "training.schedule: 'step' is not one of cosine, linear, constant"),
    (lambda: TrainConfig(class_weights="heavy"), "training.class_weights: 'heavy' is not balanced, sqrt, none"),
    (lambda: TrainConfig(max_len=2000), "training.max_len: ESM-2 takes 1 to 1022 residues"),
    (lambda: TrainConfig(grad_noise_std=1e-4, dp_noise_multiplier=1.0), "choose one privacy mode"),
    (lambda: TrainConfig(device="gpu"), "training.device: 'gpu' is not auto, cpu, cuda or cuda:N"),
    (lambda: FederationSettings(strategy="fedavg"), "federation.strategy: 'fedavg' is not one of"),
    (lambda: FederationSettings(min_clients=0), "federation.min_clients: need at least one site"),
    (lambda: ModelSettings(arch="esm3"), "model.arch: unknown ESM-2 architecture 'esm3'"),
    (lambda: ModelSettings(head_dropout=1.0), "model.head_dropout: must be in [0, 1), got 1"),
    (lambda: ModelSettings(head_dropout=-0.1), "model.head_dropout: must be in [0, 1), got -0.1"),
    (lambda: ModelSettings(head_dropout=float("nan")), "model.head_dropout: must be a finite number, got nan"),
    (lambda: TrainConfig.from_dict({"lr_": 1}), "unknown training setting 'lr_' (did you mean 'lr'?)"),
    (lambda: JobSettings(federation=FederationSettings(strategy="ffa")), "set training.freeze_lora_a: true"),
])
def test_a_bad_value_is_one_line_naming_block_and_field(make, message):
    with pytest.raises(FedesmError) as e:
        make()
    assert message in str(e.value) and "\n" not in str(e.value)


def test_class_weights_take_every_spelling():
    assert TrainConfig(class_weights="none").class_weights is None
    assert TrainConfig(class_weights=None).class_weights is None
    assert TrainConfig(class_weights="1,9").class_weights == [1.0, 9.0]
    assert TrainConfig(class_weights=[1, 9]).class_weights == [1.0, 9.0]
    assert TrainConfig(class_weights="balanced").to_dict()["class_weights"] == "balanced"


def test_overrides_name_a_block_field_or_a_field_only_one_block_has():
    s = JobSettings().with_overrides(["training.lr=0.002", "strategy=fra-ef", "lora.r=4"])
    assert (s.training.lr, s.federation.strategy, s.lora.r) == (0.002, "fra-ef", 4)
    assert JobSettings().with_overrides({"rounds": 2}).training.rounds == 2
    with pytest.raises(FedesmError, match="unknown job setting 'round'"):
        JobSettings().with_overrides(["round=2"])
    with pytest.raises(FedesmError, match="unknown lora setting 'rank'; valid: r, alpha, dropout, targets"):
        JobSettings().with_overrides(["lora.rank=2"])


def test_one_value_parser_for_every_way_in():
    """`--set` in experiments and in job export, and CLI flags, read values as YAML."""
    assert [parse_value(v) for v in ("1e-3", "null", "true", "[1, 2]", "fra-ef", "0.5")] == [
        "1e-3", None, True, [1, 2], "fra-ef", 0.5]  # YAML reads 1e-3 as text; the field's type makes it a number
    raw = apply_overrides({"a": [{"id": "x", "b": {}}]}, ["a.x.b.c=3", "top=null"])
    assert raw == {"a": [{"id": "x", "b": {"c": 3}}], "top": None}


def test_flags_are_generated_from_the_fields():
    p = argparse.ArgumentParser()
    add_arguments(p, TrainConfig)
    add_arguments(p, LoraSettings, prefix="lora-")
    args = p.parse_args(["--steps-per-round", "7", "--lr", "1e-3", "--freeze-lora-a", "--class-weights", "none",
                         "--lora-r", "4", "--lora-targets", "q_proj,v_proj", "--grad-noise", "1e-4"])
    t, lora = from_arguments(args, TrainConfig), from_arguments(args, LoraSettings, prefix="lora-")
    assert (t.steps_per_round, t.lr, t.freeze_lora_a, t.class_weights, t.grad_noise_std) == (7, 1e-3, True, None, 1e-4)
    assert t.rounds == TrainConfig().rounds  # flags not given keep the block's defaults
    assert (lora.r, lora.targets) == (4, ("q_proj", "v_proj"))
    help_text = p.format_help()
    assert "--dp-noise-multiplier" in help_text and "(default 16)" in help_text


def test_a_bad_flag_value_is_one_line(capsys):
    assert main(["params", "--lora-r", "0"]) == 2
    assert capsys.readouterr().err.strip() == "fedesm: error: lora.r: the LoRA rank must be a positive integer, got 0"


def test_optimizer_state_policy_is_a_federation_setting():
    from fedesm.training.optimizer_state import resolve_optimizer_state

    f = FederationSettings()
    assert f.optimizer_state == "auto" and resolve_optimizer_state(f.optimizer_state, f.strategy) == "align"
    assert JobSettings().with_overrides(["optimizer_state=reset"]).federation.optimizer_state == "reset"
    with pytest.raises(FedesmError, match="federation.optimizer_state: 'zero' is not one of auto, keep, reset, align"):
        FederationSettings(optimizer_state="zero")


@pytest.mark.parametrize("changes, message", [
    ({"weigh_by": "samples"}, "federation.weigh_by: 'samples' took a count each site reports about itself"),
    ({"weigh_by": "steps"}, "federation.weigh_by: 'steps' took a count each site reports about itself"),
    ({"max_weight_share": 0}, "federation.max_weight_share: must be in (0, 1]"),
    ({"max_weight_share": float("nan")}, "federation.max_weight_share: must be a finite number, got nan"),
    ({"clip_update_ratio": 0.5}, "federation.clip_update_ratio: must be >= 1"),
    ({"clip_update_ratio": float("inf")}, "federation.clip_update_ratio: must be a finite number, got inf"),
    ({"max_update_ratio": float("inf")}, "federation.max_update_ratio: must be a finite number, got inf"),
])
def test_weights_and_clip_settings_are_checked(changes, message):
    from fedesm.settings import FederationSettings

    with pytest.raises(FedesmError) as e:
        FederationSettings.from_dict(changes)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert FederationSettings().weigh_by == "uniform"


def test_head_dropout_is_a_model_setting_from_job_to_model(tmp_path):
    """model.head_dropout (0.1 by default, as the head always had) reaches the model built from it."""
    from fedesm.launch.jobs import export_job, job_settings
    from fedesm.model.adapters import build_lora_model
    from fedesm.model.backbone import load_backbone
    from fedesm.model.esm2 import classifiers

    assert ModelSettings().head_dropout == 0.1
    job = export_job("esm2_fra_lora", tmp_path, {"model.head_dropout": 0.25})
    assert job_settings(job).model.head_dropout == 0.25  # a job carries it (and `fedesm job show` lists it)
    for given, p in ((None, 0.1), (0.25, 0.25)):
        model = build_lora_model(load_backbone("random:esm2_t2_tiny"), LoraSettings(r=2), head_dropout=given)
        assert [c.dropout.p for c in classifiers(model)] == [p]
