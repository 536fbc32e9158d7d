"""Sites of different means: a site's smaller LoRA rank, truncation of the global adapters to it, FRA-LoRA over
contributions of different ranks, the aggregator's rank rule, and 'align' after truncation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedesm.aggregation import aggregate
from fedesm.errors import FedesmError
from fedesm.flare.aggregator import FraLoraAggregator
from fedesm.ranks import site_lora, state_rank, truncate_state
from fedesm.settings import LoraSettings

from tests.server_parts import context, contribution

D_IN, D_OUT = 24, 20
P = "base_model.model.esm.layers.0.self_attn.q_proj"
A, B = f"{P}.lora_A.weight", f"{P}.lora_B.weight"
HEAD = "base_model.model.classifier.weight"


def state(rank, seed, dtype=np.float64):
    rng = np.random.default_rng(seed)
    return {A: rng.standard_normal((rank, D_IN)).astype(dtype), B: rng.standard_normal((D_OUT, rank)).astype(dtype),
            HEAD: rng.standard_normal((2, D_OUT)).astype(dtype)}


def best_rank(m, r):
    u, s, vt = np.linalg.svd(m)
    return (u[:, :r] * s[:r]) @ vt[:r]


def test_site_lora_keeps_the_update_scale():
    job = LoraSettings(r=16, alpha=32)
    site = site_lora(job, 4)
    assert (site.r, site.alpha) == (4, 8) and site.alpha / site.r == job.alpha / job.r
    assert site.targets == job.targets and site.dropout == job.dropout
    assert site_lora(job, None) is job and site_lora(job, 16) is job
    with pytest.raises(FedesmError, match="between 1 and the job's lora.r"):
        site_lora(job, 32)


def test_truncate_state_is_the_best_rank_r_product():
    g = state(16, 0)
    t = truncate_state(g, 4)
    assert t[A].shape == (4, D_IN) and t[B].shape == (D_OUT, 4) and state_rank(t) == 4
    np.testing.assert_allclose(t[B] @ t[A], best_rank(g[B] @ g[A], 4), atol=1e-10)
    np.testing.assert_array_equal(t[HEAD], g[HEAD])  # the head is not a LoRA pair
    assert truncate_state(g, 16)[A] is g[A]  # already at the rank
    torch_state = {k: torch.tensor(v, dtype=torch.float32) for k, v in g.items()}
    tt = truncate_state(torch_state, 4)
    assert isinstance(tt[A], torch.Tensor) and tt[A].dtype == torch.float32
    np.testing.assert_allclose((tt[B] @ tt[A]).numpy(), best_rank(g[B] @ g[A], 4), rtol=1e-4, atol=1e-4)


def test_truncating_the_round_zero_init_keeps_a_alive():
    """Round 0: B = 0, so the product is 0; the site keeps A's first rows (PEFT's init at its rank), not zeros."""
    g = state(16, 1)
    g[B] = np.zeros_like(g[B])
    t = truncate_state(g, 4)
    np.testing.assert_array_equal(t[A], g[A][:4])
    assert not t[B].any() and t[B].shape == (D_OUT, 4)


def test_fra_averages_products_of_different_ranks():
    s4, s16 = state(4, 2), state(16, 3)
    out = aggregate([s4, s16], [1, 3], strategy="fra", rank=16)
    assert out[A].shape == (16, D_IN) and out[B].shape == (D_OUT, 16)
    mean = 0.25 * s4[B] @ s4[A] + 0.75 * s16[B] @ s16[A]
    np.testing.assert_allclose(out[B] @ out[A], best_rank(mean, 16), atol=1e-9)
    np.testing.assert_allclose(out[HEAD], 0.25 * s4[HEAD] + 0.75 * s16[HEAD])
    with pytest.raises(ValueError, match="fedit averages the factors themselves"):
        aggregate([s4, s16], [1, 1], strategy="fedit")


def test_aggregator_rank_rule():
    glob = {k: v.astype(np.float32) for k, v in state(16, 4).items()}
    fl_ctx = context(global_weights=glob)
    agg = FraLoraAggregator(lora={"r": 16}, federation={"strategy": "fra", "weigh_by": "uniform"})
    assert agg.accept(contribution(state(4, 5, np.float32), "site-1"), fl_ctx)
    assert agg.accept(contribution(state(16, 6, np.float32), "site-2"), fl_ctx)
    too_big = state(32, 7, np.float32)
    assert not agg.accept(contribution(too_big, "site-3"), fl_ctx)
    assert "global model has (16, 24)" in agg.last_reject_reason
    mixed = state(4, 8, np.float32)
    mixed[B] = np.zeros((D_OUT, 8), np.float32)  # A rank 4, B rank 8: not one pair
    assert not agg.accept(contribution(mixed, "site-4"), fl_ctx)
    assert "not one LoRA pair" in agg.last_reject_reason
    wrong_width = state(4, 9, np.float32)
    wrong_width[A] = np.zeros((4, D_IN + 1), np.float32)
    assert not agg.accept(contribution(wrong_width, "site-5"), fl_ctx)
    out = agg.aggregate(fl_ctx)
    from nvflare.apis.dxo import from_shareable

    data = from_shareable(out).data
    assert data[A].shape == (16, D_IN)  # the server keeps the job's rank
    fedit = FraLoraAggregator(lora={"r": 16}, federation={"strategy": "fedit", "weigh_by": "uniform"})
    assert not fedit.accept(contribution(state(4, 5, np.float32), "site-1"), fl_ctx)  # fedit needs equal ranks


def test_align_after_truncation(tiny_checkpoint, synth_data):
    """A rank-4 site under a rank-16 job: the truncated global adapters load into its rank-4 PEFT model and the
    'align' policy aligns every pair (the optimizer moments stay with factors of the right shape)."""
    from fedesm.model.adapters import build_lora_model, get_exchanged_state, initial_exchanged_state
    from fedesm.architectures import get_architecture
    from fedesm.model.backbone import load_backbone
    from fedesm.settings import TrainConfig
    from fedesm.training.trainer import LocalTrainer

    job = LoraSettings(r=16)
    lora = site_lora(job, 4)
    backbone = load_backbone(str(tiny_checkpoint))
    trainer = LocalTrainer(build_lora_model(backbone, lora), backbone.alphabet, synth_data[0],
                           TrainConfig(rounds=2, steps_per_round=2, batch_size=2, max_len=64, lr=0.01))
    glob = initial_exchanged_state(get_architecture("esm2_t2_tiny"), job)
    assert trainer.load_global(truncate_state(glob, 4), "align")["policy"] == "initial"
    trainer.train_steps(2)
    local = get_exchanged_state(trainer.model)
    # a global model of rank 16 whose product holds the site's own update plus a rank-12 tail elsewhere
    rng = np.random.default_rng(0)
    g16 = {}
    for k, v in local.items():
        g16[k] = v.clone()
    for a_key in [k for k in local if k.endswith("lora_A.weight")]:
        b_key = a_key.replace("lora_A", "lora_B")
        a, b = local[a_key].double(), local[b_key].double()
        tail_a = torch.tensor(rng.standard_normal((12, a.shape[1]))) * 1e-3
        tail_b = torch.tensor(rng.standard_normal((b.shape[0], 12))) * 1e-3
        g16[a_key] = torch.cat([a, tail_a]).float()
        g16[b_key] = torch.cat([b, tail_b], dim=1).float()
    info = trainer.load_global(truncate_state(g16, 4), "align")
    assert info["policy"] == "align" and info["aligned_pairs"] == info["lora_pairs"] > 0
    after = get_exchanged_state(trainer.model)
    for a_key in [k for k in local if k.endswith("lora_A.weight")]:
        b_key = a_key.replace("lora_A", "lora_B")
        assert after[a_key].shape == (4, local[a_key].shape[1])
        # aligned: close to the site's own factors, not a rotated basis
        assert float((after[a_key] - local[a_key]).abs().max()) < 0.05 * float(local[a_key].abs().max()) + 1e-3
    trainer.train_steps(1)  # and training goes on with the kept moments
