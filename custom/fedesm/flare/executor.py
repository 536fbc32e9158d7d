"""The site side of a round: ESM-2 + LoRA trained on the site's own data, only adapters + head sent back."""

from __future__ import annotations

import time
import traceback
from dataclasses import replace
from typing import Optional

from nvflare.apis.dxo import DXO, DataKind, MetaKey
from nvflare.apis.executor import Executor
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable, make_reply
from nvflare.apis.signal import Signal
from nvflare.app_common.app_constant import AppConstants

from fedesm.errors import FedesmError
from fedesm.flare.payload import (BACKBONE_KEY, METRICS_KEY, N_SAMPLES_KEY, SITE_KEY, make_weights_shareable,
                                  read_weights_shareable, to_torch_dict, withheld_reply)
from fedesm.ranks import site_lora, state_rank, truncate_state
from fedesm.settings import JobSettings
from fedesm.strategies import STRATEGY
from fedesm.training.optimizer_state import resolve_policy
from fedesm.training.privacy.policy import PolicyRefusal
from fedesm.evaluation.release import releasable_metrics

# Metrics per evaluated model (fedesm.evaluation.metrics.metrics_with_val_threshold): accuracy, precision,
# recall, F1, MCC (at 0.5), AUROC, AUPRC on the site's val split; `threshold_tuned` (maximises F1 on that
# split); and, when the site config names a test split, `test_<metric>` at 0.5 and
# `test_{precision,recall,f1,mcc}_tuned` at the tuned threshold. The received global model's are prefixed `global_`.


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
        data and the checkpoint live is the site's own business (`fedesm.site_config`): `model.backbone`
        is only the default when the site names none. The model, optimizer and schedule are built on
        the first task and kept in memory between rounds, so a site keeps its optimizer state.

        Args:
            model, lora, training, federation: the job's settings blocks (dicts or settings objects);
                this executor uses model, lora, training, and federation.transfer_dtype / evaluate_global(_test).
            analytic_sender_id: the AnalyticsSender component that streams metrics to the server.
        """
        super().__init__()
        self.settings = JobSettings.from_dict({"model": model, "lora": lora, "training": training,
                                               "federation": federation}, where="EsmLoraExecutor")
        self.analytic_sender_id = analytic_sender_id
        self.train_task_name = train_task_name
        self.validate_task_name = validate_task_name
        self.submit_model_task_name = submit_model_task_name
        self.trainer = None
        self.lora = None  # the site's LoRA settings (the job's, or at the site's own rank)
        self.site = None
        self.site_config = None
        self.train_records = self.val_records = self.test_records = None
        self.rounds_done = 0
        self.num_rounds = None
        self.budget = None  # the site's epsilon budget (fedesm.training.privacy.policy.EpsilonBudget), DP-SGD only
        self.backbone_identity = None  # arch, source name and sha256 of the site's backbone, sent with each update
        self.noise_reproducible = None  # privacy noise from the site's debug seed (True) or OS entropy (False)

    # ------------------------------------------------------------------ set-up, once per job

    def _setup(self, fl_ctx: FLContext, num_rounds: Optional[int]) -> None:
        from fedesm.data.validate import check_site_data, load_dataset
        from fedesm.model.adapters import build_lora_model
        from fedesm.model.backbone import check_job_architecture, identity as backbone_identity, load_backbone
        from fedesm.site_config import backbone_source as site_backbone, load_site_config, resolve_site_path
        from fedesm.training.trainer import LocalTrainer

        self.site = fl_ctx.get_identity_name()
        workspace_root = fl_ctx.get_engine().get_workspace().get_root_dir()
        cfg = load_site_config(self.site, workspace_root=workspace_root)
        self.site_config = cfg
        training = self.site_training(self.site, num_rounds, cfg.device, cfg.privacy)
        noise = self._apply_privacy_policy(fl_ctx, training, cfg.privacy)  # refuses before any data is read
        backbone_source = site_backbone(cfg, self.settings.model.backbone_source)  # a job's hf: id is refused
        if cfg.cpu_threads:
            import torch

            torch.set_num_threads(int(cfg.cpu_threads))
        self.train_records = load_dataset(resolve_site_path(cfg, cfg.train))
        self.val_records = load_dataset(resolve_site_path(cfg, cfg.val))
        self.test_records = load_dataset(resolve_site_path(cfg, cfg.test)) if cfg.test else None
        for note in check_site_data(self.train_records, self.val_records, cfg.train, cfg.val,
                                    self.settings.training.max_len):
            self.log_warning(fl_ctx, f"{self.site}: {note}")
        backbone = load_backbone(backbone_source, cache_dir=cfg.cache_dir, policy=cfg.policy(),
                                 endpoint_url=cfg.s3_endpoint_url)
        check_job_architecture(backbone, backbone_source, self.settings.model.arch)
        self.backbone_identity = backbone_identity(backbone, shared=True)  # the server's model card records it
        self.lora = site_lora(self.settings.lora, cfg.lora_r)  # the site's own rank (fedesm.ranks)
        if self.lora.r != self.settings.lora.r and not STRATEGY[self.settings.federation.strategy].any_rank:
            raise FedesmError(f"site lora_r {self.lora.r} below the job's lora.r {self.settings.lora.r} needs "
                              f"federation.strategy fra or fra-ef (products of any rank average); "
                              f"{self.settings.federation.strategy} averages the factors themselves")
        model = build_lora_model(backbone, self.lora, num_labels=self.settings.model.num_labels,
                                 seed=self.settings.training.seed, attention=self.settings.model.attention)
        self.trainer = LocalTrainer(model, backbone.alphabet, self.train_records, training, noise=noise)
        self.num_rounds = num_rounds
        self._report_budget(fl_ctx, training, cfg.privacy)
        test = f" and {len(self.test_records)} test" if self.test_records else ""
        self.log_info(fl_ctx, f"{self.site}: {len(self.train_records)} training, {len(self.val_records)} "
                              f"validation{test} sequences; backbone {backbone_source} on {self.trainer.device}; "
                              f"LoRA rank {self.lora.r}"
                              + (f" (job: {self.settings.lora.r})" if self.lora.r != self.settings.lora.r else "")
                              + f"; site config {cfg.source}")

    def site_training(self, site: str, num_rounds: Optional[int], device: str = "auto", privacy=None):
        """This site's training settings: the job's, with the site's device, the job's round count, and the
        site's own random streams (batches, crops, dropout) derived from the job seed and its name, so
        no two sites draw the same numbers. Privacy noise follows no seed (`_apply_privacy_policy`); with the
        site's `privacy` policy, DP is accounted at the smaller of its delta and the job's."""
        from fedesm.training.privacy.policy import accounting_delta
        from fedesm.training.trainer import site_seed

        t = self.settings.training
        delta = accounting_delta(t, privacy) if privacy is not None else t.dp_delta
        return replace(t, device=device, rounds=num_rounds or t.rounds, seed=site_seed(t.seed, site), dp_delta=delta)

    # ------------------------------------------------------------------ the site's privacy policy

    def _apply_privacy_policy(self, fl_ctx: FLContext, training, policy):
        """Refuse a job that asks for less privacy than the site allows (PolicyRefusal), else pick the noise
        source: secret (OS entropy), or reproducible when the site's own config names a debug seed."""
        from fedesm.training.privacy.policy import check_job, noise_source

        check_job(training, policy)
        noise = noise_source(policy, self.site)
        noisy = training.dp_noise_multiplier > 0 or training.grad_noise_std > 0
        self.noise_reproducible = noise.reproducible if noisy else None
        if noisy and noise.reproducible:
            self.log_warning(fl_ctx, f"{self.site}: privacy noise is REPRODUCIBLE (privacy.debug_noise_seed in "
                                     f"{self.site_config.source}): whoever knows the seed can remove it; debugging only")
        elif noisy:
            self.log_info(fl_ctx, f"{self.site}: privacy noise from OS entropy (secret, fresh for this run)")
        return noise

    def _report_budget(self, fl_ctx: FLContext, training, policy) -> None:
        from fedesm.training.privacy.policy import EpsilonBudget

        if training.dp_noise_multiplier <= 0:
            return
        self.budget = EpsilonBudget(training, policy, len(self.train_records))
        planned = self.budget.epsilon_after(training.rounds * training.steps_per_round)
        if policy.target_epsilon is None:
            self.log_info(fl_ctx, f"{self.site}: DP-SGD at delta {self.budget.delta:g}: epsilon {planned:.3f} after "
                                  f"{training.rounds} rounds (no epsilon budget set at this site)")
            return
        covered = self.budget.rounds_covered(training.rounds)
        self.log_info(fl_ctx, f"{self.site}: epsilon budget {policy.target_epsilon:g} at delta {self.budget.delta:g} "
                              f"covers {covered} of {training.rounds} rounds (all rounds would spend {planned:.3f})")

    def _privacy_metrics(self) -> dict:
        out = {}
        if self.noise_reproducible is not None:
            out["noise_reproducible"] = float(self.noise_reproducible)
        if self.budget is not None and self.budget.target is not None:
            out["epsilon_budget"] = float(self.budget.target)
        return out

    def _withhold(self, fl_ctx: FLContext, reason: str, current_round=None) -> Shareable:
        """Send nothing, and say why: the server logs it and its metrics table records it."""
        self.log_warning(fl_ctx, f"{self.site or fl_ctx.get_identity_name()}: {reason}")
        return withheld_reply(reason, current_round=current_round)

    def _ensure_setup(self, fl_ctx: FLContext, num_rounds: Optional[int]) -> None:
        if self.trainer is None:
            self._setup(fl_ctx, num_rounds)

    def _align_schedule(self, current_round, fl_ctx: FLContext) -> None:
        """A site whose first round is round k > 0 (a resumed job) takes the learning rate the job's schedule
        has there, instead of warming up again from step 0 (its optimizer moments start afresh)."""
        if self.rounds_done or not isinstance(current_round, int) or current_round <= 0:
            return
        import warnings

        steps = current_round * self.trainer.config.steps_per_round
        with warnings.catch_warnings():  # torch warns when the scheduler moves before the optimizer's first step
            warnings.simplefilter("ignore", UserWarning)
            self.trainer.scheduler.last_epoch = steps - 1
            self.trainer.scheduler.step()
        self.trainer.global_step = steps
        accountant = getattr(self.trainer.gradients, "accountant", None)
        if accountant is not None and accountant.steps < steps:
            # DP-SGD: the rounds before the resume spent privacy on this site's data too; count them as if this
            # site took part in every one (an upper bound), so the site's epsilon budget cannot restart at zero
            g = self.trainer.gradients
            accountant.step(g.noise_multiplier, g.sample_rate, steps=steps - accountant.steps)
        self.log_info(fl_ctx, f"{self.site}: joining at round {current_round + 1}: learning-rate schedule moved to "
                              f"step {steps} (lr {self.trainer.scheduler.get_last_lr()[0]:.3g})"
                      + (f"; DP-SGD accounted for the {steps} earlier steps" if accountant is not None else ""))

    # ------------------------------------------------------------------ tasks

    def execute(self, task_name: str, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        try:
            if task_name == self.train_task_name:
                return self._train(shareable, fl_ctx, abort_signal)
            if task_name == self.validate_task_name:
                return self._validate(shareable, fl_ctx, abort_signal)
            if task_name == self.submit_model_task_name:
                return self._submit_model(fl_ctx)
            self.log_error(fl_ctx, f"unknown task {task_name!r}")
            return make_reply(ReturnCode.TASK_UNKNOWN)
        except PolicyRefusal as e:  # the job asks for less privacy than this site allows: it sends nothing
            return self._withhold(fl_ctx, str(e), shareable.get_header(AppConstants.CURRENT_ROUND))
        except FedesmError as e:  # the site's own problem (data, config, checkpoint): say it plainly, here and to
            # the server (the reply's one line, no data: the server logs it and records it in its table)
            self.log_error(fl_ctx, f"{self.site or fl_ctx.get_identity_name()}: {e}")
            return withheld_reply(str(e), ReturnCode.EXECUTION_EXCEPTION, shareable.get_header(AppConstants.CURRENT_ROUND))
        except Exception as e:
            self.log_error(fl_ctx, f"task {task_name} failed: {type(e).__name__}: {e}\n{traceback.format_exc()}")
            return make_reply(ReturnCode.EXECUTION_EXCEPTION)

    def _global_state(self, shareable: Shareable) -> dict:
        """The global adapters + head of a task, truncated to this site's LoRA rank when it is below the job's
        (`fedesm.ranks.truncate_state`; before any optimizer-state alignment)."""
        weights, _ = read_weights_shareable(shareable)
        state = to_torch_dict(weights)
        if self.lora is not None and self.lora.r < (state_rank(state) or 0):
            state = truncate_state(state, self.lora.r)
        return state

    def _reply(self, meta: dict) -> Shareable:
        from fedesm.model.adapters import get_exchanged_state

        return make_weights_shareable(get_exchanged_state(self.trainer.model), meta,
                                      self.settings.federation.transfer_dtype)

    def _train(self, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        current_round = shareable.get_header(AppConstants.CURRENT_ROUND)
        num_rounds = shareable.get_header(AppConstants.NUM_ROUNDS)
        self._ensure_setup(fl_ctx, num_rounds)
        self.num_rounds = num_rounds or self.num_rounds
        if self.budget is not None:
            spent = self.budget.exhausted(self.trainer.gradients.accountant.steps)
            if spent:
                return self._withhold(fl_ctx, f"round {current_round}: {spent}", current_round)
        self._align_schedule(current_round, fl_ctx)
        t0 = time.perf_counter()
        f = self.settings.federation
        self.trainer.load_global(self._global_state(shareable), resolve_policy(f.optimizer_state, f.strategy))
        metrics = {}
        # the round's number, not a local count: a resumed job or a site that joins late continues the table
        rounds_before = current_round if isinstance(current_round, int) else self.rounds_done
        if self.settings.federation.evaluate_global:
            test = self.test_records if self.settings.federation.evaluate_global_test else None
            metrics.update({f"global_{k}": v for k, v in self._evaluate(test).items()})
        if abort_signal.triggered:  # during the global model's evaluation: stopped before the first step
            self.log_info(fl_ctx, f"{self.site}: aborted after 0 steps of round {current_round}")
            return make_reply(ReturnCode.TASK_ABORTED)
        stats = self.trainer.train_steps(self.trainer.config.steps_per_round,
                                         should_abort=lambda: abort_signal.triggered)
        if stats.aborted:
            self.log_info(fl_ctx, f"{self.site}: aborted after {stats.steps} steps of round {current_round}")
            return make_reply(ReturnCode.TASK_ABORTED)
        self.rounds_done += 1
        metrics.update(self._evaluate())
        metrics.update(train_loss=stats.loss, steps=stats.steps, train_seconds=stats.seconds,
                       residues_per_second=stats.residues_per_second, lr=stats.lr,
                       task_seconds=time.perf_counter() - t0)
        metrics.update(stats.extra)  # DP-SGD: epsilon, dp_delta, dp_steps
        metrics.update(self._privacy_metrics())  # noise_reproducible, epsilon_budget
        # under DP-SGD nothing about the secret batches (loss, seconds, throughput) leaves: a closed list does
        metrics = releasable_metrics(metrics, dp=self.trainer.config.dp_noise_multiplier > 0)
        # global model after k aggregations -> step k; the local model after its (k+1)-th round -> step k+1
        self._stream(fl_ctx, {k: v for k, v in metrics.items() if k.startswith("global_")}, global_step=rounds_before)
        self._stream(fl_ctx, {k: v for k, v in metrics.items() if not k.startswith("global_")},
                     global_step=rounds_before + 1)
        self.log_info(fl_ctx, f"{self.site} round {current_round}: loss {stats.loss:.4f}, val AUPRC "
                              f"{metrics['auprc']:.3f} F1 {metrics['f1']:.3f} (global model AUPRC "
                              f"{metrics.get('global_auprc', float('nan')):.3f}), {stats.seconds:.1f}s training")
        meta = {MetaKey.NUM_STEPS_CURRENT_ROUND: stats.steps, METRICS_KEY: metrics, SITE_KEY: self.site}
        if self.site_config is not None and self.site_config.declared_samples is not None:
            meta[N_SAMPLES_KEY] = self.site_config.declared_samples  # the operator's count, never the data's
        if self.backbone_identity:
            meta[BACKBONE_KEY] = self.backbone_identity
        reply = self._reply(meta)
        reply.set_header(AppConstants.CURRENT_ROUND, current_round)
        return reply

    def _validate(self, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        """Evaluate the model in the task (e.g. the final global model) on the local validation split."""
        from fedesm.model.adapters import get_exchanged_state, set_exchanged_state

        self._ensure_setup(fl_ctx, None)
        saved = get_exchanged_state(self.trainer.model)
        try:
            set_exchanged_state(self.trainer.model, self._global_state(shareable))  # to score it, nothing else
            metrics = self._evaluate(None if not self.settings.federation.evaluate_global_test else ...)
        finally:
            set_exchanged_state(self.trainer.model, saved)  # keep the site's own model for later tasks
        model_owner = str(shareable.get_header(AppConstants.MODEL_OWNER) or "SRV_server")
        if model_owner.startswith("SRV_"):
            # the global model after all rounds: same column names as the per-round global rows
            self._stream(fl_ctx, {f"global_{k}": v for k, v in metrics.items()},
                         global_step=self.num_rounds or self.rounds_done)
        self.log_info(fl_ctx, f"{self.site}: validated model of {model_owner}: F1 {metrics['f1']:.3f}")
        return DXO(data_kind=DataKind.METRICS, data=metrics).to_shareable()

    def _evaluate(self, test=...) -> dict:
        """The model in memory on the local val split (and `test`, default the site's test split, threshold
        tuned on val)."""
        from fedesm.evaluation.scoring import score_trainer

        return score_trainer(self.trainer, self.val_records, self.test_records if test is ... else test)

    def _submit_model(self, fl_ctx: FLContext) -> Shareable:
        if self.trainer is None:
            return make_reply(ReturnCode.EMPTY_RESULT)
        return self._reply({SITE_KEY: self.site})

    # ------------------------------------------------------------------ metrics streaming

    def _stream(self, fl_ctx: FLContext, metrics: dict, global_step: int) -> None:
        """Send metrics to the server through NVFLARE's analytics streaming (TensorBoard + metrics table)."""
        from nvflare.apis.analytix import AnalyticsDataType

        sender = fl_ctx.get_engine().get_component(self.analytic_sender_id) if self.analytic_sender_id else None
        if sender is None:
            return
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and v == v:  # skip NaN
                sender.add(tag=k, value=float(v), data_type=AnalyticsDataType.SCALAR, global_step=int(global_step))
