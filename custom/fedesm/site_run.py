"""One site's part in a federated job, without NVFLARE: what `fedesm.flare.executor` runs for each task.

NVFLARE's own split (app_common) is an executor that routes tasks and a learner that owns the model;
`SiteRun` is the learner. It owns the site's set-up (its config, data, backbone, `LocalTrainer`), its
privacy rules (the job refused when it asks for less than the site allows, the epsilon budget), the
alignment of a resumed job (`LocalTrainer.seek`), the global state at the site's LoRA rank, a round's
training and scoring, and the metrics a round reports. It sees state dicts and numbers, never a
Shareable: the executor converts, logs through NVFLARE and streams.

Metrics per evaluated model (`fedesm.evaluation.metrics.metrics_with_val_threshold`): accuracy, precision,
recall, F1, MCC (at 0.5), AUROC, AUPRC on the site's val split; `threshold_tuned` (maximises F1 on that
split); and, when the site config names a test split, `test_<metric>` at 0.5 and
`test_{precision,recall,f1,mcc}_tuned` at the tuned threshold. The received global model's are prefixed `global_`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from dataclasses import dataclass, field, replace
from typing import Callable, Optional, Protocol, Sequence

from fedesm.data.records import Record
from fedesm.errors import FedesmError
from fedesm.evaluation.release import releasable_metrics
from fedesm.ranks import site_lora, state_rank, truncate_state
from fedesm.settings import JobSettings, LoraSettings, SitePrivacySettings, TrainConfig
from fedesm.strategies import STRATEGY
from fedesm.training.optimizer_state import resolve_optimizer_state
from fedesm.training.privacy.policy import EpsilonBudget, accounting_delta
from fedesm.training.trainer import LocalTrainer, RoundStats, site_seed

LOG = logging.getLogger(__name__)


class SiteLog(Protocol):
    """Where a site's lines go: a `logging.Logger`, or the executor's NVFLARE log of the task at hand."""

    def info(self, msg: str) -> None: ...

    def warning(self, msg: str) -> None: ...


def site_training(settings: JobSettings, site: str, num_rounds: Optional[int], device: str = "auto",
                  privacy: Optional[SitePrivacySettings] = None) -> TrainConfig:
    """This site's training settings: the job's, with the site's device, the job's round count, and the
    site's own random streams (batches, crops, dropout) derived from the job seed and its name, so
    no two sites draw the same numbers. Privacy noise follows no seed (`privacy.policy.noise_source`); with the
    site's `privacy` policy, DP is accounted at the smaller of its delta and the job's."""
    t = settings.training
    delta = accounting_delta(t, privacy) if privacy is not None else t.dp_delta
    return replace(t, device=device, rounds=num_rounds or t.rounds, seed=site_seed(t.seed, site), dp_delta=delta)


@dataclass
class RoundResult:
    """A trained round: what the site sends (`metrics`) and what its log says (`stats`)."""

    round: object  # the task's round number as the server sent it (None from an old server)
    rounds_before: int  # aggregations before this round: the global model's step; the site's is one more
    stats: RoundStats
    metrics: dict = field(default_factory=dict)

    @property
    def aborted(self) -> bool:
        return self.stats.aborted

    def summary(self, site: str) -> str:
        m = self.metrics
        return (f"{site} round {self.round}: loss {self.stats.loss:.4f}, val AUPRC {m['auprc']:.3f} F1 {m['f1']:.3f} "
                f"(global model AUPRC {m.get('global_auprc', float('nan')):.3f}), {self.stats.seconds:.1f}s training")


class SiteRun:
    """A set-up site: its trainer, data and privacy state, kept in memory between rounds (so a site keeps
    its optimizer state). `SiteRun.set_up` builds one from the site's config; tests build one from parts."""

    def __init__(self, settings: JobSettings, site: str, trainer: LocalTrainer, train: Sequence[Record],
                 val: Sequence[Record], test: Optional[Sequence[Record]] = None, *, lora: Optional[LoraSettings] = None,
                 privacy: Optional[SitePrivacySettings] = None, noise_reproducible: Optional[bool] = None,
                 declared_samples: Optional[int] = None, backbone_identity: Optional[dict] = None,
                 num_rounds: Optional[int] = None, kit_dir: Optional[str] = None):
        """`trainer` was built with this site's training settings (`site_training`); `privacy` is the site's DP
        policy (its epsilon budget); `declared_samples` the operator's count; `backbone_identity` what each
        update says about the backbone (`fedesm.model.backbone.identity`); `kit_dir` the startup folder of the
        site's provisioned kit (its key signs the site's secure-aggregation keys)."""
        self.settings, self.site, self.trainer = settings, site, trainer
        self.train_records, self.val_records, self.test_records = train, val, test
        self.lora = lora or settings.lora  # the site's LoRA settings (the job's, or at the site's own rank)
        self.noise_reproducible = noise_reproducible  # privacy noise from a debug seed (True) or OS entropy (False)
        self.declared_samples = declared_samples
        self.backbone_identity = backbone_identity
        self.num_rounds = num_rounds
        self.kit_dir = kit_dir
        self.rounds_done = 0
        self._global = None  # the last round's global model as received
        self._secure = None  # this round's secure-aggregation part (fedesm.secure.rounds.SiteRound), if any
        training = trainer.config
        self.dp = training.dp_noise_multiplier > 0
        # the site's epsilon budget, DP-SGD only
        self.budget = EpsilonBudget(training, privacy or SitePrivacySettings(), len(train)) if self.dp else None

    # ------------------------------------------------------------------ set-up, once per job

    @classmethod
    def set_up(cls, settings: JobSettings, site: str, workspace_root: str, num_rounds: Optional[int],
               log: SiteLog = LOG) -> "SiteRun":
        """The site's config (`fedesm.site_config`), privacy check (before any data is read), data, backbone
        and model; `settings.model.backbone` is only the default when the site names none."""
        from fedesm.data.validate import check_site_data, load_dataset
        from fedesm.model.adapters import build_lora_model
        from fedesm.model.backbone import check_job_architecture, identity, load_backbone
        from fedesm.site_config import backbone_source as site_backbone, load_site_config, resolve_site_path

        cfg = load_site_config(site, workspace_root=workspace_root)
        training = site_training(settings, site, num_rounds, cfg.device, cfg.privacy)
        noise, reproducible = _privacy_noise(site, training, cfg, log)  # refuses before any data is read
        backbone_source = site_backbone(cfg, settings.model.backbone_source)  # a job's hf: id is refused
        if cfg.cpu_threads:
            import torch

            torch.set_num_threads(int(cfg.cpu_threads))
        train = load_dataset(resolve_site_path(cfg, cfg.train))
        val = load_dataset(resolve_site_path(cfg, cfg.val))
        test = load_dataset(resolve_site_path(cfg, cfg.test)) if cfg.test else None
        for note in check_site_data(train, val, cfg.train, cfg.val, settings.training.max_len):
            log.warning(f"{site}: {note}")
        backbone = load_backbone(backbone_source, cache_dir=cfg.cache_dir, policy=cfg.access_policy(),
                                 endpoint_url=cfg.s3_endpoint_url)
        check_job_architecture(backbone, backbone_source, settings.model.arch)
        backbone_id = identity(backbone, shared=True)  # before LoRA wraps it: the weights the sites trained on
        lora = site_lora(settings.lora, cfg.lora_r)  # the site's own rank (fedesm.ranks)
        if lora.r != settings.lora.r and not STRATEGY[settings.federation.strategy].any_rank:
            raise FedesmError(f"site lora_r {lora.r} below the job's lora.r {settings.lora.r} needs "
                              f"federation.strategy fra or fra-ef (products of any rank average); "
                              f"{settings.federation.strategy} averages the factors themselves")
        model = build_lora_model(backbone, lora, num_labels=settings.model.num_labels, seed=settings.training.seed,
                                 attention=settings.model.attention, head_dropout=settings.model.head_dropout)
        trainer = LocalTrainer(model, backbone.alphabet, train, training, noise=noise)
        run = cls(settings, site, trainer, train, val, test, lora=lora, privacy=cfg.privacy,
                  noise_reproducible=reproducible, declared_samples=cfg.declared_samples,
                  backbone_identity=backbone_id, num_rounds=num_rounds,
                  kit_dir=cfg.kit_dir or str(Path(workspace_root) / "startup"))
        run._report_budget(cfg.privacy, log)
        tested = f" and {len(test)} test" if test else ""
        log.info(f"{site}: {len(train)} training, {len(val)} validation{tested} sequences; backbone {backbone_source} "
                 f"on {trainer.device}; LoRA rank {lora.r}"
                 + (f" (job: {settings.lora.r})" if lora.r != settings.lora.r else "") + f"; site config {cfg.source}")
        return run

    def _report_budget(self, privacy: SitePrivacySettings, log: SiteLog) -> None:
        if self.budget is None:
            return
        rounds = self.trainer.config.rounds
        planned = self.budget.epsilon_after(rounds * self.trainer.config.steps_per_round)
        if privacy.target_epsilon is None:
            log.info(f"{self.site}: DP-SGD at delta {self.budget.delta:g}: epsilon {planned:.3f} after "
                     f"{rounds} rounds (no epsilon budget set at this site)")
            return
        covered = self.budget.rounds_covered(rounds)
        log.info(f"{self.site}: epsilon budget {privacy.target_epsilon:g} at delta {self.budget.delta:g} "
                 f"covers {covered} of {rounds} rounds (all rounds would spend {planned:.3f})")

    # ------------------------------------------------------------------ a round

    def start_round(self, current_round, num_rounds: Optional[int]) -> Optional[str]:
        """Why this site sends nothing this round (its epsilon budget is spent), or None when it trains."""
        self.num_rounds = num_rounds or self.num_rounds
        spent = self.budget.exhausted(self.trainer.dp_steps) if self.budget is not None else None
        return f"round {current_round}: {spent}" if spent else None

    def at_site_rank(self, state: dict) -> dict:
        """The global adapters + head truncated to this site's LoRA rank when it is below the job's
        (`fedesm.ranks.truncate_state`; before any optimizer-state alignment)."""
        if self.lora.r < (state_rank(state) or 0):
            return truncate_state(state, self.lora.r)
        return state

    def _join(self, current_round, log: SiteLog) -> None:
        """A site whose first round is round k > 0 (a resumed job) takes the learning rate the job's schedule
        has there, instead of warming up again from step 0 (its optimizer moments start afresh); under DP-SGD
        the earlier rounds count as spent on its data (`LocalTrainer.seek`)."""
        if self.rounds_done or not isinstance(current_round, int) or current_round <= 0:
            return
        steps = current_round * self.trainer.config.steps_per_round
        self.trainer.seek(steps)
        log.info(f"{self.site}: joining at round {current_round + 1}: learning-rate schedule moved to "
                 f"step {steps} (lr {self.trainer.lr:.3g})"
                 + (f"; DP-SGD accounted for the {steps} earlier steps" if self.dp else ""))

    def train_round(self, current_round, state: dict, should_abort: Optional[Callable[[], bool]] = None,
                    log: SiteLog = LOG) -> RoundResult:
        """Load the global `state` (at the site's rank), score it, train one round and score the result;
        an aborted round (`should_abort`, checked between steps) reports nothing."""
        self._join(current_round, log)
        self._secure = None  # a new round: whatever key this site had is never used again
        self._global = state  # the round's global model (secure aggregation: the names and shapes of its sums)
        t0 = time.perf_counter()
        f = self.settings.federation
        self.trainer.load_global(self.at_site_rank(state), resolve_optimizer_state(f.optimizer_state, f.strategy))
        metrics = {}
        # the round's number, not a local count: a resumed job or a site that joins late continues the table
        rounds_before = current_round if isinstance(current_round, int) else self.rounds_done
        if f.evaluate_global:
            test = self.test_records if f.evaluate_global_test else None
            metrics.update({f"global_{k}": v for k, v in self.evaluate(test).items()})
        stats = self.trainer.train_round(should_abort)  # an abort during the global scoring: 0 steps
        if stats.aborted:
            return RoundResult(current_round, rounds_before, stats)
        self.rounds_done += 1
        metrics.update(self.evaluate())
        metrics.update(train_loss=stats.loss, steps=stats.steps, train_seconds=stats.seconds,
                       residues_per_second=stats.residues_per_second, lr=stats.lr,
                       task_seconds=time.perf_counter() - t0)
        metrics.update(stats.extra)  # DP-SGD: epsilon, dp_delta, dp_steps
        metrics.update(self._privacy_metrics())  # noise_reproducible, epsilon_budget
        # under DP-SGD nothing about the secret batches (loss, seconds, throughput) leaves: a closed list does
        return RoundResult(current_round, rounds_before, stats, releasable_metrics(metrics, dp=self.dp))

    # ------------------------------------------------------------------ secure aggregation (fedesm.secure)

    def open_secure_round(self, job_id: str, current_round: int, min_sites: int):
        """After `train_round`: a fresh key pair for this round, its public key signed with the site's kit key
        (what leaves instead of the factors); the trained state stays here for the masked passes."""
        from fedesm.secure.rounds import SiteRound

        if self._global is None:
            raise FedesmError("secure aggregation: no trained round to send")
        self._secure = SiteRound(self.site, Path(self.kit_dir or "startup"), job_id, int(current_round),
                                 min_sites=max(2, int(min_sites)))
        self._secure_state = {k: _numpy(v) for k, v in self.exchanged_state().items()}
        return self._secure.signed_key

    def _secure_part(self, step: str):
        if self._secure is None:
            raise FedesmError(f"secure aggregation: {step} asked before this site trained the round (or after "
                              "its round ended); a round that runs again trains again")
        return self._secure

    def secure_first(self, keys, plan=None):
        """The first masked message: pass 1 of the sketch (fra / fra-ef, with the server's `plan`) or the one
        masked sum (fedit / ffa). Agrees the pairwise secrets with the roster's verified keys first; a site
        agrees once per trained round, so a roster that changes means training again (the server would
        otherwise get two sums that differ by one site's term)."""
        from fedesm.secure.rounds import averaged_layout, check_plan

        part = self._secure_part("the first pass")
        if part.roster:
            raise FedesmError("secure aggregation: this site already masked for a roster this round; it sends "
                              "again only after training again")
        part.agree(keys)
        global_state = {k: _numpy(v) for k, v in self._global.items()}
        how = STRATEGY[self.settings.federation.strategy]
        if plan is None:
            if how.refactors:
                raise FedesmError("secure aggregation: the server sent no sketch plan for a re-factoring strategy")
            message = part.average(self._secure_state, averaged_layout(global_state, how.freezes_a))
            self._secure = None  # the round's only message
            return message
        check_plan(plan, global_state)
        self._secure_plan = plan
        return part.pass1(self._secure_state, plan)

    def secure_second(self, bases):
        """Pass 2 of the sketch with the server's bases (d_out x s per pair, as the plan said); the last message."""
        part = self._secure_part("pass 2")
        if not part.roster:
            raise FedesmError("secure aggregation: pass 2 asked before pass 1")
        plan = self._secure_plan
        for name, q in bases.items():
            if name not in plan.widths or q.ndim != 2 or q.shape[1] != plan.widths[name]:
                raise FedesmError(f"secure aggregation: the server's basis for {name} has shape {q.shape}, the plan "
                                  "does not; refused")
        try:
            return part.pass2(self._secure_state, bases)
        finally:
            self._secure = None

    def _privacy_metrics(self) -> dict:
        out = {}
        if self.noise_reproducible is not None:
            out["noise_reproducible"] = float(self.noise_reproducible)
        if self.budget is not None and self.budget.target is not None:
            out["epsilon_budget"] = float(self.budget.target)
        return out

    # ------------------------------------------------------------------ scoring and the model sent

    def evaluate(self, test=...) -> dict:
        """The model in memory on the local val split (and `test`, default the site's test split, threshold
        tuned on val)."""
        from fedesm.evaluation.scoring import score_trainer

        return score_trainer(self.trainer, self.val_records, self.test_records if test is ... else test)

    def validate(self, state: dict) -> dict:
        """Score `state` (e.g. the final global model) on the local splits, keeping the site's own model."""
        from fedesm.model.adapters import get_exchanged_state, set_exchanged_state

        saved = get_exchanged_state(self.trainer.model)
        try:
            set_exchanged_state(self.trainer.model, self.at_site_rank(state))  # to score it, nothing else
            return self.evaluate(None if not self.settings.federation.evaluate_global_test else ...)
        finally:
            set_exchanged_state(self.trainer.model, saved)  # keep the site's own model for later tasks

    @property
    def last_round(self) -> int:
        """The global model's step after all rounds (the final validation's row)."""
        return self.num_rounds or self.rounds_done

    def exchanged_state(self) -> dict:
        """What leaves the site: its adapters and head (`fedesm.model.adapters.get_exchanged_state`)."""
        from fedesm.model.adapters import get_exchanged_state

        return get_exchanged_state(self.trainer.model)


def _numpy(value):
    import numpy as np

    if hasattr(value, "detach"):
        return value.detach().cpu().float().numpy()
    return np.asarray(value)


def _privacy_noise(site: str, training: TrainConfig, cfg, log: SiteLog):
    """Refuse a job that asks for less privacy than the site allows (PolicyRefusal), else pick the noise
    source: secret (OS entropy), or reproducible when the site's own config names a debug seed. Returns
    the source and whether its noise is reproducible (None when the job adds no noise)."""
    from fedesm.training.privacy.policy import check_job, noise_source

    check_job(training, cfg.privacy)
    noise = noise_source(cfg.privacy, site)
    noisy = training.dp_noise_multiplier > 0 or training.grad_noise_std > 0
    if noisy and noise.reproducible:
        log.warning(f"{site}: privacy noise is REPRODUCIBLE (privacy.debug_noise_seed in {cfg.source}): whoever "
                    "knows the seed can remove it; debugging only")
    elif noisy:
        log.info(f"{site}: privacy noise from OS entropy (secret, fresh for this run)")
    return noise, (noise.reproducible if noisy else None)
