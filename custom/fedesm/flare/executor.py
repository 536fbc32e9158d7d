"""The site side of a round in NVFLARE: tasks routed to the site's `fedesm.site_run.SiteRun`, Shareables
converted to and from state dicts, lines logged and metrics streamed; only adapters + head sent back (in a
job with `federation.secure_aggregation`: the round's signed key, then masked words for the passes)."""

from __future__ import annotations

import traceback
from typing import Optional

from nvflare.apis.dxo import DXO, DataKind, MetaKey
from nvflare.apis.executor import Executor
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable, make_reply
from nvflare.apis.signal import Signal
from nvflare.app_common.app_constant import AppConstants

from fedesm.errors import FedesmError
from fedesm.flare.payload import (BACKBONE_KEY, METRICS_KEY, N_SAMPLES_KEY, RANK_KEY, SECURE_STEP_KEY, SECURE_TASKS,
                                  SITE_KEY, make_weights_shareable, read_weights_shareable, to_torch_dict,
                                  withheld_reply)
from fedesm.settings import JobSettings
from fedesm.site_run import SiteRun
from fedesm.training.privacy.policy import PolicyRefusal


class _TaskLog:
    """A `SiteLog` onto the executor's NVFLARE log, for the task at hand (its FLContext prefixes each line)."""

    def __init__(self, executor: Executor, fl_ctx: FLContext):
        self.executor, self.fl_ctx = executor, fl_ctx

    def info(self, msg: str) -> None:
        self.executor.log_info(self.fl_ctx, msg)

    def warning(self, msg: str) -> None:
        self.executor.log_warning(self.fl_ctx, msg)


class EsmLoraExecutor(Executor):
    def __init__(
        self,
        model: Optional[dict] = None,
        lora: Optional[dict] = None,
        training: Optional[dict] = None,
        federation: Optional[dict] = None,
        analytic_sender_id: str = "analytic_sender",
        train_task_name: str = AppConstants.TASK_TRAIN,
        validate_task_name: str = AppConstants.TASK_VALIDATION,
        submit_model_task_name: str = AppConstants.TASK_SUBMIT_MODEL,
    ):
        """ESM-2 LoRA client executor.

        The settings blocks are the job's (`fedesm.settings`; the job's config carries them); where the
        data and the checkpoint live is the site's own business (`fedesm.site_config`). The site's
        `SiteRun` (model, optimizer, schedule) is built on the first task and kept between rounds.

        Args:
            model, lora, training, federation: the job's settings blocks (dicts or settings objects);
                the site uses model, lora, training, and federation.transfer_dtype / strategy /
                optimizer_state / evaluate_global(_test).
            analytic_sender_id: the AnalyticsSender component that streams metrics to the server.
        """
        super().__init__()
        self.settings = JobSettings.from_dict({"model": model, "lora": lora, "training": training,
                                               "federation": federation}, where="EsmLoraExecutor")
        self.analytic_sender_id = analytic_sender_id
        self.train_task_name = train_task_name
        self.validate_task_name = validate_task_name
        self.submit_model_task_name = submit_model_task_name
        self.run: Optional[SiteRun] = None  # built on the first task (a test may hand in its own)

    def execute(self, task_name: str, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        try:
            if task_name == self.train_task_name:
                return self._train(shareable, fl_ctx, abort_signal)
            if task_name == self.validate_task_name:
                return self._validate(shareable, fl_ctx)
            if task_name in SECURE_TASKS.values():
                return self._secure_pass(task_name, shareable, fl_ctx)
            if task_name == self.submit_model_task_name:
                return self._reply({SITE_KEY: self.run.site}) if self.run else make_reply(ReturnCode.EMPTY_RESULT)
            self.log_error(fl_ctx, f"unknown task {task_name!r}")
            return make_reply(ReturnCode.TASK_UNKNOWN)
        except PolicyRefusal as e:  # the job asks for less privacy than this site allows: it sends nothing
            return self._withhold(fl_ctx, str(e), shareable.get_header(AppConstants.CURRENT_ROUND))
        except FedesmError as e:  # the site's own problem (data, config, checkpoint): say it plainly, here and to
            # the server (the reply's one line, no data: the server logs it and records it in its table)
            self.log_error(fl_ctx, f"{self._site(fl_ctx)}: {e}")
            return withheld_reply(str(e), ReturnCode.EXECUTION_EXCEPTION, shareable.get_header(AppConstants.CURRENT_ROUND))
        except Exception as e:
            self.log_error(fl_ctx, f"task {task_name} failed: {type(e).__name__}: {e}\n{traceback.format_exc()}")
            return make_reply(ReturnCode.EXECUTION_EXCEPTION)

    def _site(self, fl_ctx: FLContext) -> str:
        return self.run.site if self.run else fl_ctx.get_identity_name()

    def _site_run(self, fl_ctx: FLContext, num_rounds: Optional[int]) -> SiteRun:
        if self.run is None:
            workspace_root = fl_ctx.get_engine().get_workspace().get_root_dir()
            self.run = SiteRun.set_up(self.settings, fl_ctx.get_identity_name(), workspace_root, num_rounds,
                                      _TaskLog(self, fl_ctx))
        return self.run

    def _withhold(self, fl_ctx: FLContext, reason: str, current_round=None) -> Shareable:
        """Send nothing, and say why: the server logs it and its metrics table records it."""
        self.log_warning(fl_ctx, f"{self._site(fl_ctx)}: {reason}")
        return withheld_reply(reason, current_round=current_round)

    def _train(self, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        current_round = shareable.get_header(AppConstants.CURRENT_ROUND)
        run = self._site_run(fl_ctx, shareable.get_header(AppConstants.NUM_ROUNDS))
        withheld = run.start_round(current_round, shareable.get_header(AppConstants.NUM_ROUNDS))
        if withheld:
            return self._withhold(fl_ctx, withheld, current_round)
        result = run.train_round(current_round, to_torch_dict(read_weights_shareable(shareable)[0]),
                                 should_abort=lambda: abort_signal.triggered, log=_TaskLog(self, fl_ctx))
        if result.aborted:
            self.log_info(fl_ctx, f"{run.site}: aborted after {result.stats.steps} steps of round {current_round}")
            return make_reply(ReturnCode.TASK_ABORTED)
        metrics = result.metrics
        # global model after k aggregations -> step k; the local model after its (k+1)-th round -> step k+1
        self._stream(fl_ctx, {k: v for k, v in metrics.items() if k.startswith("global_")}, result.rounds_before)
        self._stream(fl_ctx, {k: v for k, v in metrics.items() if not k.startswith("global_")},
                     result.rounds_before + 1)
        self.log_info(fl_ctx, result.summary(run.site))
        meta = {MetaKey.NUM_STEPS_CURRENT_ROUND: result.stats.steps, METRICS_KEY: metrics, SITE_KEY: run.site}
        if run.declared_samples is not None:
            meta[N_SAMPLES_KEY] = run.declared_samples  # the operator's count, never the data's
        if run.backbone_identity:
            meta[BACKBONE_KEY] = run.backbone_identity
        if self.settings.federation.secure_aggregation:
            reply = self._key_reply(run, current_round, meta, fl_ctx)
        else:
            reply = self._reply(meta)
        reply.set_header(AppConstants.CURRENT_ROUND, current_round)
        return reply

    # ------------------------------------------------------------------ secure aggregation

    def _key_reply(self, run: SiteRun, current_round, meta: dict, fl_ctx: FLContext) -> Shareable:
        """Secure aggregation: the round's signed public key and the metrics; the factors stay here until the
        masked passes (fedesm.secure)."""
        from fedesm.ranks import state_rank
        from fedesm.secure.wire import key_to_arrays

        if not isinstance(current_round, int):
            raise FedesmError("secure aggregation: the train task carries no round number")
        key = run.open_secure_round(fl_ctx.get_job_id(), current_round, self.settings.federation.min_clients)
        meta = {**meta, SECURE_STEP_KEY: "keys", RANK_KEY: int(state_rank(run.exchanged_state()) or 0)}
        self.log_info(fl_ctx, f"{run.site}: secure aggregation: sent the round's signed key, kept the factors")
        return DXO(data_kind=DataKind.COLLECTION, data=key_to_arrays(key), meta=meta).to_shareable()

    def _secure_pass(self, task_name: str, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        from fedesm.secure import wire

        if self.run is None or not self.settings.federation.secure_aggregation:
            raise FedesmError(f"{task_name}: this job does not aggregate securely, or the site has not trained")
        data = _collection(shareable)
        step = next(k for k, v in SECURE_TASKS.items() if v == task_name)
        if step == "pass2":
            message = self.run.secure_second(wire.bases_from_arrays(data))
        else:
            plan = wire.plan_from_arrays(data) if step == "pass1" else None
            message = self.run.secure_first(wire.keys_from_arrays(data), plan)
        self.log_info(fl_ctx, f"{self.run.site}: secure aggregation: sent the masked {step} message "
                              f"({message.words.size:,} words)")
        reply = DXO(data_kind=DataKind.COLLECTION, data=wire.message_to_arrays(message),
                    meta={SECURE_STEP_KEY: step, SITE_KEY: self.run.site}).to_shareable()
        reply.set_header(AppConstants.CURRENT_ROUND, shareable.get_header(AppConstants.CURRENT_ROUND))
        return reply

    def _validate(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        """Score the model in the task (e.g. the final global model) on the local validation split."""
        run = self._site_run(fl_ctx, None)
        metrics = run.validate(to_torch_dict(read_weights_shareable(shareable)[0]))
        model_owner = str(shareable.get_header(AppConstants.MODEL_OWNER) or "SRV_server")
        if model_owner.startswith("SRV_"):
            # the global model after all rounds: same column names as the per-round global rows
            self._stream(fl_ctx, {f"global_{k}": v for k, v in metrics.items()}, run.last_round)
        self.log_info(fl_ctx, f"{run.site}: validated model of {model_owner}: F1 {metrics['f1']:.3f}")
        return DXO(data_kind=DataKind.METRICS, data=metrics).to_shareable()

    def _reply(self, meta: dict) -> Shareable:
        return make_weights_shareable(self.run.exchanged_state(), meta, self.settings.federation.transfer_dtype)

    def _stream(self, fl_ctx: FLContext, metrics: dict, global_step: int) -> None:
        """Send metrics to the server through NVFLARE's analytics streaming (TensorBoard + metrics table)."""
        from nvflare.apis.analytix import AnalyticsDataType

        sender = fl_ctx.get_engine().get_component(self.analytic_sender_id) if self.analytic_sender_id else None
        if sender is None:
            return
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and v == v:  # skip NaN
                sender.add(tag=k, value=float(v), data_type=AnalyticsDataType.SCALAR, global_step=int(global_step))


def _collection(shareable: Shareable) -> dict:
    from nvflare.apis.dxo import from_shareable

    dxo = from_shareable(shareable)
    if dxo.data_kind != DataKind.COLLECTION or not isinstance(dxo.data, dict):
        raise FedesmError(f"secure aggregation: the task carries a {dxo.data_kind} DXO, not the round's collection")
    return dxo.data
