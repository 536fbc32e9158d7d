"""A site's parts the tests build by hand: a `SiteRun` on the tiny checkpoint and synthetic data, assembled
as `SiteRun.set_up` assembles them, and the metric names a round reports (shared by the site-run and executor tests)."""

from __future__ import annotations

from fedesm.launch.jobs import JOBS
from fedesm.model.adapters import build_lora_model
from fedesm.model.backbone import load_backbone
from fedesm.ranks import site_lora
from fedesm.site_run import SiteRun, site_training
from fedesm.training.trainer import LocalTrainer

SMALL = {"training.batch_size": 4, "training.max_len": 96, "training.steps_per_round": 2, "lora.r": 4,
         "model.arch": "esm2_t2_tiny"}
DP = {"training.dp_noise_multiplier": 1.0, "training.dp_max_grad_norm": 1.0, "training.dp_delta": 1e-5,
      "training.class_weights": "1,4"}
EVAL = {"accuracy", "precision", "recall", "f1", "mcc", "auroc", "auprc", "threshold_tuned"}
# what a round reported before SiteRun existed (the executor's own metrics), without DP and without a test split
ROUND_KEYS = EVAL | {f"global_{k}" for k in EVAL} | {"train_loss", "steps", "train_seconds", "residues_per_second",
                                                     "lr", "task_seconds"}


def site_run(checkpoint, data, overrides=None, site_rank=None, privacy=None, rounds=6, site="site-1") -> SiteRun:
    """A SiteRun from parts, exactly as `SiteRun.set_up` assembles them."""
    job = JOBS["esm2_fra_lora"].settings.with_overrides({**SMALL, **(overrides or {})})
    backbone = load_backbone(str(checkpoint))
    lora = site_lora(job.lora, site_rank)
    trainer = LocalTrainer(build_lora_model(backbone, lora, seed=job.training.seed), backbone.alphabet, data[0],
                           site_training(job, site, rounds, "cpu", privacy))
    return SiteRun(job, site, trainer, data[0], data[1][:20], lora=lora, privacy=privacy, num_rounds=rounds)
