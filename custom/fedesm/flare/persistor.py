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

from fedesm.fileio import atomic_dir
from fedesm.flare.payload import to_numpy_dict

OUTPUT_DIR = "fedesm"  # under the server's run folder, so it comes with a downloaded job result


class LoraPersistor(ModelPersistor):
    def __init__(
        self,
        arch: str = "esm2_t12_35M_UR50D",
        backbone_hint: Optional[str] = None,
        lora_r: int = 16,
        lora_alpha: int = 32,
        lora_dropout: float = 0.05,
        lora_targets: Optional[list] = None,
        num_labels: int = 2,
        seed: int = 0,
        max_len: int = 1000,
        threshold: float = 0.5,
        keep_rounds: bool = True,
        metrics_recorder_id: str = "metrics_recorder",
        best_metric: str = "auprc",
    ):
        """Builds the round-0 adapters from the architecture alone (no backbone weights on the server) and
        saves every round's global adapters + head in PEFT's layout under `<run dir>/fedesm/`:
        `rounds/round_NNN/` (model after NNN aggregation rounds), `last/`, and `best/` (highest mean
        `best_metric` of the global model over the sites' validation splits, from the metrics
        recorder; its model card takes the mean of the sites' F1-tuned thresholds as its call
        threshold). `fedesm predict --model` takes the downloaded job result directly.

        Args:
            arch: ESM-2 architecture name; fixes adapter names and shapes.
            backbone_hint: backbone recorded in the saved model card (what a user should load
                predictions with); defaults to `arch`.
            best_metric: which global-model validation metric picks best/: auprc (default: threshold-free,
                sound at 3-16% positives), auroc, f1 or mcc (both at 0.5).
        """
        super().__init__()
        from fedesm.model import LoraSettings, get_architecture

        self.arch_name = arch
        self.arch = get_architecture(arch)
        self.backbone_hint = backbone_hint or arch
        self.lora = LoraSettings(r=lora_r, alpha=lora_alpha, dropout=lora_dropout, targets=lora_targets)
        self.num_labels = num_labels
        self.seed = seed
        self.max_len = max_len
        self.threshold = threshold
        self.keep_rounds = keep_rounds
        self.metrics_recorder_id = metrics_recorder_id
        self.best_metric = best_metric
        self.output_dir: Optional[Path] = None
        self.last_weights: Optional[dict] = None
        self.best_round: Optional[int] = None

    def handle_event(self, event_type: str, fl_ctx: FLContext):
        if event_type == EventType.START_RUN:
            run_dir = fl_ctx.get_engine().get_workspace().get_run_dir(fl_ctx.get_job_id())
            self.output_dir = Path(run_dir) / OUTPUT_DIR
            self.output_dir.mkdir(parents=True, exist_ok=True)
        elif event_type == EventType.END_RUN:
            self._update_best(fl_ctx)

    # --------------------------------------------------------------------------------- persistor API

    def load_model(self, fl_ctx: FLContext) -> ModelLearnable:
        from fedesm.model import initial_exchanged_state

        weights = to_numpy_dict(initial_exchanged_state(self.arch, self.lora, self.num_labels, self.seed))
        n = sum(v.size for v in weights.values())
        self.log_info(fl_ctx, f"initial global adapters + head for {self.arch_name}, r={self.lora.r}: "
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
        from fedesm.model import ModelCard, _lora_dict
        from dataclasses import asdict

        return ModelCard(backbone=self.backbone_hint, arch=asdict(self.arch), lora=_lora_dict(self.lora),
                         num_labels=self.num_labels, threshold=self.threshold, max_len=self.max_len,
                         extra={"rounds": rounds_done, "source": "fedesm federated job"})

    def _save(self, weights: dict, rounds_done: Optional[int], fl_ctx: FLContext) -> None:
        from fedesm.model import save_adapter_state

        self.last_weights = {k: np.asarray(v) for k, v in weights.items()}
        if self.output_dir is None:
            return
        card = self._card(rounds_done)
        save_adapter_state(self.last_weights, self.lora, card, self.output_dir / "last")
        if self.keep_rounds and rounds_done is not None:
            save_adapter_state(self.last_weights, self.lora, card, self.output_dir / "rounds" / f"round_{rounds_done:03d}")
        self.log_info(fl_ctx, f"saved global adapters after {rounds_done} rounds in {self.output_dir}")

    def _update_best(self, fl_ctx: FLContext) -> None:
        """Copy the round with the best mean global-model validation metric (over sites) to best/."""
        recorder = fl_ctx.get_engine().get_component(self.metrics_recorder_id) if self.metrics_recorder_id else None
        if recorder is None or self.output_dir is None:
            return
        best = recorder.best_round(f"global_{self.best_metric}")
        if best is None:
            return
        best_round, value = best
        threshold = recorder.mean_at(best_round, "global_threshold_tuned")
        src = self.output_dir / "rounds" / f"round_{best_round:03d}"
        if best_round == self.best_round or not src.is_dir():
            return
        with atomic_dir(self.output_dir / "best") as tmp:
            shutil.copytree(src, tmp, dirs_exist_ok=True)
            card_path = tmp / "fedesm_model.json"
            card = json.loads(card_path.read_text())
            card["extra"].update(best_round=best_round, best_metric=self.best_metric,
                                 **{f"mean_global_val_{self.best_metric}": value})
            if threshold is not None:
                card["threshold"] = threshold
                card["extra"]["threshold_source"] = "mean over sites of the F1-maximising threshold on their val splits"
            card_path.write_text(json.dumps(card, indent=2))
        self.best_round = best_round
        self.log_info(fl_ctx, f"best global model so far: after {best_round} rounds (mean validation "
                              f"{self.best_metric} {value:.4f})")
