"""The server's copy of the global adapters + head: initial state, one PEFT folder per round, best and last."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.model import ModelLearnable, ModelLearnableKey, make_model_learnable
from nvflare.app_common.abstract.model_persistor import ModelPersistor
from nvflare.app_common.app_constant import AppConstants

from fedesm import results
from fedesm.fileio import atomic_dir
from fedesm.flare.payload import to_numpy_dict
from fedesm.model.architectures import get_architecture
from fedesm.settings import JobSettings


class LoraPersistor(ModelPersistor):
    def __init__(
        self,
        model: Optional[dict] = None,
        lora: Optional[dict] = None,
        training: Optional[dict] = None,
        federation: Optional[dict] = None,
        metrics_recorder_id: str = "metrics_recorder",
    ):
        """Builds the round-0 adapters from the architecture alone (no backbone weights on the server) and
        saves every round's global adapters + head in PEFT's layout under `<run dir>/fedesm/`
        (`fedesm.results`): `rounds/round_NNN/` (model after NNN aggregation rounds), `last/`, and
        `best/` (highest mean `federation.best_metric` of the global model over the sites' validation
        splits, from the metrics recorder; its model card takes the mean of the sites' F1-tuned
        thresholds as its call threshold). `fedesm predict --model` takes the downloaded job result directly.

        Args:
            model, lora, training, federation: the job's settings blocks. Used here: model.arch (adapter
                names and shapes), model.backbone (recorded in the model card: what a user should load
                predictions with), lora, training.seed (initial adapters), training.max_len and
                training.threshold (model card), federation.best_metric and federation.keep_rounds.
        """
        super().__init__()
        self.settings = JobSettings.from_dict({"model": model, "lora": lora, "training": training,
                                               "federation": federation}, where="LoraPersistor")
        self.arch = get_architecture(self.settings.model.arch)
        self.metrics_recorder_id = metrics_recorder_id
        self.output_dir: Optional[Path] = None
        self.last_weights: Optional[dict] = None
        self.best_round: Optional[int] = None

    def handle_event(self, event_type: str, fl_ctx: FLContext):
        if event_type == EventType.START_RUN:
            run_dir = fl_ctx.get_engine().get_workspace().get_run_dir(fl_ctx.get_job_id())
            self.output_dir = results.output_dir(run_dir)
            self.output_dir.mkdir(parents=True, exist_ok=True)
        elif event_type == EventType.END_RUN:
            self._update_best(fl_ctx)

    # --------------------------------------------------------------------------------- persistor API

    def load_model(self, fl_ctx: FLContext) -> ModelLearnable:
        from fedesm.model.adapters import initial_exchanged_state

        s = self.settings
        weights = to_numpy_dict(initial_exchanged_state(self.arch, s.lora, s.model.num_labels, s.training.seed))
        n = sum(v.size for v in weights.values())
        self.log_info(fl_ctx, f"initial global adapters + head for {s.model.arch}, r={s.lora.r}: "
                              f"{len(weights)} tensors, {n:,} parameters")
        self._save(weights, 0, fl_ctx)
        return make_model_learnable(weights, {})

    def save_model(self, model: ModelLearnable, fl_ctx: FLContext):
        weights = model[ModelLearnableKey.WEIGHTS]
        current = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
        rounds_done = (current + 1) if current is not None else None
        self._save(weights, rounds_done, fl_ctx)
        self._update_best(fl_ctx)

    # --------------------------------------------------------------------------------- files

    def _card(self, rounds_done):
        from fedesm.model.cards import ModelCard

        s = self.settings
        return ModelCard.describe(s.model.backbone_source, self.arch, s.lora, num_labels=s.model.num_labels,
                                  threshold=s.training.threshold, max_len=s.training.max_len,
                                  extra={"rounds": rounds_done, "source": "fedesm federated job"})

    def _save(self, weights: dict, rounds_done: Optional[int], fl_ctx: FLContext) -> None:
        from fedesm.model.cards import save_adapter_state

        self.last_weights = {k: np.asarray(v) for k, v in weights.items()}
        if self.output_dir is None:
            return
        card = self._card(rounds_done)
        save_adapter_state(self.last_weights, card, self.output_dir / results.LAST)
        if self.settings.federation.keep_rounds and rounds_done is not None:
            save_adapter_state(self.last_weights, card, results.round_dir(self.output_dir, rounds_done))
        self.log_info(fl_ctx, f"saved global adapters after {rounds_done} rounds in {self.output_dir}")

    def _update_best(self, fl_ctx: FLContext) -> None:
        """Copy the round with the best mean global-model validation metric (over sites) to best/."""
        from fedesm.model.cards import MODEL_CARD

        recorder = fl_ctx.get_engine().get_component(self.metrics_recorder_id) if self.metrics_recorder_id else None
        if recorder is None or self.output_dir is None:
            return
        metric = self.settings.federation.best_metric
        best = recorder.best_round(f"global_{metric}")
        if best is None:
            return
        best_round, value = best
        threshold = recorder.mean_at(best_round, "global_threshold_tuned")
        src = results.round_dir(self.output_dir, best_round)
        if best_round == self.best_round or not src.is_dir():
            return
        with atomic_dir(self.output_dir / results.BEST) as tmp:
            shutil.copytree(src, tmp, dirs_exist_ok=True)
            card_path = tmp / MODEL_CARD
            card = json.loads(card_path.read_text())
            card["extra"].update(best_round=best_round, best_metric=metric,
                                 **{f"mean_global_val_{metric}": value})
            if threshold is not None:
                card["threshold"] = threshold
                card["extra"]["threshold_source"] = "mean over sites of the F1-maximising threshold on their val splits"
            card_path.write_text(json.dumps(card, indent=2))
        self.best_round = best_round
        self.log_info(fl_ctx, f"best global model so far: after {best_round} rounds (mean validation "
                              f"{metric} {value:.4f})")
