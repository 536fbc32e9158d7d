"""The site's executor as NVFLARE drives it: real FLContext, Shareable and Signal into `execute`, a `SiteRun`
behind it; what comes back (reply, meta, streamed metrics, log lines) is what the server would see."""

from __future__ import annotations

import logging

from nvflare.apis.dxo import MetaKey, from_shareable
from nvflare.apis.fl_constant import ReservedKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.apis.signal import Signal
from nvflare.app_common.app_constant import AppConstants

from fedesm.flare.executor import EsmLoraExecutor
from fedesm.flare.payload import METRICS_KEY, SITE_KEY, make_weights_shareable, withheld_reason
from fedesm.settings import SitePrivacySettings
from tests.site_parts import DP, ROUND_KEYS, site_run


class _Engine:
    """The analytics sender a site's job configures (it records what would be streamed, by step), and the
    events NVFLARE fires for warnings and errors."""

    def __init__(self):
        self.streamed, self.events = {}, []

    def fire_event(self, event_type, fl_ctx):
        self.events.append(event_type)

    def get_component(self, name):
        return self if name == "analytic_sender" else None

    def add(self, tag, value, data_type, global_step):
        self.streamed[tag] = (value, global_step)


def _site(run) -> tuple[EsmLoraExecutor, FLContext]:
    executor = EsmLoraExecutor(**run.settings.to_dict())
    executor.run = run  # the site as SiteRun.set_up would have built it
    ctx = FLContext()
    ctx.set_prop(ReservedKey.ENGINE, _Engine(), private=True, sticky=False)
    ctx.set_prop(ReservedKey.IDENTITY_NAME, run.site, private=False, sticky=False)
    return executor, ctx


def _task(run, current_round) -> Shareable:
    task = make_weights_shareable(run.exchanged_state(), {})
    task.set_header(AppConstants.CURRENT_ROUND, current_round)
    task.set_header(AppConstants.NUM_ROUNDS, 6)
    return task


def test_a_round_through_execute_sends_the_adapters_and_streams_by_round(tiny_checkpoint, synth_data, caplog):
    run = site_run(tiny_checkpoint, synth_data)
    executor, ctx = _site(run)
    with caplog.at_level(logging.INFO):
        reply = executor.execute(AppConstants.TASK_TRAIN, _task(run, 2), ctx, Signal())
    assert reply.get_return_code(ReturnCode.OK) == ReturnCode.OK
    dxo = from_shareable(reply)
    assert set(dxo.meta[METRICS_KEY]) == ROUND_KEYS and dxo.meta[SITE_KEY] == "site-1"
    assert dxo.meta[MetaKey.NUM_STEPS_CURRENT_ROUND] == 2 and reply.get_header(AppConstants.CURRENT_ROUND) == 2
    assert set(dxo.data) == set(run.exchanged_state())  # adapters and head, nothing else
    streamed = ctx.get_engine().streamed
    assert streamed["global_auprc"][1] == 2 and streamed["auprc"][1] == 3  # global after 2 rounds; the site's 3rd
    assert f"site-1 round 2: loss {dxo.meta[METRICS_KEY]['train_loss']:.4f}, val AUPRC" in caplog.text
    assert "joining at round 3" in caplog.text
    submitted = executor.execute(AppConstants.TASK_SUBMIT_MODEL, Shareable(), ctx, Signal())
    assert from_shareable(submitted).meta == {SITE_KEY: "site-1", "fedesm_transfer_dtype": "float32"}


def test_an_aborted_task_says_after_how_many_steps(tiny_checkpoint, synth_data, caplog):
    run = site_run(tiny_checkpoint, synth_data)
    executor, ctx = _site(run)
    signal = Signal()
    signal.trigger("stop")
    with caplog.at_level(logging.INFO):
        reply = executor.execute(AppConstants.TASK_TRAIN, _task(run, 1), ctx, signal)
    assert reply.get_return_code() == ReturnCode.TASK_ABORTED and "aborted after 0 steps of round 1" in caplog.text
    assert ctx.get_engine().streamed == {} and run.rounds_done == 0


def test_a_spent_budget_is_a_withheld_reply_with_its_reason(tiny_checkpoint, synth_data):
    run = site_run(tiny_checkpoint, synth_data, DP, privacy=SitePrivacySettings(target_epsilon=0.5))
    executor, ctx = _site(run)
    reply = executor.execute(AppConstants.TASK_TRAIN, _task(run, 3), ctx, Signal())
    assert reply.get_return_code() == ReturnCode.EMPTY_RESULT and set(reply) == {"__headers__"}
    assert withheld_reason(reply).startswith("round 3: epsilon budget: the next round would spend epsilon ")
    assert run.trainer.global_step == 0  # nothing trained


def test_submit_model_before_any_task_is_empty():
    from fedesm.launch.jobs import JOBS

    executor = EsmLoraExecutor(**JOBS["esm2_fra_lora"].settings.to_dict())
    reply = executor.execute(AppConstants.TASK_SUBMIT_MODEL, Shareable(), FLContext(), Signal())
    assert reply.get_return_code() == ReturnCode.EMPTY_RESULT
    unknown = executor.execute("dance", Shareable(), FLContext(), Signal())
    assert unknown.get_return_code() == ReturnCode.TASK_UNKNOWN
