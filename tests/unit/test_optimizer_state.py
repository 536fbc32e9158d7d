"""What a site does with its optimizer state when re-factored global adapters arrive (keep, reset, align)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedesm.aggregation import aggregate, fra_lora
from fedesm.model.adapters import build_lora_model, get_exchanged_state, initial_exchanged_state
from fedesm.architectures import get_architecture
from fedesm.model.backbone import load_backbone
from fedesm.settings import LoraSettings, TrainConfig
from fedesm.training.optimizer_state import align_factors, reset_lora_moments, resolve_optimizer_state
from fedesm.training.trainer import LocalTrainer


def _factors(seed, r=6, d=40):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(r, d, generator=g), torch.randn(d, r, generator=g)


def test_align_returns_a_sites_own_factors_after_fra_over_that_site_alone():
    a, b = _factors(0)
    a_g, b_g = fra_lora([(a, b)], [1.0], rank=6)
    assert float((a_g - a).abs().max()) > 0.5  # FRA's SVD puts the same product in another basis
    a_al, b_al, ok = align_factors(a, b, a_g, b_g)
    assert ok
    torch.testing.assert_close(a_al, a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b_al, b, atol=1e-5, rtol=1e-5)


def test_align_keeps_the_global_product_and_moves_toward_the_local_factors():
    (a1, b1), (a2, b2) = _factors(1), _factors(2)
    a_g, b_g = fra_lora([(a1, b1), (a2, b2)], [0.5, 0.5], rank=6)
    a_al, b_al, ok = align_factors(a1, b1, a_g, b_g)
    assert ok
    torch.testing.assert_close(b_al @ a_al, b_g @ a_g, atol=1e-4, rtol=1e-4)
    before = (a_g - a1).norm() ** 2 + (b_g - b1).norm() ** 2
    after = (a_al - a1).norm() ** 2 + (b_al - b1).norm() ** 2
    assert after < 0.6 * before


def test_align_falls_back_to_the_global_factors_when_no_gauge_fits():
    a, b = _factors(3)
    zero_a, zero_b = torch.zeros_like(a), torch.zeros_like(b)  # a global update of rank 0: G is singular
    a_al, b_al, ok = align_factors(a, b, zero_a, zero_b)
    assert not ok and torch.equal(a_al, zero_a) and torch.equal(b_al, zero_b)


def test_auto_policy_follows_the_strategy():
    assert [resolve_optimizer_state("auto", s) for s in ("fra", "fra-ef", "fedit", "ffa")] == ["align", "align", "keep", "keep"]
    assert resolve_optimizer_state("reset", "fedit") == "reset"
    with pytest.raises(ValueError, match="unknown optimizer-state policy"):
        resolve_optimizer_state("zero", "fra")


def _trainer(checkpoint, records, seed=0):
    backbone = load_backbone(str(checkpoint))
    model = build_lora_model(backbone, LoraSettings(r=4, alpha=8), seed=seed)
    config = TrainConfig(rounds=4, steps_per_round=6, batch_size=4, lr=5e-3, max_len=96, seed=seed, device="cpu")
    return LocalTrainer(model, backbone.alphabet, records, config)


def test_reset_forgets_only_the_lora_moments(tiny_checkpoint, synth_data):
    trainer = _trainer(tiny_checkpoint, synth_data[0])
    trainer.train_steps(2)
    n = reset_lora_moments(trainer.model, trainer.optimizer)
    assert n == 2 * 3 * 2  # A and B of q, k, v in 2 layers
    for name, p in trainer.model.named_parameters():
        if p.requires_grad:
            assert (trainer.optimizer.state[p] == {}) == ("lora_" in name), name


def _federated_one_site(checkpoint, records, policy, rounds=4, steps=6):
    """The executor's path for one site: load the global (with `policy`), train, send; the server's FRA."""
    trainer = _trainer(checkpoint, records)
    glob = initial_exchanged_state(get_architecture("esm2_t2_tiny"), LoraSettings(r=4, alpha=8), seed=0)
    losses = []
    for _ in range(rounds):
        trainer.load_global(glob, policy)
        losses.append(trainer.train_steps(steps).loss)
        sent = {k: v.numpy() for k, v in get_exchanged_state(trainer.model).items()}
        glob = {k: torch.as_tensor(v) for k, v in aggregate([sent], [1.0], "fra", rank=4).items()}
    return losses


def _alone(checkpoint, records, rounds=4, steps=6):
    trainer = _trainer(checkpoint, records)
    trainer.load_global(initial_exchanged_state(get_architecture("esm2_t2_tiny"), LoraSettings(r=4, alpha=8), seed=0))
    return [trainer.train_steps(steps).loss for _ in range(rounds)]


def test_fra_over_one_site_trains_exactly_like_that_site_alone_with_the_default_policy(tiny_checkpoint, synth_data):
    """The invariance a correct federated step must have: with one site nothing is averaged, so nothing may
    change. The default policy for fra (align) keeps it; the old behaviour (keep the moments of the old
    basis while loading re-factored factors) does not."""
    alone = _alone(tiny_checkpoint, synth_data[0])
    aligned = _federated_one_site(tiny_checkpoint, synth_data[0], resolve_optimizer_state("auto", "fra"))
    np.testing.assert_allclose(aligned, alone, rtol=1e-4)
    kept = _federated_one_site(tiny_checkpoint, synth_data[0], "keep")
    assert kept[0] == pytest.approx(alone[0], rel=1e-6)  # the first round starts from the same model
    assert max(abs(k - a) / a for k, a in zip(kept[1:], alone[1:])) > 1e-3  # then stale moments move it away
