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

from nvflare.apis.fl_context import FLContext
from nvflare.app_common.workflows.cyclic_ctl import CyclicController as _CyclicController
from nvflare.app_common.workflows.global_model_eval import GlobalModelEval as _GlobalModelEval
from nvflare.app_common.workflows.scatter_and_gather import ScatterAndGather as _ScatterAndGather


def _resumed_rounds(persistor) -> int:
    rounds = getattr(persistor, "resumed_rounds", None)
    return int(rounds) if rounds else 0


class ScatterAndGather(_ScatterAndGather):
    """NVFLARE's ScatterAndGather, continuing at round `resumed_rounds` + 1 after a resumed load."""

    def start_controller(self, fl_ctx: FLContext) -> None:
        super().start_controller(fl_ctx)
        done = _resumed_rounds(self.persistor)
        if done:
            self._current_round = done  # control_flow runs rounds done .. num_rounds - 1 (0-based)
            self.log_info(fl_ctx, f"resumed after {done} rounds: running rounds {done + 1} to {self._num_rounds}")


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
