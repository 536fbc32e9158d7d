"""FRA-LoRA and the other strategies against a dense reference (d=64, r=4, K=3)."""

import numpy as np
import pytest
import torch

from fedesm.aggregation import STRATEGIES, AggregationState, aggregate, fra_lora
from fedesm.keys import lora_pairs

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


# ----------------------------------------------------------------------------------- speed-minded core
# The routes, float32 maths and batched calls must keep the accuracy above: exact below rank r to
# 1e-5 relative, the Eckart-Young tail above it.

from fedesm import aggregation  # noqa: E402
from fedesm.aggregation import _refactor, choose_route  # noqa: E402


def _stacks(factors, weights, dtype):
    w = np.asarray(weights, dtype=np.float64) / np.sum(weights)
    a = torch.from_numpy(np.concatenate([f[0] for f in factors], axis=0)).to(dtype)
    b = torch.from_numpy(np.concatenate([f[1] for f in factors], axis=1)).to(dtype)
    cols = torch.from_numpy(np.repeat(w, factors[0][0].shape[0])).to(dtype)
    return a, b, cols


def _low_rank_factors(rng, k, r, d_in, d_out):
    basis_b, basis_a = rng.standard_normal((d_out, r)), rng.standard_normal((r, d_in))
    return [(rng.standard_normal((r, r)) @ basis_a, basis_b @ rng.standard_normal((r, r))) for _ in range(k)]


@pytest.mark.parametrize("route", ["factored", "dense"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("d_in,d_out", [(D, D), (48, 80), (80, 48)])
def test_both_routes_exact_below_rank_r(route, dtype, d_in, d_out):
    rng = np.random.default_rng(20)
    factors = _low_rank_factors(rng, K, R, d_in, d_out)
    a, b, cols = _stacks(factors, [1.0, 2.0, 3.0], dtype)
    a_new, b_new = _refactor(a, b, cols, R, route=route)
    assert a_new.dtype == dtype and a_new.shape == (R, d_in) and b_new.shape == (d_out, R)
    prod = b_new.double().numpy() @ a_new.double().numpy()
    assert rel(prod, dense_average(factors, [1.0, 2.0, 3.0])) < 1e-5


@pytest.mark.parametrize("route", ["factored", "dense"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("d_in,d_out", [(D, D), (48, 80), (80, 48)])
def test_both_routes_truncate_to_the_eckart_young_tail(route, dtype, d_in, d_out):
    rng = np.random.default_rng(21)
    factors = make_factors(rng, d_in=d_in, d_out=d_out)
    weights = [0.2, 0.5, 0.3]
    avg = dense_average(factors, weights)
    s = np.linalg.svd(avg, compute_uv=False)
    tail = np.sqrt(np.sum(s[R:] ** 2))
    a, b, cols = _stacks(factors, weights, dtype)
    a_new, b_new, dropped = _refactor(a, b, cols, R, route=route, tail=True)
    err = np.linalg.norm(avg - b_new.double().numpy() @ a_new.double().numpy())
    assert abs(err - tail) / tail < 1e-5
    # the dropped part is exactly what is missing, and its singular values are the dense ones
    dropped_matrix = dropped.b.double().numpy() @ dropped.a.double().numpy()
    assert rel(b_new.double().numpy() @ a_new.double().numpy() + dropped_matrix, avg) < 1e-5
    n = min(K * R, d_in, d_out) - R
    assert np.allclose(dropped.s.double().numpy()[:n], s[R : R + n], rtol=1e-4, atol=1e-5 * s[0])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fra_lora_float32_meets_the_same_tolerances(dtype):
    rng = np.random.default_rng(22)
    low = [(a.astype(dtype), b.astype(dtype)) for a, b in _low_rank_factors(rng, K, R, D, D)]
    a_new, b_new = fra_lora(low, [1.0, 2.0, 3.0], R)
    assert a_new.dtype == dtype
    assert rel(b_new.astype(np.float64) @ a_new, dense_average(low, [1.0, 2.0, 3.0])) < 1e-5
    full = make_factors(rng, dtype=dtype)
    avg = dense_average(full, [0.2, 0.5, 0.3])
    s = np.linalg.svd(avg, compute_uv=False)
    a_new, b_new = fra_lora(full, [0.2, 0.5, 0.3], R)
    err = np.linalg.norm(avg - b_new.astype(np.float64) @ a_new.astype(np.float64))
    assert abs(err - np.sqrt(np.sum(s[R:] ** 2))) / np.sqrt(np.sum(s[R:] ** 2)) < 1e-5


def test_route_follows_the_shape():
    assert choose_route(8 * 16, 1280, 1280) == "factored"  # 650M, 8 sites
    assert choose_route(2 * 16, 480, 480) == "factored"
    assert choose_route(32 * 16, 480, 480) == "dense"  # 35M, 32 sites: K*r = 512 > d = 480
    assert choose_route(32 * 16, 1280, 1280) == "factored"
    assert choose_route(60, 64, 64) == "dense" and choose_route(12, 64, 64) == "factored"
    with pytest.raises(ValueError, match="unknown route"):
        _refactor(torch.ones(2, 3), torch.ones(3, 2), torch.ones(2), 1, route="svd")


def _model_states(rng, k, dims, r=R, dtype=np.float32):
    """k sites' state dicts with LoRA pairs of several shapes (name -> (d_in, d_out)) and a head."""
    states = []
    for _ in range(k):
        st = {}
        for name, (d_in, d_out) in dims.items():
            st[f"{name}.lora_A.weight"] = rng.standard_normal((r, d_in)).astype(dtype)
            st[f"{name}.lora_B.weight"] = rng.standard_normal((d_out, r)).astype(dtype)
        st[HEAD_W] = rng.standard_normal((2, D)).astype(dtype)
        states.append(st)
    return states


DIMS = {f"m.layers.{i}.self_attn.{p}": (D, D) for i in range(3) for p in ("q_proj", "k_proj", "v_proj")}
DIMS.update({"m.layers.0.fc1": (D, 2 * D), "m.layers.1.fc1": (D, 2 * D), "m.layers.0.fc2": (2 * D, D)})


@pytest.mark.parametrize("chunk_bytes", [None, 1])
def test_batched_model_call_equals_one_matrix_at_a_time(monkeypatch, chunk_bytes):
    """aggregate() groups pairs of one shape into batched calls (and chunks them); the result is
    fra_lora's on each matrix."""
    if chunk_bytes:
        monkeypatch.setattr(aggregation, "_CHUNK_BYTES", chunk_bytes)  # one pair per call
    calls = []
    real = aggregation._refactor

    def spy(a, b, cols, rank, **kw):
        calls.append((tuple(a.shape), a.dtype, kw.get("tail", False)))
        return real(a, b, cols, rank, **kw)

    monkeypatch.setattr(aggregation, "_refactor", spy)
    rng = np.random.default_rng(23)
    states = _model_states(rng, K, DIMS)
    weights = [1, 2, 5]
    out = aggregate(states, weights, "fra", rank=R)
    assert list(out) == list(states[0]) and all(out[k].dtype == np.float32 for k in out)
    shapes = {d for d in DIMS.values()}
    if chunk_bytes:
        assert len(calls) == len(DIMS)
    else:
        assert len(calls) == len(shapes)  # one call per shape: 9 q/k/v pairs, 2 fc1, 1 fc2
        assert sorted(c[0][0] for c in calls) == [1, 2, 9]
    assert all(dtype == torch.float32 and not tail for _, dtype, tail in calls)  # float32, no tail for fra
    for name in DIMS:
        a_key, b_key = f"{name}.lora_A.weight", f"{name}.lora_B.weight"
        a1, b1 = fra_lora([(s[a_key], s[b_key]) for s in states], weights, R)
        batched = out[b_key].astype(np.float64) @ out[a_key]
        assert rel(batched, b1.astype(np.float64) @ a1) < 1e-5
        avg = dense_average([(s[a_key], s[b_key]) for s in states], weights)
        s_dense = np.linalg.svd(avg, compute_uv=False)
        tail = np.sqrt(np.sum(s_dense[R:] ** 2))
        assert abs(np.linalg.norm(avg - batched) - tail) / tail < 1e-5


def test_float64_states_are_computed_in_float64(monkeypatch):
    seen = []
    real = aggregation._refactor
    monkeypatch.setattr(aggregation, "_refactor", lambda a, *args, **kw: seen.append(a.dtype) or real(a, *args, **kw))
    rng = np.random.default_rng(24)
    aggregate(_model_states(rng, 2, DIMS, dtype=np.float64), [1, 1], "fra")
    aggregate(_model_states(rng, 2, DIMS, dtype=np.float16), [1, 1], "fra")
    assert seen[0] == torch.float64 and seen[-1] == torch.float32


def test_fra_ef_on_the_dense_route_loses_nothing(monkeypatch):
    """Many sites on a small matrix (K*r >= 0.9 d): the dense route, with error feedback and tails."""
    routes = []
    real = aggregation.choose_route
    monkeypatch.setattr(aggregation, "choose_route", lambda *a: routes.append(real(*a)) or routes[-1])
    rng = np.random.default_rng(25)
    k, d = 16, 64  # K*r = 64 = d
    states = _model_states(rng, k, {"m.layers.0.self_attn.q_proj": (d, d)})
    a_key, b_key = "m.layers.0.self_attn.q_proj.lora_A.weight", "m.layers.0.self_attn.q_proj.lora_B.weight"
    weights = rng.uniform(0.5, 1.5, k)
    state = AggregationState()
    recon = 0
    for _ in range(3):
        out = aggregate(states, weights, "fra-ef", rank=R, state=state)
        recon = recon + out[b_key].astype(np.float64) @ out[a_key].astype(np.float64)
    assert set(routes) == {"dense"}
    exact = 3 * dense_average([(s[a_key], s[b_key]) for s in states], weights)
    residual = state.residual_matrix("m.layers.0.self_attn.q_proj")
    assert rel(recon + residual, exact) < 1e-5 and rel(recon, exact) > 1e-2
    assert state.residuals["m.layers.0.self_attn.q_proj"][0].dtype == np.float64


@pytest.mark.parametrize("scale", [1e-25, 1.0, 1e20])
def test_float32_keeps_tiny_and_huge_updates(scale):
    """The Gram matrix squares magnitudes; float32 must still re-factor updates far from 1."""
    rng = np.random.default_rng(26)
    low = [(a.astype(np.float32), (scale * b).astype(np.float32)) for a, b in _low_rank_factors(rng, K, R, D, D)]
    a_new, b_new = fra_lora(low, [1.0, 2.0, 3.0], R)
    prod = b_new.astype(np.float64) @ a_new.astype(np.float64)
    assert np.all(np.isfinite(prod)) and rel(prod, dense_average(low, [1.0, 2.0, 3.0])) < 1e-5


# ----------------------------------------------------------------------------------- server learning rate


@pytest.mark.parametrize("eta", [0.5, 1.5])
def test_server_lr_steps_from_the_global_model_along_the_averaged_update(eta):
    """G + eta (avg - G): exact for the head and FedIT's factors; for FRA the re-factored product is the best
    rank-r approximation of eta sum_k w_k B_k A_k + (1 - eta) B_g A_g, from the stacked factors."""
    rng = np.random.default_rng(11)
    *states, glob = make_site_states(rng, k=K + 1)
    weights = [10, 30, 60]
    w = np.array(weights) / 100
    fedit = aggregate(states, weights, "fedit", global_state=glob, server_lr=eta)
    for key in (A_KEY.replace("q_proj", "v_proj"), HEAD_W, HEAD_B):
        avg = sum(wk * s[key].astype(np.float64) for wk, s in zip(w, states))
        np.testing.assert_allclose(fedit[key], glob[key] + eta * (avg - glob[key]), atol=1e-5)
    exact = aggregate(states, weights, "fra", rank=(K + 1) * R, global_state=glob, server_lr=eta)
    for name, (a_key, b_key) in lora_pairs(list(exact)).items():
        avg = dense_average([(s[a_key], s[b_key]) for s in states], weights)
        g = glob[b_key].astype(np.float64) @ glob[a_key].astype(np.float64)
        target = g + eta * (avg - g)
        assert rel(exact[b_key].astype(np.float64) @ exact[a_key].astype(np.float64), target) < 1e-5
    truncated = aggregate(states, weights, "fra", rank=R, global_state=glob, server_lr=eta)
    for name, (a_key, b_key) in lora_pairs(list(truncated)).items():
        avg = dense_average([(s[a_key], s[b_key]) for s in states], weights)
        g = glob[b_key].astype(np.float64) @ glob[a_key].astype(np.float64)
        target = g + eta * (avg - g)
        tail = np.sqrt(np.sum(np.linalg.svd(target, compute_uv=False)[R:] ** 2))
        err = np.linalg.norm(target - truncated[b_key].astype(np.float64) @ truncated[a_key].astype(np.float64))
        assert abs(err - tail) / np.linalg.norm(target) < 1e-5


def test_server_lr_one_is_the_plain_average_and_others_need_the_global_model():
    rng = np.random.default_rng(12)
    *states, glob = make_site_states(rng, k=K + 1)
    plain = aggregate(states, [1, 2, 3], "fra", rank=R)
    same = aggregate(states, [1, 2, 3], "fra", rank=R, global_state=glob, server_lr=1.0)
    assert all(np.array_equal(plain[k], same[k]) for k in plain)
    with pytest.raises(ValueError, match="pass global_state"):
        aggregate(states, [1, 2, 3], "fra", rank=R, server_lr=0.5)
    with pytest.raises(ValueError, match="server_lr must be > 0"):
        aggregate(states, [1, 2, 3], "fra", rank=R, global_state=glob, server_lr=0.0)
