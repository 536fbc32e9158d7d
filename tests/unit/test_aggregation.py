"""FRA-LoRA and the other strategies against a dense reference (d=64, r=4, K=3)."""

import numpy as np
import pytest
import torch

from fedesm.aggregation import STRATEGIES, AggregationState, aggregate, fra_lora
from fedesm.model.keys import lora_pairs

D, R, K = 64, 4, 3
PREFIX = "base_model.model.esm.layers.0.self_attn.q_proj"
A_KEY, B_KEY = f"{PREFIX}.lora_A.weight", f"{PREFIX}.lora_B.weight"
HEAD_W, HEAD_B = "base_model.model.head.weight", "base_model.model.head.bias"


def rel(x, ref):
    return np.linalg.norm(x - ref) / np.linalg.norm(ref)


def make_factors(rng, k=K, r=R, d_in=D, d_out=D, dtype=np.float64):
    return [
        (rng.standard_normal((r, d_in)).astype(dtype), rng.standard_normal((d_out, r)).astype(dtype)) for _ in range(k)
    ]


def dense_average(factors, weights):
    w = np.asarray(weights, dtype=np.float64) / np.sum(weights)
    return sum(wk * b.astype(np.float64) @ a.astype(np.float64) for wk, (a, b) in zip(w, factors))


def make_site_states(rng, k=K, n_layers=2):
    states = []
    for _ in range(k):
        st = {}
        for layer in range(n_layers):
            for proj in ("q_proj", "v_proj"):
                p = f"base_model.model.esm.layers.{layer}.self_attn.{proj}"
                st[f"{p}.lora_A.weight"] = rng.standard_normal((R, D)).astype(np.float32)
                st[f"{p}.lora_B.weight"] = rng.standard_normal((D, R)).astype(np.float32)
        st[HEAD_W] = rng.standard_normal((2, D)).astype(np.float32)
        st[HEAD_B] = rng.standard_normal(2).astype(np.float32)
        states.append(st)
    return states


# ----------------------------------------------------------------------------------- fra_lora


def test_exact_when_average_has_rank_at_most_r():
    rng = np.random.default_rng(0)
    # all sites share one column space and one row space of dimension R -> average has rank <= R
    basis_b, basis_a = rng.standard_normal((D, R)), rng.standard_normal((R, D))
    factors = [(rng.standard_normal((R, R)) @ basis_a, basis_b @ rng.standard_normal((R, R))) for _ in range(K)]
    weights = [1.0, 2.0, 3.0]
    a_new, b_new = fra_lora(factors, weights, R)
    assert a_new.shape == (R, D) and b_new.shape == (D, R)
    assert rel(b_new @ a_new, dense_average(factors, weights)) < 1e-5


def test_truncation_error_equals_eckart_young_tail():
    rng = np.random.default_rng(1)
    factors = make_factors(rng)
    weights = [0.2, 0.5, 0.3]
    avg = dense_average(factors, weights)
    s = np.linalg.svd(avg, compute_uv=False)
    assert s[R] > 1e-3 * s[0]  # the average really has rank > R, so truncation drops something
    tail = np.sqrt(np.sum(s[R:] ** 2))
    a_new, b_new = fra_lora(factors, weights, R)
    err = np.linalg.norm(avg - b_new @ a_new)
    assert abs(err - tail) / tail < 1e-5
    # and the kept spectrum is the top of the dense one
    assert np.allclose(np.linalg.svd(b_new @ a_new, compute_uv=False)[:R], s[:R], rtol=1e-8)


def test_singular_values_split_evenly():
    rng = np.random.default_rng(2)
    a_new, b_new = fra_lora(make_factors(rng), [1, 1, 1], R)
    row_norms = np.linalg.norm(a_new, axis=1)
    col_norms = np.linalg.norm(b_new, axis=0)
    assert np.allclose(row_norms, col_norms, rtol=1e-8)
    s = np.linalg.svd(b_new @ a_new, compute_uv=False)[:R]
    assert np.allclose(row_norms**2, s, rtol=1e-8)


def test_pads_with_zeros_when_rank_exceeds_k_times_r():
    rng = np.random.default_rng(3)
    factors = make_factors(rng, k=2)
    a_new, b_new = fra_lora(factors, [1, 1], 3 * R)
    assert a_new.shape == (3 * R, D) and b_new.shape == (D, 3 * R)
    assert np.all(a_new[2 * R :] == 0) and np.all(b_new[:, 2 * R :] == 0)
    assert rel(b_new @ a_new, dense_average(factors, [1, 1])) < 1e-10


def test_rectangular_and_float32_and_torch():
    rng = np.random.default_rng(4)
    factors = make_factors(rng, d_in=48, d_out=80, dtype=np.float32)
    a_np, b_np = fra_lora(factors, [1, 2, 3], R)
    assert a_np.dtype == np.float32 and a_np.shape == (R, 48) and b_np.shape == (80, R)
    t_factors = [(torch.from_numpy(a), torch.from_numpy(b)) for a, b in factors]
    a_t, b_t = fra_lora(t_factors, [1, 2, 3], R)
    assert isinstance(a_t, torch.Tensor) and a_t.dtype == torch.float32
    assert np.array_equal(a_t.numpy(), a_np) and np.array_equal(b_t.numpy(), b_np)
    a_h, _ = fra_lora([(a.bfloat16(), b.bfloat16()) for a, b in t_factors], [1, 1, 1], R)
    assert a_h.dtype == torch.bfloat16


def test_zero_weight_site_is_ignored():
    rng = np.random.default_rng(5)
    factors = make_factors(rng)
    a1, b1 = fra_lora(factors, [1.0, 0.0, 1.0], R)
    a2, b2 = fra_lora([factors[0], factors[2]], [1.0, 1.0], R)
    assert np.allclose(b1 @ a1, b2 @ a2, atol=1e-12)


def test_fra_lora_rejects_bad_input():
    rng = np.random.default_rng(6)
    factors = make_factors(rng)
    with pytest.raises(ValueError, match="weights"):
        fra_lora(factors, [1, 1], R)
    with pytest.raises(ValueError, match="weights"):
        fra_lora(factors, [1, -1, 1], R)
    with pytest.raises(ValueError, match="do not match"):
        fra_lora(factors[:2] + [(np.ones((R, D + 1)), np.ones((D, R)))], [1, 1, 1], R)
    with pytest.raises(ValueError, match="rank"):
        fra_lora(factors, [1, 1, 1], 0)


# ----------------------------------------------------------------------------------- aggregate


def test_fra_state_dict_matches_dense_per_pair_and_head_is_averaged():
    rng = np.random.default_rng(7)
    states = make_site_states(rng)
    weights = [10, 30, 60]
    out = aggregate(states, weights, "fra", rank=R)
    assert list(out) == list(states[0])
    assert all(out[k].dtype == np.float32 and out[k].shape == states[0][k].shape for k in out)
    for name, (a_key, b_key) in lora_pairs(list(out)).items():
        avg = dense_average([(s[a_key], s[b_key]) for s in states], weights)
        s_dense = np.linalg.svd(avg, compute_uv=False)
        err = np.linalg.norm(avg - out[b_key].astype(np.float64) @ out[a_key].astype(np.float64))
        assert abs(err - np.sqrt(np.sum(s_dense[R:] ** 2))) / np.linalg.norm(avg) < 1e-5
    w = np.array(weights) / 100
    for key in (HEAD_W, HEAD_B):
        assert np.allclose(out[key], sum(wk * s[key] for wk, s in zip(w, states)), atol=1e-6)


def test_float64_state_dict_is_accurate_and_stays_float64():
    rng = np.random.default_rng(8)
    basis_b, basis_a = rng.standard_normal((D, R)), rng.standard_normal((R, D))
    states = [
        {
            A_KEY: rng.standard_normal((R, R)) @ basis_a,
            B_KEY: basis_b @ rng.standard_normal((R, R)),
            HEAD_B: rng.standard_normal(2),
        }
        for _ in range(K)
    ]
    out = aggregate(states, [1, 1, 1], "fra")
    assert out[A_KEY].dtype == np.float64
    avg = dense_average([(s[A_KEY], s[B_KEY]) for s in states], [1, 1, 1])
    assert rel(out[B_KEY] @ out[A_KEY], avg) < 1e-12


def test_fedit_is_not_the_exact_average():
    rng = np.random.default_rng(9)
    states = make_site_states(rng)
    out = aggregate(states, [1, 1, 1], "fedit")
    assert np.allclose(out[A_KEY], np.mean([s[A_KEY] for s in states], axis=0), atol=1e-6)
    assert np.allclose(out[B_KEY], np.mean([s[B_KEY] for s in states], axis=0), atol=1e-6)
    exact = dense_average([(s[A_KEY], s[B_KEY]) for s in states], [1, 1, 1])
    fedit = out[B_KEY].astype(np.float64) @ out[A_KEY].astype(np.float64)
    assert rel(fedit, exact) > 0.5
    fra = aggregate(states, [1, 1, 1], "fra")
    assert np.linalg.norm(fra[B_KEY].astype(np.float64) @ fra[A_KEY] - exact) < np.linalg.norm(fedit - exact)


def test_ffa_is_exact_with_frozen_a():
    rng = np.random.default_rng(10)
    states = make_site_states(rng)
    global_state = {k: v.copy() for k, v in states[0].items()}
    for s in states[1:]:  # FFA sites never train A: every site sends the global A back
        for k in s:
            if ".lora_A." in k:
                s[k] = global_state[k].copy()
    weights = [1, 2, 5]
    out = aggregate(states, weights, "ffa", global_state=global_state)
    assert np.array_equal(out[A_KEY], global_state[A_KEY])
    exact = dense_average([(s[A_KEY], s[B_KEY]) for s in states], weights)
    assert rel(out[B_KEY].astype(np.float64) @ out[A_KEY], exact) < 1e-6


def test_ffa_rejects_trained_a():
    rng = np.random.default_rng(11)
    states = make_site_states(rng)
    with pytest.raises(ValueError, match="ffa: site 1 changed frozen"):
        aggregate(states, [1, 1, 1], "ffa", global_state=states[0])
    with pytest.raises(ValueError, match="ffa: site 0 changed frozen"):
        aggregate(states, [1, 1, 1], "ffa", global_state=make_site_states(rng, k=1)[0])


def test_fra_ef_loses_nothing_over_rounds():
    rng = np.random.default_rng(12)
    states = make_site_states(rng)
    weights = [1, 1, 2]
    state = AggregationState()
    rounds = 4
    recon_sum = {}
    for _ in range(rounds):
        out = aggregate(states, weights, "fra-ef", rank=R, state=state)
        for name, (a_key, b_key) in lora_pairs(list(out)).items():
            recon_sum[name] = recon_sum.get(name, 0) + out[b_key].astype(np.float64) @ out[a_key].astype(np.float64)
    assert state.rounds == rounds
    for name, (a_key, b_key) in lora_pairs(list(states[0])).items():
        exact = rounds * dense_average([(s[a_key], s[b_key]) for s in states], weights)
        residual = state.residual_matrix(name)
        assert residual is not None and state.residual_norms[name] > 0
        # every round's output plus what is still held back adds up to the exact total
        assert rel(recon_sum[name] + residual, exact) < 1e-5
        # without the residual something would be missing: the test can fail
        assert rel(recon_sum[name], exact) > 1e-2
        assert max(state.residuals[name][0].shape[0], 0) <= K * R


def test_fra_ef_first_round_equals_fra_and_needs_state():
    rng = np.random.default_rng(13)
    states = make_site_states(rng)
    a = aggregate(states, [1, 1, 1], "fra-ef", state=AggregationState())
    b = aggregate(states, [1, 1, 1], "fra")
    assert all(np.allclose(a[k], b[k], atol=1e-6) for k in a)
    with pytest.raises(ValueError, match="AggregationState"):
        aggregate(states, [1, 1, 1], "fra-ef")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_weight_zero_site_is_ignored_for_every_strategy(strategy):
    rng = np.random.default_rng(14)
    states = make_site_states(rng)
    if strategy == "ffa":
        for s in states[1:]:
            for k in s:
                if ".lora_A." in k:
                    s[k] = states[0][k].copy()
    bad = {k: np.full_like(v, 1e3) for k, v in states[1].items()}
    if strategy == "ffa":
        bad.update({k: v for k, v in states[0].items() if ".lora_A." in k})
    kw = {"state": AggregationState()} if strategy == "fra-ef" else {}
    with_zero = aggregate([states[0], bad, states[2]], [1, 0, 3], strategy, **kw)
    kw = {"state": AggregationState()} if strategy == "fra-ef" else {}
    without = aggregate([states[0], states[2]], [1, 3], strategy, **kw)
    for k in without:
        assert np.allclose(with_zero[k], without[k], atol=1e-6), k


def test_torch_state_dicts_come_back_as_torch():
    rng = np.random.default_rng(15)
    states = [{k: torch.from_numpy(v) for k, v in s.items()} for s in make_site_states(rng)]
    out = aggregate(states, [1, 1, 1], "fra")
    assert all(isinstance(v, torch.Tensor) and v.dtype == torch.float32 for v in out.values())


def test_peft_adapter_name_in_keys_is_paired():
    pairs = lora_pairs(["m.q.lora_A.default.weight", "m.q.lora_B.default.weight", "m.head.weight"])
    assert pairs == {"m.q.default": ("m.q.lora_A.default.weight", "m.q.lora_B.default.weight")}


def test_mismatched_input_raises():
    rng = np.random.default_rng(16)
    states = make_site_states(rng)
    with pytest.raises(ValueError, match="unknown aggregation strategy 'fedavg'; valid: fra, fra-ef, fedit, ffa"):
        aggregate(states, [1, 1, 1], "fedavg")
    missing = dict(states[1])
    del missing[HEAD_B]
    with pytest.raises(ValueError, match="site 1: keys differ"):
        aggregate([states[0], missing, states[2]], [1, 1, 1], "fra")
    extra = dict(states[2], **{"base_model.model.extra": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match="site 2: keys differ"):
        aggregate([states[0], states[1], extra], [1, 1, 1], "fra")
    reshaped = dict(states[1], **{A_KEY: np.zeros((R, D + 1), np.float32)})
    with pytest.raises(ValueError, match="shape of"):
        aggregate([states[0], reshaped, states[2]], [1, 1, 1], "fedit")
    unpaired = {k: v for k, v in states[0].items() if k != B_KEY}
    with pytest.raises(ValueError, match="no matching"):
        aggregate([unpaired], [1], "fra")
    with pytest.raises(ValueError, match="weights"):
        aggregate(states, [0, 0, 0], "fra")
    with pytest.raises(ValueError, match="no site states"):
        aggregate([], [], "fra")
