"""NVFLARE's two workflows, able to continue a crashed job from a saved round (`federation.resume_from`).

NVFLARE's own answer to a crashed server is to submit the job again from round 0. Here the
persistor loads the saved round in `load_model` (called from `start_controller`) and says how many
rounds lie behind it (`LoraPersistor.resumed_rounds`); these subclasses then start their round
counter there, exactly as NVFLARE's own snapshot restore does (`_current_round`, never
`start_round`), so the round headers the sites see, the persisted round numbers and the metrics
rows continue the old run, `num_rounds` stays the job's total, and NVFLARE's log lines stay its own.
Without `resume_from` they are the plain NVFLARE workflows.

`GlobalModelEval` scores the final global model at the sites that sent the last round's updates: NVFLARE
reports a site's death only to the workflow running at the time, so its own GlobalModelEval would
wait the whole `validation_timeout` (6,000 s) for a site that died during training.
"""

from __future__ import annotations

from nvflare.apis.controller_spec import ClientTask, Task
from nvflare.apis.dxo import DXO, DataKind
from nvflare.apis.fl_context import FLContext
from nvflare.apis.signal import Signal
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.workflows.cyclic_ctl import CyclicController as _CyclicController
from nvflare.app_common.workflows.global_model_eval import GlobalModelEval as _GlobalModelEval
from nvflare.app_common.workflows.scatter_and_gather import ScatterAndGather as _ScatterAndGather


def _resumed_rounds(persistor) -> int:
    rounds = getattr(persistor, "resumed_rounds", None)
    return int(rounds) if rounds else 0


class ScatterAndGather(_ScatterAndGather):
    """NVFLARE's ScatterAndGather, continuing at round `resumed_rounds` + 1 after a resumed load, and the relay
    of a secure round's masked passes (`fedesm.flare.secure_gather`) when its aggregator aggregates securely:
    the aggregator asks, during `aggregate`, for one task to the round's sites (`exchange`) or for the train
    task again (`retrain`, a round that runs again after a site was lost between the passes)."""

    _abort_signal = None

    def start_controller(self, fl_ctx: FLContext) -> None:
        super().start_controller(fl_ctx)
        if getattr(self.aggregator, "secure", False):
            self.aggregator.relay = self
        done = _resumed_rounds(self.persistor)
        if done:
            self._current_round = done  # control_flow runs rounds done .. num_rounds - 1 (0-based)
            self.log_info(fl_ctx, f"resumed after {done} rounds: running rounds {done + 1} to {self._num_rounds}")


    def control_flow(self, abort_signal: Signal, fl_ctx: FLContext) -> None:
        self._abort_signal = abort_signal  # the relayed tasks stop with the job
        super().control_flow(abort_signal, fl_ctx)

    def exchange(self, task_name: str, data: dict, sites, timeout: int, fl_ctx: FLContext) -> dict:
        """Send `data` (a DXO collection) to each of `sites` as task `task_name`; their replies by site name
        (a site that does not answer within `timeout` seconds is missing)."""
        shareable = DXO(data_kind=DataKind.COLLECTION, data=data).to_shareable()
        shareable.set_header(AppConstants.CURRENT_ROUND, self._current_round)
        shareable.set_header(AppConstants.NUM_ROUNDS, self._num_rounds)
        replies: dict = {}

        def received(client_task: ClientTask, fl_ctx: FLContext) -> None:
            replies[client_task.client.name] = client_task.result

        task = Task(name=task_name, data=shareable, timeout=int(timeout), result_received_cb=received)
        self.broadcast_and_wait(task=task, fl_ctx=fl_ctx, targets=list(sites), min_responses=len(sites),
                                wait_time_after_min_received=0, abort_signal=self._abort_signal)
        return replies

    def retrain(self, sites, fl_ctx: FLContext) -> None:
        """The round's train task again, to `sites` only; their results reach the aggregator's `accept`."""
        data = self.shareable_gen.learnable_to_shareable(self._global_weights, fl_ctx)
        data.set_header(AppConstants.CURRENT_ROUND, self._current_round)
        data.set_header(AppConstants.NUM_ROUNDS, self._num_rounds)
        data.add_cookie(AppConstants.CONTRIBUTION_ROUND, self._current_round)
        task = Task(name=self.train_task_name, data=data, timeout=self._train_timeout,
                    before_task_sent_cb=self._prepare_train_task_data, result_received_cb=self._process_train_result)
        self._current_failed_clients = set()
        self._current_num_targets = len(sites)
        self.broadcast_and_wait(task=task, fl_ctx=fl_ctx, targets=list(sites), min_responses=len(sites),
                                wait_time_after_min_received=self._wait_time_after_min_received,
                                abort_signal=self._abort_signal)


class CyclicController(_CyclicController):
    """NVFLARE's CyclicController, continuing at round `resumed_rounds` + 1 after a resumed load."""

    def start_controller(self, fl_ctx: FLContext) -> None:
        super().start_controller(fl_ctx)
        done = _resumed_rounds(self.persistor)
        if done:
            self._start_round = self._current_round = done
            self.log_info(fl_ctx, f"resumed after {done} rounds: running rounds {done + 1} to {self._end_round}")


class GlobalModelEval(_GlobalModelEval):
    """NVFLARE's GlobalModelEval, asking only the sites of the last aggregated round (all sites when the
    job has no aggregator, as in cyclic mode, or when `participating_clients` is given)."""

    def __init__(self, aggregator_id: str = "aggregator", **kwargs):
        super().__init__(**kwargs)
        self.aggregator_id = aggregator_id

    def start_controller(self, fl_ctx: FLContext) -> None:
        aggregator = self._engine.get_component(self.aggregator_id) if self.aggregator_id else None
        sites = sorted(getattr(aggregator, "last_round_sites", None) or [])
        if sites and not self._participating_clients:
            self._participating_clients = sites
        super().start_controller(fl_ctx)
