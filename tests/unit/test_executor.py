"""The site's executor: its settings per site (own random streams), built from the job's blocks."""

from __future__ import annotations

import torch

from fedesm.flare.executor import EsmLoraExecutor
from fedesm.launch.jobs import JOBS
from fedesm.model.adapters import build_lora_model
from fedesm.model.backbone import load_backbone
from fedesm.settings import LoraSettings
from fedesm.training.trainer import LocalTrainer


def test_two_sites_with_the_same_job_seed_draw_different_batches(tiny_checkpoint, synth_data):
    job = JOBS["esm2_fra_lora"].settings.with_overrides({"training.seed": 7, "training.batch_size": 4,
                                                        "training.max_len": 96})
    executor = EsmLoraExecutor(**job.to_dict())
    one, two = (executor.site_training(s, num_rounds=3, device="cpu") for s in ("site-1", "site-2"))
    assert one.seed != two.seed and one.seed == executor.site_training("site-1", 3, "cpu").seed  # reproducible
    assert one.rounds == 3 and one.replace(seed=7) == two.replace(seed=7)  # nothing else differs
    data = synth_data[0]  # the SAME records at both sites: only the streams differ

    def batches(cfg):
        backbone = load_backbone(str(tiny_checkpoint))
        trainer = LocalTrainer(build_lora_model(backbone, LoraSettings(r=4)), backbone.alphabet, data, cfg)
        return [trainer.sampler.next_batch()[0] for _ in range(3)]

    b1, b2 = batches(one), batches(two)
    assert not all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(b1, b2))
    assert all(torch.equal(x, y) for x, y in zip(b1, batches(one)))  # same site, same job seed: same batches


def test_a_resumed_dp_site_counts_the_rounds_before_the_resume(tiny_checkpoint, synth_data):
    """Joining at round 3 of a DP-SGD job: the accountant starts at 3 x N steps, not at zero, so the site's
    epsilon budget covers what the earlier rounds spent on its data."""
    from nvflare.apis.fl_context import FLContext

    from fedesm.training.privacy.accountant import compute_epsilon

    job = JOBS["esm2_fra_lora"].settings.with_overrides({
        "training.batch_size": 4, "training.max_len": 96, "training.steps_per_round": 5,
        "training.dp_noise_multiplier": 1.0, "training.dp_max_grad_norm": 1.0, "training.dp_delta": 1e-5,
        "training.class_weights": "1,4"})
    executor = EsmLoraExecutor(**job.to_dict())
    executor.site = "site-1"
    backbone = load_backbone(str(tiny_checkpoint))
    cfg = executor.site_training("site-1", num_rounds=6, device="cpu")
    executor.trainer = LocalTrainer(build_lora_model(backbone, LoraSettings(r=4)), backbone.alphabet, synth_data[0],
                                    cfg)
    g = executor.trainer.gradients
    assert g.accountant.steps == 0
    executor._align_schedule(3, FLContext())
    assert executor.trainer.global_step == 15 and g.accountant.steps == 15
    assert abs(g.epsilon() - compute_epsilon(1.0, g.sample_rate, 15, 1e-5)) < 1e-9
