"""DP-SGD (`fedesm.dp`): exact per-sample gradients, the clipping bound, the noise scale, Poisson
batches, the trainer hook, and epsilon against Opacus' own RDP accountant."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedesm.training.privacy.accountant import RDPAccountant, compute_epsilon, noise_multiplier_for
from fedesm.training.privacy.dpsgd import PerSampleGradients, PoissonBatchSampler, clip_and_sum
from fedesm.errors import FedesmError
from fedesm.model.adapters import build_lora_model
from fedesm.model.backbone import load_backbone
from fedesm.settings import LoraSettings, TrainConfig
from fedesm.training.trainer import LocalTrainer


def _trainer(checkpoint, records, **cfg):
    backbone = load_backbone(str(checkpoint))
    model = build_lora_model(backbone, LoraSettings(r=4))
    # CPU on purpose: exact-arithmetic checks, and CUDA's length-bucketed batches would hold no padding
    config = TrainConfig(**{"device": "cpu", "steps_per_round": 5, "lr": 3e-3, "batch_size": 6, "max_len": 96,
                            "dp_noise_multiplier": 1.0, "dp_max_grad_norm": 1.0,
                            "class_weights": "1,4", **cfg})
    return LocalTrainer(model, backbone.alphabet, records, config)


def _per_sample(trainer, tokens, labels):
    dp = trainer.gradients
    dp.grads.enabled = True
    dp.per_sample_losses(trainer.token_losses, tokens, labels).sum().backward()
    dp.grads.enabled = False
    return dp.grads.compute(tokens.shape[0])


def test_per_sample_gradients_equal_one_sequence_at_a_time(tiny_checkpoint, synth_data):
    train, _ = synth_data
    trainer = _trainer(tiny_checkpoint, train)
    trainer.model.eval()  # no dropout: the two computations must agree exactly
    tokens, labels = trainer.sampler.base.next_batch()
    lengths = (tokens != trainer.tokenizer.padding_idx).sum(1)
    assert lengths.min() < lengths.max()  # padding inside the batch is part of the test
    per_sample = _per_sample(trainer, tokens, labels)
    assert {id(p) for p, _ in per_sample} == {id(p) for p in trainer.params}  # LoRA (layout T,B,C) + head (B,T,C)
    for i in range(tokens.shape[0]):
        n = int(lengths[i])
        trainer.optimizer.zero_grad()
        trainer.gradients.per_sample_losses(trainer.token_losses, tokens[i : i + 1, :n], labels[i : i + 1, :n]).sum().backward()
        for p, grads in per_sample:
            torch.testing.assert_close(grads[i], p.grad, rtol=1e-4, atol=1e-7)


def test_clipping_bounds_every_sample_and_keeps_small_ones(tiny_checkpoint, synth_data):
    train, _ = synth_data
    trainer = _trainer(tiny_checkpoint, train)
    tokens, labels = trainer.sampler.base.next_batch()
    per_sample = _per_sample(trainer, tokens, labels)
    norms = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for _, g in per_sample))
    bound = float(norms.median())  # half the samples are above it, half below
    summed, before, after = clip_and_sum(per_sample, bound)
    torch.testing.assert_close(before, norms)
    assert bool((after <= bound * (1 + 1e-5)).all())
    small = norms < bound
    assert small.any() and (~small).any()
    torch.testing.assert_close(after[small], norms[small], rtol=1e-5, atol=0)  # below C: untouched
    # the sum equals the explicit sum of rescaled per-sample gradients, so its norm is <= B * C
    factor = torch.clamp(bound / (norms + 1e-6), max=1.0)
    for p, g in per_sample:
        torch.testing.assert_close(summed[id(p)], (g * factor.view(-1, *[1] * (g.dim() - 1))).sum(0))
    total = math.sqrt(sum(float(v.pow(2).sum()) for v in summed.values()))
    assert total <= tokens.shape[0] * bound * (1 + 1e-5)


def test_noise_has_std_sigma_c_over_expected_batch(tiny_checkpoint, synth_data):
    train, _ = synth_data
    sigma, clip = 2.0, 0.5
    trainer = _trainer(tiny_checkpoint, train, dp_noise_multiplier=sigma, dp_max_grad_norm=clip)
    dp = trainer.gradients
    empty = torch.zeros((0, 2), dtype=torch.long)
    dp.backward(trainer.token_losses, empty, empty)  # an empty Poisson draw: the update is pure noise
    noise = torch.cat([p.grad.flatten() for p in trainer.params])
    expected = sigma * clip / (trainer.config.batch_size)  # expected batch = q * n = batch_size
    assert noise.numel() > 2000
    assert abs(float(noise.std()) / expected - 1) < 0.05
    assert abs(float(noise.mean())) < 4 * expected / math.sqrt(noise.numel())
    assert dp.accountant.steps == 1  # an empty step still spends privacy


def test_poisson_batches_have_the_expected_size(synth_data, tiny_checkpoint):
    train, _ = synth_data
    trainer = _trainer(tiny_checkpoint, train, batch_size=10)
    sampler = trainer.sampler
    assert isinstance(sampler, PoissonBatchSampler) and sampler.sample_rate == pytest.approx(10 / len(train))
    sizes = [sampler.next_batch()[0].shape[0] for _ in range(400)]
    assert abs(np.mean(sizes) - 10) < 0.5
    assert np.std(sizes) > 1.5  # variable, as Poisson sampling is (fixed-size batches would give 0)


def test_trainer_reports_epsilon_and_trains_only_adapters(tiny_checkpoint, synth_data):
    train, _ = synth_data
    trainer = _trainer(tiny_checkpoint, train, dp_delta=1e-4)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    stats = trainer.train_steps(5)
    q = trainer.config.batch_size / len(train)
    assert stats.extra["dp_steps"] == 5
    assert stats.extra["epsilon"] == pytest.approx(compute_epsilon(1.0, q, 5, 1e-4))
    assert stats.extra["dp_delta"] == 1e-4
    assert np.isfinite(stats.loss)
    for n, p in trainer.model.named_parameters():
        trainable = ("lora_" in n) or ("classifier" in n and "original_module" not in n)
        assert trainable or torch.equal(before[n], p.detach()), n
    stats2 = trainer.train_steps(5)
    assert stats2.extra["epsilon"] > stats.extra["epsilon"]


def test_trainer_reports_the_prv_epsilon_beside_rdp_only_when_asked(tiny_checkpoint, synth_data):
    from fedesm.evaluation.release import releasable_under_dp

    train, _ = synth_data
    assert "epsilon_prv" not in _trainer(tiny_checkpoint, train).train_steps(2).extra
    trainer = _trainer(tiny_checkpoint, train, dp_report_prv=True)
    stats = trainer.train_steps(2)
    acc = trainer.gradients.accountant
    assert stats.extra["epsilon_prv"] == acc.prv_epsilon(1e-5) and stats.extra["epsilon"] == acc.get_epsilon(1e-5)
    assert 0 < stats.extra["epsilon_prv"] < stats.extra["epsilon"]
    assert releasable_under_dp("epsilon_prv")  # it may leave a DP site: same public numbers as epsilon


def test_dp_sgd_and_paper_noise_are_exclusive(tiny_checkpoint, synth_data):
    train, _ = synth_data
    with pytest.raises(FedesmError, match="one privacy mode"):
        _trainer(tiny_checkpoint, train, grad_noise_std=1e-4)


def test_parameters_outside_linear_layers_are_refused():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.LayerNorm(3))
    with pytest.raises(FedesmError, match="not in nn.Linear"):
        PerSampleGradients(model, list(model.parameters()))


@pytest.mark.parametrize("q,sigma,steps,delta", [
    (0.01, 1.0, 1000, 1e-5),
    (8 / 204, 1.0, 360, 1e-5),  # the cpu preset's DP-SGD arm, roughly
    (0.1, 2.0, 50, 1e-3),
    (0.5, 0.7, 10, 1e-6),
    (1.0, 3.0, 20, 1e-5),
])
def test_epsilon_matches_opacus(q, sigma, steps, delta):
    from opacus.accountants import RDPAccountant as OpacusRDP

    theirs = OpacusRDP()
    ours = RDPAccountant()
    for _ in range(steps):
        theirs.step(noise_multiplier=sigma, sample_rate=q)
        ours.step(sigma, q)
    expected = theirs.get_epsilon(delta)
    assert ours.get_epsilon(delta) == pytest.approx(expected, rel=1e-6)
    assert compute_epsilon(sigma, q, steps, delta) == pytest.approx(expected, rel=1e-6)


def test_epsilon_of_mixed_history_matches_opacus():
    from opacus.accountants import RDPAccountant as OpacusRDP

    theirs, ours = OpacusRDP(), RDPAccountant()
    for sigma, q, n in [(1.0, 0.02, 100), (1.5, 0.05, 40), (1.0, 0.02, 10)]:
        for _ in range(n):
            theirs.step(noise_multiplier=sigma, sample_rate=q)
            ours.step(sigma, q)
    assert ours.get_epsilon(1e-5) == pytest.approx(theirs.get_epsilon(1e-5), rel=1e-6)


# Epsilons computed by the hand-written RDP accountant this module replaced (commit 35c593b), pinned: the move
# to Opacus' analysis must leave every reported epsilon, and so every site's budget, where it was.
@pytest.mark.parametrize("sigma,q,steps,delta,epsilon", [
    (1.0, 0.01, 1000, 1e-5, 2.1013652716430564),
    (0.8, 0.004, 3000, 1e-5, 2.4587987186711606),
    (2.0, 0.1, 100, 1e-6, 2.9141734583973755),
    (1.1, 0.256, 30, 1e-5, 9.521848515131703),
    (5.0, 0.5, 10, 1e-3, 0.9576767602546399),
    (0.6, 1e-4, 10 ** 6, 1e-5, 2.3881720585362554),
])
def test_epsilon_is_unchanged_from_the_hand_written_accountant(sigma, q, steps, delta, epsilon):
    assert compute_epsilon(sigma, q, steps, delta) == pytest.approx(epsilon, abs=1e-6)


def test_mixed_history_and_noise_search_are_unchanged_from_the_hand_written_accountant():
    acc = RDPAccountant()
    for sigma, q, n in [(1.0, 0.01, 500), (2.0, 0.02, 300), (1.0, 0.01, 200)]:
        acc.step(sigma, q, steps=n)
    eps, order = acc.get_privacy_spent(1e-5)
    assert eps == pytest.approx(1.9812060361682349, abs=1e-6) and order == 8.0
    assert acc.history == [(1.0, 0.01, 500), (2.0, 0.02, 300), (1.0, 0.01, 200)]  # Opacus' history format
    assert noise_multiplier_for(3.0, 1e-5, 0.01, 1000) == 0.8671875


def test_prv_epsilon_is_opacus_and_tighter_than_rdp(monkeypatch):
    from opacus.accountants import PRVAccountant

    from fedesm.training.privacy import accountant

    acc = RDPAccountant()
    assert acc.prv_epsilon(1e-5) == 0.0  # before any step
    acc.step(1.0, 0.01, steps=1000)
    theirs = PRVAccountant()
    theirs.history = [(1.0, 0.01, 1000)]
    prv = acc.prv_epsilon(1e-5)
    assert prv == pytest.approx(theirs.get_epsilon(1e-5), abs=1e-9)
    assert 1.7 < prv < acc.get_epsilon(1e-5) == pytest.approx(2.1013652716430564, abs=1e-6)
    monkeypatch.setattr(accountant, "MAX_PRV_GRID", 10 ** 5)  # this history's grid has ~1.3e5 points
    assert acc.prv_epsilon(1e-5) is None and acc.get_epsilon(1e-5) == pytest.approx(2.1013652716430564, abs=1e-6)
    monkeypatch.undo()
    acc.step(1e-3, 0.01, steps=100)  # so little noise that PRV's grid would hold ~4e11 points: refused, not allocated
    assert acc.prv_epsilon(1e-5) is None and math.isfinite(acc.get_epsilon(1e-5))


def test_epsilon_grows_with_steps_and_falls_with_noise():
    assert compute_epsilon(1.0, 0.05, 0, 1e-5) == 0.0
    eps = [compute_epsilon(1.0, 0.05, s, 1e-5) for s in (10, 100, 1000)]
    assert eps[0] < eps[1] < eps[2]
    assert compute_epsilon(2.0, 0.05, 100, 1e-5) < eps[1]


def test_noise_multiplier_for_a_target_epsilon():
    sigma = noise_multiplier_for(3.0, 1e-5, 0.04, 300)
    assert compute_epsilon(sigma, 0.04, 300, 1e-5) <= 3.0
    assert compute_epsilon(sigma - 0.02, 0.04, 300, 1e-5) > 3.0
