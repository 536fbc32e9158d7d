"""The server's copy of the global adapters + head: initial state (or a resumed round), one PEFT folder per
round, best and last; every round folder is also a resume point (`fedesm.resume`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path, PurePath
from typing import Optional

import numpy as np
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.model import ModelLearnable, ModelLearnableKey, make_model_learnable
from nvflare.app_common.abstract.model_persistor import ModelPersistor
from nvflare.app_common.app_constant import AppConstants

from fedesm import results, resume
from fedesm.errors import FedesmError
from fedesm.fileio import atomic_dir
from fedesm.flare.payload import to_numpy_dict
from fedesm.architectures import get_architecture
from fedesm.settings import JobSettings
from fedesm.strategies import STRATEGY


class LoraPersistor(ModelPersistor):
    def __init__(
        self,
        model: Optional[dict] = None,
        lora: Optional[dict] = None,
        training: Optional[dict] = None,
        federation: Optional[dict] = None,
        metrics_recorder_id: str = "metrics_recorder",
        aggregator_id: str = "aggregator",
    ):
        """Builds the round-0 adapters from the architecture alone (no backbone weights on the server) and
        saves every round's global adapters + head in PEFT's layout under `<run dir>/fedesm/`
        (`fedesm.results`): `rounds/round_NNN/` (model after NNN aggregation rounds), `last/`, and
        `best/` (highest mean `federation.best_metric` of the global model over the sites' validation
        splits, from the metrics recorder; its model card takes the mean of the sites' F1-tuned
        thresholds as its call threshold). `fedesm predict --model` takes the downloaded job result directly.

        Each round folder also holds what a later job needs to continue from it (`fedesm.resume`): the
        metrics table so far, the best-model bookkeeping and, for fra-ef, the aggregator's residual. With
        `federation.resume_from` set, `load_model` starts from that saved round instead of round 0: it
        copies the old run's earlier rounds into this run's folder, seeds the metrics recorder with the
        old rows, restores the fra-ef residual into the aggregator, and tells the workflow
        (`fedesm.flare.workflows`) where to continue through `resumed_rounds`.

        Args:
            model, lora, training, federation: the job's settings blocks. Used here: model.arch (adapter
                names and shapes), model.backbone (recorded in the model card: what a user should load
                predictions with), lora, training.seed (initial adapters), training.rounds (a resume
                must leave rounds to run), training.max_len and training.threshold (model card),
                federation.best_metric, keep_rounds, strategy and resume_from.
            metrics_recorder_id, aggregator_id: the components whose state a round folder carries.
        """
        super().__init__()
        self.settings = JobSettings.from_dict({"model": model, "lora": lora, "training": training,
                                               "federation": federation}, where="LoraPersistor")
        self.arch = get_architecture(self.settings.model.arch)
        self.metrics_recorder_id = metrics_recorder_id
        self.aggregator_id = aggregator_id
        self.output_dir: Optional[Path] = None
        self.cache_dir: Optional[Path] = None
        self.last_weights: Optional[dict] = None
        self.best_round: Optional[int] = None
        self.resumed_rounds: Optional[int] = None  # set by load_model when the job continues a saved round
        self.owner: Optional[dict] = None  # the job's submitter, from the run's meta.json (resume.run_owner)

    def handle_event(self, event_type: str, fl_ctx: FLContext):
        if event_type == EventType.START_RUN:
            workspace = fl_ctx.get_engine().get_workspace()
            run_dir = workspace.get_run_dir(fl_ctx.get_job_id())
            self.output_dir = results.output_dir(run_dir)
            self.owner = resume.run_owner(run_dir)
            self.output_dir.mkdir(parents=True, exist_ok=True)
            self.cache_dir = Path(workspace.get_root_dir()) / "local" / "fedesm_cache"
        elif event_type == EventType.END_RUN:
            self._update_best(fl_ctx)

    # --------------------------------------------------------------------------------- persistor API

    def load_model(self, fl_ctx: FLContext) -> ModelLearnable:
        from fedesm.model.adapters import initial_exchanged_state

        s = self.settings
        weights = to_numpy_dict(initial_exchanged_state(self.arch, s.lora, s.model.num_labels, s.training.seed))
        if s.federation.resume_from:
            try:
                weights = self._resume(weights, fl_ctx)
            except FedesmError as e:  # one line in the server log; the job stops before any round
                self.log_error(fl_ctx, str(e))
                self.system_panic(str(e), fl_ctx)
                return make_model_learnable({}, {})
            return make_model_learnable(weights, {})
        n = sum(v.size for v in weights.values())
        self.log_info(fl_ctx, f"initial global adapters + head for {s.model.arch}, r={s.lora.r}: "
                              f"{len(weights)} tensors, {n:,} parameters")
        self._save(weights, 0, fl_ctx)
        return make_model_learnable(weights, {})

    def _resume(self, initial: dict, fl_ctx: FLContext) -> dict:
        """Load the saved round `federation.resume_from` names and hand its state to the other components."""
        s = self.settings
        cache = self.cache_dir or Path.home() / ".cache" / "fedesm"
        point = resume.read_resume_point(resume.fetch_resume_point(s.federation.resume_from, cache))
        resume.check_compatible(point, {k: v.shape for k, v in initial.items()}, s.training.rounds,
                                resume.job_definition(s), owner=self.owner)
        weights = {k: np.asarray(point.weights[k], dtype=initial[k].dtype) for k in initial}
        recorder = self._component(fl_ctx, self.metrics_recorder_id)
        if recorder is not None:
            recorder.seed(point.rows, point.manifest)
        aggregator = self._component(fl_ctx, self.aggregator_id)
        if STRATEGY[s.federation.strategy].keeps_residual and hasattr(aggregator, "restore_ef_state"):
            aggregator.restore_ef_state(point.residuals, point.rounds_done)  # same strategy: the job hash says so
        if self.output_dir is not None and s.federation.keep_rounds:
            for n, folder in sorted(point.earlier_rounds.items()):
                shutil.copytree(folder, results.round_dir(self.output_dir, n), dirs_exist_ok=True)
        self.resumed_rounds = point.rounds_done
        self.best_round = None
        self._save(weights, point.rounds_done, fl_ctx)
        self._update_best(fl_ctx)
        kept = (f"rounds {', '.join(map(str, sorted(point.earlier_rounds)))} and {point.rounds_done}"
                if point.earlier_rounds else f"round {point.rounds_done} only (no earlier rounds beside it)")
        self.log_info(fl_ctx, f"resuming from {s.federation.resume_from} after {point.rounds_done} rounds "
                              f"({point.strategy}): {len(point.rows)} metrics rows carried over, {kept} kept; "
                              f"next: round {point.rounds_done + 1} of {s.training.rounds}")
        return weights

    def save_model(self, model: ModelLearnable, fl_ctx: FLContext):
        weights = model[ModelLearnableKey.WEIGHTS]
        current = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
        rounds_done = (current + 1) if current is not None else None
        self._save(weights, rounds_done, fl_ctx)
        self._update_best(fl_ctx)

    # --------------------------------------------------------------------------------- files

    def _card(self, rounds_done, fl_ctx: Optional[FLContext] = None):
        from fedesm.model.cards import ModelCard

        s = self.settings
        recorder = self._component(fl_ctx, self.metrics_recorder_id) if fl_ctx is not None else None
        source, identity = backbone_of_sites(getattr(recorder, "backbones", None) or {}, s.model.backbone_source)
        return ModelCard.describe(source, self.arch, s.lora, num_labels=s.model.num_labels,
                                  threshold=s.training.threshold, max_len=s.training.max_len,
                                  extra={"rounds": rounds_done, "source": "fedesm federated job"},
                                  backbone_identity=identity)

    def _save(self, weights: dict, rounds_done: Optional[int], fl_ctx: FLContext) -> None:
        """rounds/round_NNN (first) and last/, each written whole under a temporary name and renamed into place,
        with its resume files."""
        from fedesm.model.cards import write_adapter_files

        self.last_weights = {k: np.asarray(v) for k, v in weights.items()}
        if self.output_dir is None:
            return
        card = self._card(rounds_done, fl_ctx)
        targets = [self.output_dir / results.LAST]
        if self.settings.federation.keep_rounds and rounds_done is not None:
            targets.insert(0, results.round_dir(self.output_dir, rounds_done))
        recorder = self._component(fl_ctx, self.metrics_recorder_id)
        aggregator = self._component(fl_ctx, self.aggregator_id)
        residuals = aggregator.residuals() if hasattr(aggregator, "residuals") else None
        rows = recorder.snapshot() if recorder is not None else []
        for target in targets:
            with atomic_dir(target) as tmp:
                write_adapter_files(self.last_weights, card, tmp)
                if rounds_done is not None:
                    resume.write_resume_files(tmp, rounds_done, self.settings.federation.strategy, rows,
                                              residuals=residuals,
                                              best_round=self.best_round, job=resume.job_definition(self.settings),
                                              owner=self.owner)
        self.log_info(fl_ctx, f"saved global adapters after {rounds_done} rounds in {self.output_dir}")

    @staticmethod
    def _component(fl_ctx: FLContext, cid: Optional[str]):
        engine = fl_ctx.get_engine()
        return engine.get_component(cid) if engine is not None and cid else None

    def _update_best(self, fl_ctx: FLContext) -> None:
        """Copy the round with the best mean global-model validation metric (over sites) to best/."""
        from fedesm.model.cards import MODEL_CARD

        recorder = self._component(fl_ctx, self.metrics_recorder_id)
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


def backbone_of_sites(backbones: dict[str, dict], job_source: str) -> tuple[str, dict]:
    """(card's backbone source, card's backbone identity) from what the sites said they trained on.

    Sites that agree on one digest: that backbone, with each site's source name; sites that disagree: the
    job's source, and every site's claim under `sites` (no digest for predict to hold a backbone to)."""
    if not backbones:
        return job_source, {}
    digests = {b.get("sha256") for b in backbones.values()}
    first = backbones[sorted(backbones)[0]]
    sites = {site: dict(b) for site, b in sorted(backbones.items())}
    if len(digests) == 1 and None not in digests:
        source = first.get("source") or job_source
        if ":" not in source and "/" not in source and PurePath(str(job_source)).name == source:
            source = job_source  # the sites' local copies of the job's own model.backbone: the job names it in full
        return source, {**first, "sites": {s: b.get("source") for s, b in sites.items()}}
    return job_source, {"sites": sites}
