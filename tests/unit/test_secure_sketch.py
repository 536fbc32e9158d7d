"""The two-pass range finder gives FRA-LoRA's global factors from two sums of per-site terms."""

import numpy as np
import pytest

from fedesm.aggregation import AggregationState, aggregate, fra_lora
from fedesm.errors import FedesmError
from fedesm.secure import masking
from fedesm.secure.sketch import (OVERSAMPLE, ServerSketch, SketchPlan, core_term, orthonormal_basis, plain_sums,
                                  range_term, refactor, site_pass1, site_pass2, sketch_width, gaussian_test_matrix)


def _pair(rng, r, d_in, d_out, dtype=np.float64):
    return (rng.standard_normal((r, d_in)) * 0.1).astype(dtype), (rng.standard_normal((d_out, r)) * 0.1).astype(dtype)


def _secure_pair(factors, weights, rank, seed=7, oversample=OVERSAMPLE):
    d_in, d_out = factors[0][0].shape[1], factors[0][1].shape[0]
    w = np.asarray(weights, dtype=np.float64) / np.sum(weights)
    s = sketch_width(sum(a.shape[0] for a, _ in factors), d_in, d_out, oversample)
    omega = gaussian_test_matrix(seed, "pair", d_in, s)
    q = orthonormal_basis(sum(range_term(a, b, omega, wk) for (a, b), wk in zip(factors, w)))
    z = sum(core_term(a, b, q, wk) for (a, b), wk in zip(factors, w))
    a_new, b_new = refactor(q, z, rank)
    return a_new.numpy(), b_new.numpy()


@pytest.mark.parametrize("n_sites", [2, 3])
@pytest.mark.parametrize("d_in, d_out, ranks, rank", [(64, 64, (4, 4, 4), 4), (48, 96, (8, 2, 5), 6),
                                                      (120, 40, (16, 16, 16), 8), (20, 24, (8, 8, 8), 8)])
def test_two_passes_give_fra_factors(n_sites, d_in, d_out, ranks, rank):
    rng = np.random.default_rng(n_sites * 1000 + d_in)
    factors = [_pair(rng, r, d_in, d_out) for r in ranks[:n_sites]]
    weights = rng.uniform(0.5, 2.0, n_sites)
    a_ref, b_ref = fra_lora(factors, weights, rank)
    a, b = _secure_pair(factors, weights, rank)
    np.testing.assert_allclose(b @ a, b_ref @ a_ref, atol=1e-10)
    np.testing.assert_allclose(a, a_ref, atol=1e-8)  # the factors themselves: same split, same signs
    np.testing.assert_allclose(b, b_ref, atol=1e-8)


def test_without_oversampling_the_range_is_still_exact():
    """s = the summed rank suffices in exact arithmetic (the range finder's guarantee, not oversampling's)."""
    rng = np.random.default_rng(3)
    factors = [_pair(rng, 4, 80, 70) for _ in range(3)]
    a_ref, b_ref = fra_lora(factors, [1, 1, 1], 4)
    a, b = _secure_pair(factors, [1, 1, 1], 4, oversample=0)
    np.testing.assert_allclose(b @ a, b_ref @ a_ref, atol=1e-10)


def test_a_too_narrow_sketch_loses_the_sum():
    """The check can fail: with s below the summed rank the range of Y misses part of M."""
    rng = np.random.default_rng(4)
    factors = [_pair(rng, 8, 60, 60) for _ in range(3)]
    d_in, d_out = 60, 60
    omega = gaussian_test_matrix(1, "p", d_in, 6)
    q = orthonormal_basis(sum(range_term(a, b, omega, 1 / 3) for a, b in factors))
    z = sum(core_term(a, b, q, 1 / 3) for a, b in factors)
    m = sum(b @ a for a, b in factors) / 3
    assert np.linalg.norm(q @ z - m) > 0.1 * np.linalg.norm(m)


def test_the_test_matrix_is_a_function_of_seed_and_name():
    assert np.array_equal(gaussian_test_matrix(5, "layer.0.q", 16, 4), gaussian_test_matrix(5, "layer.0.q", 16, 4))
    assert not np.array_equal(gaussian_test_matrix(5, "layer.0.q", 16, 4), gaussian_test_matrix(5, "layer.0.k", 16, 4))
    assert not np.array_equal(gaussian_test_matrix(5, "layer.0.q", 16, 4), gaussian_test_matrix(6, "layer.0.q", 16, 4))
    assert sketch_width(24, 320, 320) == 24 + OVERSAMPLE and sketch_width(64, 20, 48) == 20


def _state(rng, r, layers=2, d=32, head=5, dtype=np.float32):
    st = {}
    for i in range(layers):
        for m in ("query", "value"):
            a, b = _pair(rng, r, d, d, dtype)
            st[f"base_model.model.esm.encoder.layer.{i}.attention.self.{m}.lora_A.weight"] = a
            st[f"base_model.model.esm.encoder.layer.{i}.attention.self.{m}.lora_B.weight"] = b
    st["base_model.model.classifier.modules_to_save.default.weight"] = rng.standard_normal((2, head)).astype(dtype)
    return st


def _state_round(states, weights, plan, rank, extras=None, scale=1.0, residuals=None, cap=None, mask=False):
    """One round on state dicts, sums in the clear or through masks (random pairwise secrets)."""
    w = np.asarray(weights, float) / np.sum(weights)
    server = ServerSketch(plan, extras or {}, scale)
    names = [f"site-{i}" for i in range(len(states))]
    secrets = {(x, y): bytes(np.random.default_rng(hash((x, y)) % 2**32).integers(0, 256, 32, dtype=np.uint8))
               for x in names for y in names if x < y}

    def total(terms, step):
        if not mask:
            return plain_sums(terms)
        layout = masking.layout_of(terms[0])
        msgs = [masking.mask(masking.flatten(t, layout), n,
                             {p: secrets[tuple(sorted((n, p)))] for p in names if p != n}, step)
                for n, t in zip(names, terms)]
        return masking.unflatten(masking.unmask_sum(msgs, names, step), layout)

    first = total([site_pass1(s, wk, plan) for s, wk in zip(states, w)], b"p1")
    bases = server.bases({k: first[k] for k in plan.widths})
    second = total([site_pass2(s, wk, bases) for s, wk in zip(states, w)], b"p2")
    return server.finish(second, rank, residuals, residual_cap=cap, noise_floor=1e-7 if mask else 0.0), first


@pytest.mark.parametrize("mask", [False, True])
def test_state_dicts_through_masks_equal_fra_to_1e5(mask):
    rng = np.random.default_rng(11)
    states = [_state(rng, r) for r in (4, 4, 2)]
    weights = [3.0, 1.0, 2.0]
    ref = aggregate(states, weights, "fra", rank=4)
    plan = SketchPlan.for_model(99, states[0], total_rank=10)
    factors, first = _state_round(states, weights, plan, 4, mask=mask)
    for name, (a, b) in factors.items():
        a_ref, b_ref = ref[name + ".lora_A.weight"], ref[name + ".lora_B.weight"]
        np.testing.assert_allclose(a, a_ref, atol=1e-5)
        np.testing.assert_allclose(b, b_ref, atol=1e-5)
    head = "base_model.model.classifier.modules_to_save.default.weight"
    np.testing.assert_allclose(first[head], ref[head], atol=1e-6)


def test_error_feedback_and_server_lr_over_rounds_match_fra_ef():
    """fra-ef with a server step: the residual and the global pair are terms the server adds in the clear."""
    rng = np.random.default_rng(12)
    lr, rank = 0.7, 3
    ref_state, sec_state = AggregationState(), AggregationState()
    global_ref = global_sec = _state(rng, rank, dtype=np.float64)
    for rnd in range(3):
        states = [_state(rng, rank, dtype=np.float64) for _ in range(2)]
        global_ref = aggregate(states, [1, 2], "fra-ef", rank=rank, state=ref_state, global_state=global_ref,
                               server_lr=lr)
        pairs = {k[: -len(".lora_A.weight")] for k in global_sec if k.endswith(".lora_A.weight")}
        extras = {p: [(global_sec[p + ".lora_A.weight"], global_sec[p + ".lora_B.weight"], 1 - lr)] for p in pairs}
        res_rank = 0
        for p, (a_res, b_res) in sec_state.residuals.items():
            extras[p].append((a_res, b_res, 1.0))
            res_rank = max(res_rank, a_res.shape[0])
        plan = SketchPlan.for_model(rnd, global_sec, total_rank=3 * rank + res_rank)
        factors, first = _state_round(states, [1, 2], plan, rank, extras, lr, sec_state, cap=3 * rank, mask=True)
        new = dict(global_sec)
        for p, (a, b) in factors.items():
            new[p + ".lora_A.weight"], new[p + ".lora_B.weight"] = a, b
        head = "base_model.model.classifier.modules_to_save.default.weight"
        new[head] = lr * first[head] + (1 - lr) * global_sec[head]
        global_sec = new
        for k in global_ref:
            np.testing.assert_allclose(global_sec[k], global_ref[k], atol=1e-5, err_msg=f"round {rnd} {k}")
        for p in ref_state.residuals:
            np.testing.assert_allclose(sec_state.residual_matrix(p), ref_state.residual_matrix(p), atol=1e-5)
    assert ref_state.residuals and set(sec_state.residuals) == set(ref_state.residuals)


def test_a_site_whose_pairs_differ_from_the_plan_is_refused():
    rng = np.random.default_rng(1)
    st = _state(rng, 2)
    plan = SketchPlan.for_model(0, st, 4)
    del st["base_model.model.esm.encoder.layer.1.attention.self.value.lora_A.weight"]
    del st["base_model.model.esm.encoder.layer.1.attention.self.value.lora_B.weight"]
    with pytest.raises(FedesmError, match="differ from the round's plan"):
        site_pass1(st, 0.5, plan)
