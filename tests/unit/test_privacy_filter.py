"""The site's outbound filter (fedesm.flare.privacy.AdaptersOnlyFilter) on real NVFLARE objects: a real
Workspace holding an exported job's client config, real FLContexts and Shareables, and the executor's own
reply built from a trained tiny model. Only the engine is a stand-in (it hands out the workspace)."""

from __future__ import annotations

import inspect
import shutil

import numpy as np
import pytest

from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.filter import Filter
from nvflare.apis.fl_constant import ReservedKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable, make_reply
from nvflare.apis.workspace import Workspace
from nvflare.app_common.app_constant import AppConstants

from fedesm.flare.payload import (METRICS_KEY, N_SAMPLES_KEY, SITE_KEY, WITHHELD_KEY, make_weights_shareable,
                                  withheld_reason)
from fedesm.flare.privacy import MAX_LORA_RANK, AdaptersOnlyFilter, ExpectedResult, is_exchanged_name, result_problem
from fedesm.launch import policy
from fedesm.launch.jobs import export_job
from fedesm.model.adapters import build_lora_model
from fedesm.model.backbone import load_backbone
from fedesm.settings import JobSettings
from fedesm.site_run import SiteRun
from fedesm.training.trainer import LocalTrainer

JOB_ID = "b6f1c0de-job"
SITE = "site-1"
OVERRIDES = {"model.arch": "esm2_t2_tiny", "lora.r": 4, "training.max_len": 96, "training.steps_per_round": 2,
             "training.batch_size": 4}


class _Engine:
    """The one thing the filter asks the engine for: the site's workspace."""

    def __init__(self, workspace: Workspace):
        self.workspace = workspace

    def get_workspace(self) -> Workspace:
        return self.workspace


def _site_ctx(tmp_path, overrides=None) -> FLContext:
    """A site's FLContext for a deployed job: the exported bundle's app where NVFLARE puts it."""
    job = export_job("esm2_fra_lora", tmp_path / "export", {**OVERRIDES, **(overrides or {})})
    root = tmp_path / "site_ws"
    app = root / JOB_ID / f"app_{SITE}"
    shutil.copytree(job / "app", app)
    for kit_folder in ("startup", "local"):  # what makes a folder an NVFLARE workspace
        (root / kit_folder).mkdir()
    ctx = FLContext()
    ctx.set_prop(ReservedKey.ENGINE, _Engine(Workspace(str(root), site_name=SITE)), private=True, sticky=False)
    ctx.set_prop(ReservedKey.RUN_NUM, JOB_ID, private=True, sticky=False)
    ctx.set_prop(ReservedKey.IDENTITY_NAME, SITE, private=True, sticky=False)
    return ctx


@pytest.fixture(scope="module")
def executor_reply(tiny_checkpoint, synth_data):
    """What EsmLoraExecutor returns after a round (`make_weights_shareable` of its SiteRun's exchanged state, at
    the job's transfer dtype), from a model trained two steps."""
    settings = JobSettings().with_overrides(OVERRIDES)
    backbone = load_backbone(str(tiny_checkpoint))
    model = build_lora_model(backbone, settings.lora)
    trainer = LocalTrainer(model, backbone.alphabet, synth_data[0], settings.training.replace(device="cpu"))
    trainer.train_steps(2)
    run = SiteRun(settings, SITE, trainer, synth_data[0], synth_data[1])
    meta = {"NUM_STEPS_CURRENT_ROUND": 2, N_SAMPLES_KEY: 200, SITE_KEY: SITE,
            METRICS_KEY: {"auprc": 0.31, "f1": float("nan"), "steps": 2, "global_auprc": 0.2}}

    def make():
        reply = make_weights_shareable(run.exchanged_state(), meta, settings.federation.transfer_dtype)
        reply.set_header(AppConstants.CURRENT_ROUND, 3)
        return reply

    return make


def _weights(reply: Shareable) -> dict:
    return from_shareable(reply).data


def _refused(out: Shareable, problem: str) -> str:
    assert out.get_return_code() == ReturnCode.TASK_RESULT_FILTER_ERROR
    assert set(out) == {"__headers__"}  # nothing of the result travels
    reason = withheld_reason(out)
    assert reason.startswith("site privacy policy: refused to send ") and problem in reason, reason
    assert "\n" not in reason
    return reason


def test_the_executors_reply_passes_unchanged(tmp_path, executor_reply):
    ctx, f = _site_ctx(tmp_path), AdaptersOnlyFilter()
    reply = executor_reply()
    assert f.process(reply, ctx) is reply
    assert len(_weights(reply)) == 2 * 3 * 2 + 2  # 2 layers x q,k,v x (A, B) + head weight and bias
    for s in (DXO(DataKind.METRICS, data={"auprc": 0.3, "n": 5}).to_shareable(),  # a validation
              make_reply(ReturnCode.EXECUTION_EXCEPTION)):  # an error with no data
        assert f.process(s, ctx) is s
    assert is_exchanged_name("base_model.model.esm.layers.3.self_attn.v_proj.lora_B.default.weight")


def _with_tensor(name, value):
    def change(reply):
        dxo = from_shareable(reply)
        dxo.data[name] = value
        return dxo.update_shareable(reply)
    return change


def _with_meta(key, value):
    def change(reply):
        dxo = from_shareable(reply)
        dxo.meta[key] = value
        return dxo.update_shareable(reply)
    return change


def _recast(dtype):
    def change(reply):
        dxo = from_shareable(reply)
        dxo.data = {k: v.astype(dtype) for k, v in dxo.data.items()}
        return dxo.update_shareable(reply)
    return change


def _reshape_factor(reply):
    dxo = from_shareable(reply)
    key = next(k for k in dxo.data if ".lora_A." in k)
    dxo.data[key] = np.zeros((8, dxo.data[key].shape[1]), dtype=np.float32)  # rank 8, the job declares 4
    return dxo.update_shareable(reply)


def _extra_key(reply):
    reply["stolen"] = np.arange(10)
    return reply


def _header(reply):
    reply.set_header("note", "x" * 10_000)
    return reply


BACKBONE = "base_model.model.esm.layers.0.self_attn.q_proj.base_layer.weight"


@pytest.mark.parametrize("change, problem", [
    (_with_tensor(BACKBONE, np.zeros((64, 64), np.float32)),
     f"1 tensor(s) that are neither LoRA factors nor the head, e.g. {BACKBONE!r}"),
    (_with_tensor("base_model.model.esm.embed_tokens.weight", np.zeros((33, 64), np.float32)), "neither LoRA"),
    (_with_tensor("base_model.model.esm.layers.7.self_attn.q_proj.lora_A.weight", np.zeros((4, 64), np.float32)),
     "not one of the 14 of the job's model"),  # a LoRA name of another (deeper) model
    (_with_tensor("base_model.model.classifier.weight", np.zeros((3, 64), np.float32)),
     "the job's model has (2, 64)"),
    (_reshape_factor, "of shape (8, 64), the job's model has (4, 64)"),
    (_recast(np.float64), "of dtype float64, the job sends float32"),
    (_recast(np.float16), "of dtype float16, the job sends float32"),
    (_with_meta("labels", [0, 1, 1]), "undeclared meta ['labels']"),
    (_with_meta(METRICS_KEY, {"per_residue": [0.1, 0.9]}), "metrics 'per_residue' holding list, not a number"),
    (_with_meta(METRICS_KEY, {"note": "x"}), "holding str, not a number"),
    (_with_meta(METRICS_KEY, {f"m{i}": 0.0 for i in range(600)}), "600 metrics (at most 512)"),
    (_with_meta(N_SAMPLES_KEY, np.arange(3)), "meta n_samples that is not a count"),
    (_with_meta(SITE_KEY, "site-2"), "meta site 'site-2', this site is 'site-1'"),
    (_with_meta("fedesm_transfer_dtype", "float16"), "the job sends float32"),
    (_extra_key, "content beside the DXO: ['stolen']"),
    (_header, "an unexpected header 'note'"),
])
def test_anything_else_is_refused_with_its_reason(tmp_path, executor_reply, change, problem):
    ctx = _site_ctx(tmp_path)
    out = AdaptersOnlyFilter().process(change(executor_reply()), ctx)
    _refused(out, problem)
    assert out.get_header(AppConstants.CURRENT_ROUND) == 3  # the server knows which round it missed


def test_receipt_headers_are_refused_on_the_way_out_and_expected_on_arrival(tmp_path, executor_reply):
    """`__peer_props__` is NVFLARE's on receipt: a site's outgoing result carrying one smuggles data past the
    checks; where the scope runs on arrival (the simulator's server) it is normal, and kept in a replacement."""
    from nvflare.apis.fl_constant import FilterKey, FLContextKey

    ctx = _site_ctx(tmp_path)
    smuggled = executor_reply()
    smuggled.set_header("__peer_props__", {"__identity_name__": SITE, "x": "y" * 100})
    _refused(AdaptersOnlyFilter().process(smuggled, ctx), "header '__peer_props__', which only NVFLARE sets")
    ctx.set_prop(FLContextKey.FILTER_DIRECTION, FilterKey.IN, private=True, sticky=False)
    arrived = executor_reply()
    arrived.set_header("__peer_props__", {"__identity_name__": SITE})
    arrived.set_header("__task_name__", "train")
    assert AdaptersOnlyFilter().process(arrived, ctx) is arrived
    out = AdaptersOnlyFilter().process(_extra_key(arrived), ctx)
    _refused(out, "content beside the DXO")
    assert out.get_header("__task_name__") == "train" and out.get_peer_prop("__identity_name__", None) == SITE


@pytest.mark.parametrize("shareable, problem", [
    (DXO(DataKind.METRICS, data={"probabilities": [0.1, 0.9]}).to_shareable(), "holding list"),
    (DXO(DataKind.COLLECTION, data={"a": 1}).to_shareable(), "a DXO of kind COLLECTION"),
    (Shareable(), "not a DXO"),
])
def test_other_kinds_of_result_are_refused(tmp_path, shareable, problem):
    _refused(AdaptersOnlyFilter().process(shareable, _site_ctx(tmp_path)), problem)


def test_an_error_reply_may_not_carry_data(tmp_path):
    err = make_reply(ReturnCode.EXECUTION_EXCEPTION)
    err["DXO"] = {"kind": "WEIGHTS", "data": {BACKBONE: np.zeros(3)}}
    _refused(AdaptersOnlyFilter().process(err, FLContext()), "an error reply with content")


def test_a_job_declaring_a_rank_above_the_sites_cap_is_refused(tmp_path, executor_reply):
    ctx = _site_ctx(tmp_path, {"lora.r": 4})
    _refused(AdaptersOnlyFilter(max_lora_rank=2).process(executor_reply(), ctx),
             "the job's lora.r 4 is above this site's max_lora_rank 2")
    assert AdaptersOnlyFilter().max_lora_rank == MAX_LORA_RANK == 64
    with pytest.raises(ValueError, match="max_lora_rank must be a positive integer"):
        AdaptersOnlyFilter(max_lora_rank=0)


def test_a_reply_for_another_declared_model_is_refused(tmp_path, executor_reply):
    """The executor trained r=4 but the job's config declares r=2: the filter goes by the declaration."""
    _refused(AdaptersOnlyFilter().process(executor_reply(), _site_ctx(tmp_path, {"lora.r": 2})),
             "the job's model has (2, 64)")


def test_a_site_at_a_smaller_rank_than_declared_may_send_its_factors(tmp_path, executor_reply):
    """A site training at its own lora_r (fedesm.ranks) sends rank-4 factors of a rank-8 job: less than the
    declaration allows, so they leave; the other axis must still match."""
    out = AdaptersOnlyFilter().process(executor_reply(), _site_ctx(tmp_path, {"lora.r": 8}))
    assert out.get_return_code(ReturnCode.OK) == ReturnCode.OK
    assert all(v.shape[0] == 4 for k, v in _weights(out).items() if ".lora_A." in k)


def test_without_a_readable_job_config_nothing_leaves(tmp_path, executor_reply):
    _refused(AdaptersOnlyFilter().process(executor_reply(), FLContext()), "no running job to read the declared model")
    ctx = _site_ctx(tmp_path)
    (tmp_path / "site_ws" / JOB_ID / f"app_{SITE}" / "config" / "config_fed_client.json").write_text("{}")
    _refused(AdaptersOnlyFilter().process(executor_reply(), ctx), "declares no fedesm model")


def test_expected_result_comes_from_the_architecture_alone():
    settings = JobSettings()  # ESM-2 35M, r=16: the documented 553,922 trainable parameters
    expected = ExpectedResult.for_job(settings, SITE)
    assert sum(int(np.prod(s)) for s in expected.shapes.values()) == 553_922
    assert expected.dtype == "float32" and len(expected.shapes) == 12 * 3 * 2 + 2
    assert result_problem(DXO(DataKind.WEIGHTS, data={BACKBONE: np.zeros(2, np.float32)}).to_shareable(),
                          expected).startswith("1 tensor(s) that are neither")


def test_no_filter_the_site_lets_jobs_name_can_change_a_result():
    """NVFLARE applies the job's result filters after the scope's: the client class allow-list may name no
    NVFLARE Filter, and the only fedesm Filter is this one, which only checks."""
    import importlib
    import pkgutil

    import fedesm

    for path in policy.class_allow_list("client"):
        if path.startswith("fedesm."):
            continue
        module, _, name = path.rpartition(".")
        assert not issubclass(getattr(importlib.import_module(module), name), Filter), path
    filters = set()
    for info in pkgutil.walk_packages(fedesm.__path__, "fedesm."):
        if info.name.startswith(("fedesm.cli", "fedesm.experiments")):
            continue
        mod = importlib.import_module(info.name)
        filters |= {f"{c.__module__}.{c.__name__}" for _, c in inspect.getmembers(mod, inspect.isclass)
                    if issubclass(c, Filter) and c is not Filter and c.__module__.startswith("fedesm.")}
    assert filters == {policy.PRIVACY_FILTER_PATH}


def test_the_server_logs_and_records_why_a_site_sent_nothing(tmp_path, caplog):
    """What a refusing site's reply does on the server: MetricsRecorder logs the reason and puts it in the
    site's row for the round it skipped (`withheld`); ordinary results leave no such column."""
    import logging

    from nvflare.apis.event_type import EventType
    from nvflare.apis.fl_constant import FLContextKey

    from fedesm import results
    from fedesm.flare.metrics_recorder import MetricsRecorder
    from fedesm.flare.payload import withheld_reply
    from fedesm.tables import read_table

    recorder = MetricsRecorder()
    recorder.out_dir = tmp_path
    reason = "site privacy policy: refused to send 1 tensor(s) that are neither LoRA factors nor the head"
    for site, reply in (("site-1", withheld_reply(reason, ReturnCode.TASK_RESULT_FILTER_ERROR, current_round=2)),
                        ("site-2", make_reply(ReturnCode.OK))):
        reply.set_peer_props({ReservedKey.IDENTITY_NAME: site})
        reply.set_header(ReservedKey.TASK_NAME, "train")
        ctx = FLContext()
        ctx.set_prop(FLContextKey.TASK_RESULT, reply, private=True, sticky=False)
        with caplog.at_level(logging.WARNING):
            recorder.handle_event(EventType.BEFORE_PROCESS_SUBMISSION, ctx)
    rows = read_table(tmp_path / results.METRICS)
    assert rows == [{"round": 3, "site": "site-1", "withheld": reason}]
    assert f"site-1 sent nothing for task train (round 2; TASK_RESULT_FILTER_ERROR): {reason}" in caplog.text
    assert WITHHELD_KEY == "fedesm_withheld"
