"""Privacy noise the job cannot seed (fedesm.training.privacy.randomness) and the site's own DP policy
(fedesm.training.privacy.policy): the noise really applied to gradients, at two sites and in two runs of the
same job seed, its scale against the setting; refusals and the epsilon budget."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedesm.cli import main
from fedesm.data.readers import write_records
from fedesm.model.adapters import build_lora_model
from fedesm.model.backbone import load_backbone
from fedesm.model.cards import read_adapter_state
from fedesm.settings import JobSettings, LoraSettings, SettingError, SitePrivacySettings, TrainConfig
from fedesm.site_run import site_training
from fedesm.training.privacy.accountant import compute_epsilon
from fedesm.training.privacy.policy import (EpsilonBudget, PolicyRefusal, accounting_delta, check_job, noise_source,
                                            refusal)
from fedesm.training.privacy.randomness import NoiseSource
from fedesm.training.trainer import LocalTrainer

SITES = ("site-1", "site-2")


# ---- the source ---------------------------------------------------------------------------------


def test_secret_sources_never_repeat_and_debug_ones_always_do():
    a, b = NoiseSource.secret(), NoiseSource.secret()
    assert not a.reproducible and a.random_bytes(32) != b.random_bytes(32)
    one, again = NoiseSource.from_seed(7, "site-1"), NoiseSource.from_seed(7, "site-1")
    assert one.reproducible and torch.equal(one.normal(1000), again.normal(1000))
    other_site = NoiseSource.from_seed(7, "site-2").normal(1000)
    assert not torch.equal(NoiseSource.from_seed(7, "site-1").normal(1000), other_site)
    # named sub-streams are independent of each other and of their parent
    parent = NoiseSource.from_seed(7, "site-1")
    x, y = parent.stream("poisson").uniform(5000), parent.stream("dpsgd-noise").uniform(5000)
    assert abs(np.corrcoef(x, y)[0, 1]) < 0.06
    assert "key" not in repr(parent) and "REPRODUCIBLE" in repr(parent)


def test_gaussians_and_uniforms_have_the_right_distribution():
    from scipy import stats

    z = NoiseSource.from_seed(0, "dist").normal(200_000, dtype=torch.float64).numpy()
    assert abs(z.mean()) < 0.01 and abs(z.std() - 1) < 0.01
    assert stats.kstest(z, "norm").pvalue > 1e-3
    assert abs(np.mean(np.abs(z) > 3) - 2 * stats.norm.sf(3)) < 5e-4  # tails as a Gaussian's
    u = NoiseSource.from_seed(0, "uni").uniform(100_000)
    assert u.min() >= 0 and u.max() < 1 and stats.kstest(u, "uniform").pvalue > 1e-3
    assert NoiseSource.secret().normal(0).numel() == 0 and NoiseSource.secret().normal(3).shape == (3,)


# ---- the noise actually applied, at two sites and in two runs of one job -------------------------


def _site_trainer(checkpoint, records, site: str, policy: SitePrivacySettings, **training) -> LocalTrainer:
    """A site's trainer exactly as SiteRun.set_up builds it: the job's settings, the site's streams and noise."""
    job = JobSettings().with_overrides({"training.seed": 11, "training.max_len": 96, "training.batch_size": 6,
                                        "training.grad_clip": 0.0, "training.class_weights": "1,4",
                                        **{f"training.{k}": v for k, v in training.items()}})
    backbone = load_backbone(str(checkpoint))
    model = build_lora_model(backbone, LoraSettings(r=4), seed=job.training.seed)
    cfg = site_training(job, site, num_rounds=1, device="cpu", privacy=policy)
    return LocalTrainer(model, backbone.alphabet, records, cfg, noise=noise_source(policy, site))


def _applied_gradient_noise(trainer: LocalTrainer, tokens, labels) -> torch.Tensor:
    """The noise the trainer added to one batch's gradients: noisy gradient minus the same clean one."""
    trainer.model.eval()  # no dropout: both passes compute the same clean gradient
    mechanism, noise = trainer.gradients, trainer.gradients.noise
    mechanism.noise = None
    trainer.optimizer.zero_grad(set_to_none=True)
    mechanism.backward(trainer.token_losses, tokens, labels)
    clean = torch.cat([p.grad.flatten().clone() for p in trainer.params])
    mechanism.noise = noise
    trainer.optimizer.zero_grad(set_to_none=True)
    mechanism.backward(trainer.token_losses, tokens, labels)
    return torch.cat([p.grad.flatten() for p in trainer.params]) - clean


def _independent(a: torch.Tensor, b: torch.Tensor) -> bool:
    return abs(float(np.corrcoef(a.numpy(), b.numpy())[0, 1])) < 5 / np.sqrt(a.numel())


def test_gradient_noise_applied_has_the_set_std_and_differs_between_sites_and_runs(tiny_checkpoint, synth_data):
    train = synth_data[0]
    std = 0.01
    secret = SitePrivacySettings()
    tokens, labels = _site_trainer(tiny_checkpoint, train, "site-1", secret).sampler.next_batch()
    draws = {(site, run): _applied_gradient_noise(_site_trainer(tiny_checkpoint, train, site, secret,
                                                                grad_noise_std=std), tokens, labels)
             for site in SITES for run in (0, 1)}
    for noise in draws.values():
        assert noise.numel() > 3000
        assert abs(float(noise.std()) / std - 1) < 0.06  # the std of what was added, not the configured value
        assert abs(float(noise.mean())) < 5 * std / np.sqrt(noise.numel())
    assert _independent(draws["site-1", 0], draws["site-2", 0])  # two sites, same job seed
    assert _independent(draws["site-1", 0], draws["site-1", 1])  # one site, the same job run twice
    # only the site's own debug seed makes it repeat (and then still not across sites)
    debug = SitePrivacySettings(debug_noise_seed=5)
    again = [_applied_gradient_noise(_site_trainer(tiny_checkpoint, train, s, debug, grad_noise_std=std),
                                     tokens, labels) for s in ("site-1", "site-1", "site-2")]
    torch.testing.assert_close(again[0], again[1], rtol=0, atol=1e-7)
    assert _independent(again[0], again[2])


def test_dpsgd_noise_and_sampling_are_secret_per_site_and_run(tiny_checkpoint, synth_data):
    train = synth_data[0]
    sigma, clip = 2.0, 0.5
    secret = SitePrivacySettings()

    def noise_and_batches(site, policy):
        trainer = _site_trainer(tiny_checkpoint, train, site, policy, dp_noise_multiplier=sigma,
                                dp_max_grad_norm=clip)
        empty = torch.zeros((0, 2), dtype=torch.long)
        trainer.gradients.backward(trainer.token_losses, empty, empty)  # an empty Poisson draw: pure noise
        noise = torch.cat([p.grad.flatten() for p in trainer.params]) * trainer.gradients.expected_batch
        sizes = [trainer.sampler.next_batch()[0].shape[0] for _ in range(30)]
        return noise, sizes

    (n11, b11), (n12, b12), (n2, _) = (noise_and_batches(s, secret) for s in ("site-1", "site-1", "site-2"))
    for noise in (n11, n12, n2):
        assert abs(float(noise.std()) / (sigma * clip) - 1) < 0.06
    assert _independent(n11, n12) and _independent(n11, n2)
    assert b11 != b12  # Poisson draws are not the seed's either
    debug = SitePrivacySettings(debug_noise_seed=1)
    (d1, s1), (d2, s2) = (noise_and_batches("site-1", debug) for _ in range(2))
    assert torch.equal(d1, d2) and s1 == s2


def _train_cli(tmp_path, out: str, *extra) -> dict:
    assert main(["train", "--train", str(tmp_path / "train.fa"), "--val", str(tmp_path / "val.fa"),
                 "--backbone", str(tmp_path / "ckpt.pt"), "--out", str(tmp_path / out), "--rounds", "1",
                 "--steps-per-round", "4", "--lora-r", "4", "--max-len", "96", "--seed", "3", "--no-progress",
                 *extra]) == 0
    return read_adapter_state(tmp_path / out / "last")


def test_fedesm_train_with_grad_noise_differs_every_run_and_without_is_bit_identical(tiny_checkpoint, synth_data,
                                                                                      tmp_path):
    import shutil

    train, val = synth_data
    write_records(train[:60], tmp_path / "train.fa")
    write_records(val, tmp_path / "val.fa")
    shutil.copy(tiny_checkpoint, tmp_path / "ckpt.pt")
    plain = [_train_cli(tmp_path, f"plain{i}") for i in range(2)]
    noisy = [_train_cli(tmp_path, f"noisy{i}", "--grad-noise", "0.01") for i in range(2)]
    assert plain[0].keys() == noisy[0].keys()
    assert all(torch.equal(plain[0][k], plain[1][k]) for k in plain[0])
    lora_b = [k for k in noisy[0] if ".lora_B." in k]
    assert all(not torch.equal(noisy[0][k], noisy[1][k]) for k in lora_b)  # B starts at 0: the noise alone moves it


# ---- the site's policy --------------------------------------------------------------------------


@pytest.mark.parametrize("policy, training, reason", [
    (SitePrivacySettings(require_dp=True), TrainConfig(), "this site requires DP-SGD (privacy.require_dp) and the "
     "job trains without it"),
    (SitePrivacySettings(require_dp=True), TrainConfig(grad_noise_std=1e-4), "its grad_noise_std 0.0001 gives no DP"),
    (SitePrivacySettings(target_epsilon=8), TrainConfig(), "requires DP-SGD (privacy.target_epsilon)"),
    (SitePrivacySettings(min_noise_multiplier=1.0), TrainConfig(), "requires DP-SGD (privacy.min_noise_multiplier)"),
    (SitePrivacySettings(require_dp=True, target_epsilon=8), TrainConfig(),  # every setting that asks for it
     "requires DP-SGD (privacy.require_dp, privacy.target_epsilon) and"),
    (SitePrivacySettings(min_noise_multiplier=1.0), TrainConfig(dp_noise_multiplier=0.5, class_weights=None),
     "the job's training.dp_noise_multiplier 0.5 is below this site's privacy.min_noise_multiplier 1"),
    (SitePrivacySettings(max_grad_norm=1.0),
     TrainConfig(dp_noise_multiplier=1.0, dp_max_grad_norm=5.0, class_weights=None),
     "the job's training.dp_max_grad_norm 5 is above this site's privacy.max_grad_norm 1"),
])
def test_a_job_asking_for_less_is_refused_in_one_line(policy, training, reason):
    assert reason in refusal(training, policy)
    with pytest.raises(PolicyRefusal, match="^site privacy policy: refusing the job: ") as e:
        check_job(training, policy)
    assert "\n" not in str(e.value)


def test_jobs_within_the_policy_run():
    dp = TrainConfig(dp_noise_multiplier=1.2, dp_max_grad_norm=0.8, class_weights=None)
    strict = SitePrivacySettings(require_dp=True, min_noise_multiplier=1.0, max_grad_norm=1.0, target_epsilon=8)
    assert refusal(dp, strict) is None
    assert refusal(TrainConfig(), SitePrivacySettings()) is None  # the default site asks nothing
    assert refusal(TrainConfig(grad_noise_std=1e-4), SitePrivacySettings(max_grad_norm=0.1)) is None


def test_epsilon_is_accounted_at_the_stricter_delta():
    assert accounting_delta(TrainConfig(dp_delta=1e-3), SitePrivacySettings(target_delta=1e-6)) == 1e-6
    assert accounting_delta(TrainConfig(dp_delta=1e-7), SitePrivacySettings()) == 1e-7
    job = JobSettings().with_overrides({"training.dp_delta": 1e-3})
    assert site_training(job, "site-1", 2, "cpu", SitePrivacySettings(target_delta=1e-6)).dp_delta == 1e-6
    assert site_training(job, "site-1", 2, "cpu").dp_delta == 1e-3


def test_the_budget_stops_before_the_round_that_would_exceed_it():
    """The cpu preset's DP arm shape: 50 steps a round, q = 8/204, sigma 1, delta 1e-5."""
    training = TrainConfig(rounds=6, steps_per_round=50, batch_size=8, dp_noise_multiplier=1.0, class_weights=None)
    per_round = [compute_epsilon(1.0, 8 / 204, 50 * k, 1e-5) for k in range(1, 7)]
    target = (per_round[2] + per_round[3]) / 2  # lasts exactly 3 rounds
    budget = EpsilonBudget(training, SitePrivacySettings(target_epsilon=target), n_train=204)
    assert [budget.epsilon_after(50 * k) for k in range(1, 7)] == pytest.approx(per_round, rel=1e-9)
    assert budget.exhausted(0) is None and budget.exhausted(100) is None
    reason = budget.exhausted(150)
    assert reason.startswith(f"epsilon budget: the next round would spend epsilon {per_round[3]:.3f} > ") and (
        f"spent {per_round[2]:.3f}" in reason)
    assert budget.rounds_covered(6) == 3
    assert EpsilonBudget(training, SitePrivacySettings(), 204).rounds_covered(6) == 6  # no budget: every round


def test_site_privacy_settings_have_one_home():
    assert SitePrivacySettings().to_dict() == {"require_dp": False, "min_noise_multiplier": 0.0, "max_grad_norm": None,
                                               "target_epsilon": None, "target_delta": 1e-5, "debug_noise_seed": None}
    assert SitePrivacySettings(target_epsilon=2).dp_required and not SitePrivacySettings().dp_required
    for bad, msg in [({"target_epsilon": 0}, "privacy.target_epsilon: the epsilon budget must be > 0"),
                     ({"target_delta": 1.5}, "privacy.target_delta: must be in (0, 1)"),
                     ({"max_grad_norm": -1}, "privacy.max_grad_norm"),
                     ({"min_noise_multiplier": -0.1}, "privacy.min_noise_multiplier: must be >= 0"),
                     ({"require_dp": "maybe"}, "privacy.require_dp: expected true or false")]:
        with pytest.raises(SettingError, match=msg.replace("(", r"\(").replace(")", r"\)")):
            SitePrivacySettings.from_dict(bad)
