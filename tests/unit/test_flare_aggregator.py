"""FraLoraAggregator on hand-built Shareables and FLContexts, and the payload helpers."""

import numpy as np
import pytest
import torch

from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.fl_constant import ReservedKey, ReturnCode
from nvflare.app_common.app_constant import AppConstants

from fedesm.aggregation import AggregationState, aggregate
from fedesm.errors import FedesmError
from fedesm.flare.aggregator import FraLoraAggregator
from fedesm.flare.payload import (
    make_weights_shareable,
    read_weights_shareable,
    shareable_nbytes,
    to_numpy_dict,
    to_torch_dict,
)
from tests.server_parts import Engine, context, contribution, engine_context

D, R = 32, 4
P = "base_model.model.esm.layers.0.self_attn"
KEYS = {
    f"{P}.q_proj.lora_A.weight": (R, D),
    f"{P}.q_proj.lora_B.weight": (D, R),
    f"{P}.v_proj.lora_A.weight": (R, D),
    f"{P}.v_proj.lora_B.weight": (D, R),
    "base_model.model.head.weight": (2, D),
    "base_model.model.head.bias": (2,),
}
A_KEY, B_KEY = f"{P}.q_proj.lora_A.weight", f"{P}.q_proj.lora_B.weight"


def make(strategy="fra", r=R, weigh_by="uniform", **federation):
    """The aggregator as a job configures it: the lora and federation blocks."""
    return FraLoraAggregator(lora={"r": r}, federation={"strategy": strategy, "weigh_by": weigh_by, **federation})


def replaced(key, value):
    return dict(site_weights(1), **{key: value})


def site_weights(seed):
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(shape).astype(np.float32) for k, shape in KEYS.items()}


def test_accepts_good_contributions_and_keeps_metrics():
    agg = make()
    fl_ctx = context(global_weights=site_weights(0))
    assert agg.accept(contribution(site_weights(1), "site-1", metrics={"val_f1": 0.5}), fl_ctx)
    assert agg.accept(contribution(site_weights(2), "site-2", metrics={"val_f1": 0.7}), fl_ctx)
    agg.aggregate(fl_ctx)
    assert agg.last_round_metrics == {"site-1": {"val_f1": 0.5}, "site-2": {"val_f1": 0.7}}
    assert agg.last_round_weights == {"site-1": 0.5, "site-2": 0.5}


@pytest.mark.parametrize(
    "make_bad, reason",
    [
        (lambda: contribution(site_weights(1), "site-1", round_=2), "contribution for round 2, current round is 3"),
        (lambda: contribution(replaced(A_KEY, np.full((R, D), np.nan, np.float32)), "site-1"), "non-finite"),
        (lambda: contribution(replaced(B_KEY, np.zeros((D, R + 1), np.float32)), "site-1"), "global model has"),
        (lambda: contribution(dict(site_weights(1), extra=np.zeros(3, np.float32)), "site-1"), "unknown keys"),
        (lambda: DXO(DataKind.WEIGHT_DIFF, site_weights(1)).to_shareable(), "data kind"),
    ],
)
def test_rejects_with_reason(make_bad, reason):
    agg = make()
    fl_ctx = context(global_weights=site_weights(0))
    bad = make_bad()
    if bad.get_cookie(AppConstants.CONTRIBUTION_ROUND) is None:
        bad.add_cookie(AppConstants.CONTRIBUTION_ROUND, 3)
    assert not agg.accept(bad, fl_ctx)
    assert reason in agg.last_reject_reason


def test_rejects_error_return_code():
    agg = make()
    s = contribution(site_weights(1), "site-1")
    s.set_return_code(ReturnCode.EXECUTION_EXCEPTION)
    assert not agg.accept(s, context())
    assert "return code" in agg.last_reject_reason


def test_rejects_duplicate_site_and_mismatch_with_first_contribution():
    agg = make()
    fl_ctx = context()  # no global model: the first accepted contribution is the reference
    assert agg.accept(contribution(site_weights(1), "site-1"), fl_ctx)
    assert not agg.accept(contribution(site_weights(2), "site-1"), fl_ctx)
    assert "duplicate contribution in round 3" in agg.last_reject_reason
    wrong_shape = dict(site_weights(2), **{"base_model.model.head.bias": np.zeros(3, np.float32)})
    assert not agg.accept(contribution(wrong_shape, "site-2"), fl_ctx)
    assert "shape of 'base_model.model.head.bias' is (3,), site-1 sent (2,)" in agg.last_reject_reason
    missing = {k: v for k, v in site_weights(2).items() if k != "base_model.model.head.bias"}
    assert not agg.accept(contribution(missing, "site-2"), fl_ctx)
    assert "keys differ" in agg.last_reject_reason
    assert agg.accept(contribution(site_weights(2), "site-2"), fl_ctx)
    # after reset the same site may contribute to the next round
    agg.reset(fl_ctx)
    assert agg.accept(contribution(site_weights(3), "site-1", round_=4), context(round_=4))


@pytest.mark.parametrize("strategy", ["fra", "fedit", "fra-ef"])
def test_aggregate_weighs_by_declared_counts_and_matches_library(strategy):
    agg = make(strategy, weigh_by="declared", max_weight_share=1.0, clip_update_ratio=0)
    fl_ctx = context(global_weights=site_weights(0))
    sites = {"site-1": (site_weights(1), 10), "site-2": (site_weights(2), 30), "site-3": (site_weights(3), 60)}
    for name, (w, count) in sites.items():
        assert agg.accept(contribution(w, name, steps=1, n_samples=count), fl_ctx)
    result = agg.aggregate(fl_ctx)
    dxo = from_shareable(result)
    assert dxo.data_kind == DataKind.WEIGHTS
    kw = {"state": AggregationState()} if strategy == "fra-ef" else {}
    expected = aggregate([w for w, _ in sites.values()], [10, 30, 60], strategy, rank=R, **kw)
    assert list(dxo.data) == list(KEYS)
    for k in KEYS:
        assert isinstance(dxo.data[k], np.ndarray) and dxo.data[k].dtype == np.float32
        np.testing.assert_allclose(dxo.data[k], expected[k], atol=1e-6)
    assert agg.last_round_weights == pytest.approx({"site-1": 0.1, "site-2": 0.3, "site-3": 0.6})


def test_uniform_ignores_what_sites_report_and_declared_counts_are_capped():
    for weigh_by, expected in (("declared", {"a": 0.2, "b": 0.8}), ("uniform", {"a": 0.5, "b": 0.5})):
        agg = make(weigh_by=weigh_by, max_weight_share=1.0)
        fl_ctx = context()
        assert agg.accept(contribution(site_weights(1), "a", steps=99, n_samples=100), fl_ctx)
        assert agg.accept(contribution(site_weights(2), "b", steps=1, n_samples=400), fl_ctx)
        agg.aggregate(fl_ctx)
        assert agg.last_round_weights == pytest.approx(expected)
    agg = make(weigh_by="declared", max_weight_share=0.4)  # 3 sites: 100, 100, 10**9 -> 0.3, 0.3, 0.4
    fl_ctx = context()
    for i, count in ((1, 100), (2, 100), (3, 10**9)):
        assert agg.accept(contribution(site_weights(i), f"s{i}", n_samples=count), fl_ctx)
    agg.aggregate(fl_ctx)
    assert agg.last_round_weights == pytest.approx({"s1": 0.3, "s2": 0.3, "s3": 0.4})


@pytest.mark.parametrize("count, reason", [
    (-5, "not in 1 .. 1e+12"), (0, "not in 1 .. 1e+12"), (1e308, "not in 1 .. 1e+12"),
    (10**400, "an integer of 401 digits"), (float("nan"), "not a whole number"), (2.5, "not a whole number"),
    (True, "not a number"), ("100", "not a number"), (None, "sends no declared count"),
])
def test_declared_counts_that_are_not_counts_are_refused(count, reason):
    agg = make(weigh_by="declared")
    assert not agg.accept(contribution(site_weights(1), "site-1", n_samples=count), context())
    assert reason in agg.last_reject_reason


def test_a_declared_count_is_fixed_for_the_job():
    agg = make(weigh_by="declared")
    assert agg.accept(contribution(site_weights(1), "site-1", round_=0, n_samples=100), context(round_=0))
    agg.reset(context(round_=0))
    assert not agg.accept(contribution(site_weights(1), "site-1", round_=1, n_samples=10**6), context(round_=1))
    assert "declared count changed from 100 to 1000000" in agg.last_reject_reason
    assert agg.accept(contribution(site_weights(1), "site-1", round_=1, n_samples=100), context(round_=1))


def test_fra_ef_state_survives_reset():
    agg = make("fra-ef", r=2)
    for round_ in (0, 1):
        fl_ctx = context(round_=round_)
        for i in (1, 2, 3):
            assert agg.accept(contribution(site_weights(i), f"site-{i}", round_=round_), fl_ctx)
        agg.aggregate(fl_ctx)
        agg.reset(fl_ctx)
        assert agg.ef_state.rounds == round_ + 1
        assert agg.ef_state.residual_norms[f"{P}.q_proj"] > 0


def test_ffa_uses_global_a():
    glob = site_weights(0)
    agg = make("ffa")
    fl_ctx = context(global_weights=glob)
    for i in (1, 2):
        w = site_weights(i)
        w.update({k: v for k, v in glob.items() if ".lora_A." in k})
        assert agg.accept(contribution(w, f"site-{i}"), fl_ctx)
    out = from_shareable(agg.aggregate(fl_ctx)).data
    np.testing.assert_array_equal(out[A_KEY], glob[A_KEY])


def test_constructor_validates_config():
    with pytest.raises(FedesmError, match="federation.strategy: 'fedavg' is not one of fra, fra-ef, fedit, ffa"):
        make("fedavg")
    with pytest.raises(FedesmError, match="federation.weigh_by"):
        make(weigh_by="loss")
    with pytest.raises(ValueError, match="expected_data_kind"):
        FraLoraAggregator(expected_data_kind="WEIGHT_DIFF")
    with pytest.raises(FedesmError, match="lora.r: the LoRA rank must be a positive integer"):
        make(r=0)
    with pytest.raises(FedesmError, match="unknown federation setting 'stratgy'"):
        FraLoraAggregator(federation={"stratgy": "fra"})


def test_aggregate_without_contributions_returns_empty_weights():
    assert from_shareable(make().aggregate(context())).data == {}


# ------------------------------------------------------------------------------------ payload


def test_payload_round_trip_fp32_and_fp16():
    state = {"w": torch.randn(8, 16), "b": torch.randn(8).bfloat16(), "steps": torch.tensor([3])}
    np_state = to_numpy_dict(state)
    assert np_state["b"].dtype == np.float32 and np_state["steps"].dtype == np.int64
    s32 = make_weights_shareable(state, {"n_samples": 5})
    w32, meta = read_weights_shareable(s32)
    assert meta["n_samples"] == 5
    np.testing.assert_array_equal(w32["w"], state["w"].numpy())
    s16 = make_weights_shareable(state, {}, transfer_dtype="float16")
    assert from_shareable(s16).data["w"].dtype == np.float16
    w16, _ = read_weights_shareable(s16)
    assert w16["w"].dtype == np.float32 and w16["steps"].dtype == np.int64
    np.testing.assert_allclose(w16["w"], state["w"].numpy(), rtol=1e-3, atol=1e-3)
    back = to_torch_dict(w16)
    assert isinstance(back["w"], torch.Tensor) and back["w"].dtype == torch.float32
    # fp16 roughly halves what NVFLARE sends
    big = {"w": torch.randn(256, 256)}
    n32 = shareable_nbytes(make_weights_shareable(big))
    n16 = shareable_nbytes(make_weights_shareable(big, transfer_dtype="float16"))
    assert 256 * 256 * 4 < n32 < 256 * 256 * 4 * 1.1
    assert 0.45 < n16 / n32 < 0.55
    with pytest.raises(ValueError, match="transfer_dtype"):
        make_weights_shareable(big, transfer_dtype="int8")


@pytest.mark.parametrize("strategy", ["fra", "ffa"])
def test_fp16_contribution_is_decoded_and_accepted(strategy):
    glob = site_weights(0)
    agg = make(strategy)
    fl_ctx = context(global_weights=glob)
    for i, transfer in ((1, "float16"), (2, "float32")):
        w = site_weights(i)
        w.update({k: v for k, v in glob.items() if ".lora_A." in k})  # frozen A, as FFA sites send it
        assert agg.accept(contribution(w, f"site-{i}", transfer_dtype=transfer), fl_ctx)
    out = from_shareable(agg.aggregate(fl_ctx)).data
    assert out[A_KEY].dtype == np.float32 and out[B_KEY].dtype == np.float32


# ------------------------------------------------------------ vetting against the global model, bounds


def scaled(weights, glob, factor):
    """The global model plus `factor` times the site's change of it (factor -40: sign-flipped, large)."""
    return {k: (glob[k] + factor * (v - glob[k])).astype(np.float32) for k, v in weights.items()}


def near(glob, seed, step=0.05):
    rng = np.random.default_rng(seed)
    return {k: (v + step * rng.standard_normal(v.shape)).astype(np.float32) for k, v in glob.items()}


def test_a_head_only_first_site_cannot_become_the_reference():
    """Checked against the global model, not the first arrival: every order accepts the same sites."""
    import itertools

    glob = site_weights(0)
    head_only = {k: v for k, v in site_weights(9).items() if ".head." in k}
    sites = {"head-only": head_only, "site-1": site_weights(1), "site-2": site_weights(2)}
    for order in itertools.permutations(sites):
        agg = make()
        fl_ctx = context(global_weights=glob)
        accepted = {s for s in order if agg.accept(contribution(sites[s], s), fl_ctx)}
        assert accepted == {"site-1", "site-2"}, order
    assert not make().accept(contribution(head_only, "head-only"), context(global_weights=glob))


@pytest.mark.parametrize("bad, reason", [
    (lambda w: dict(w, **{A_KEY: w[A_KEY].astype(np.int32)}), "is not a float array (dtype int32)"),
    (lambda w: dict(w, **{B_KEY: np.full((D, R), np.inf, np.float32)}), "has non-finite values"),
    (lambda w: {k: v for k, v in w.items() if k != B_KEY}, "missing keys (the global model has them)"),
    (lambda w: dict(w, extra=np.zeros(3, np.float32)), "unknown keys (not in the global model)"),
])
def test_rejects_against_the_global_model(bad, reason):
    agg = make()
    fl_ctx = context(global_weights=site_weights(0))
    assert not agg.accept(contribution(bad(site_weights(1)), "site-1"), fl_ctx)
    assert reason in agg.last_reject_reason


def test_a_wider_float_is_cast_to_the_global_dtype():
    agg = make()
    fl_ctx = context(global_weights=site_weights(0))
    wide = DXO(DataKind.WEIGHTS, {k: v.astype(np.float64) for k, v in site_weights(1).items()},
               meta={MetaKey.NUM_STEPS_CURRENT_ROUND: 10, "n_samples": 100}).to_shareable()
    wide.set_peer_props({ReservedKey.IDENTITY_NAME: "site-1"})
    wide.add_cookie(AppConstants.CONTRIBUTION_ROUND, 3)
    assert agg.accept(wide, fl_ctx)
    assert agg.accept(contribution(site_weights(2), "site-2"), fl_ctx)
    out = from_shareable(agg.aggregate(fl_ctx)).data
    assert all(v.dtype == np.float32 for v in out.values())


@pytest.mark.parametrize("strategy", ["fra", "fra-ef", "fedit", "ffa"])
@pytest.mark.parametrize("factor", [1e3, -40.0])
def test_an_outlying_update_is_rejected_recorded_and_left_out(strategy, factor):
    from fedesm.flare.metrics_recorder import MetricsRecorder

    glob = site_weights(0)
    frozen = {k: v for k, v in glob.items() if ".lora_A." in k}
    sites = {f"site-{i}": near(glob, i) for i in (1, 2, 3)}
    if strategy == "ffa":
        sites = {s: dict(w, **frozen) for s, w in sites.items()}
    sites["site-3"] = scaled(sites["site-3"], glob, factor)
    recorder = MetricsRecorder()
    agg = make(strategy)
    fl_ctx = engine_context(Engine(metrics_recorder=recorder), global_weights=glob)
    for name, w in sites.items():
        assert agg.accept(contribution(w, name), fl_ctx)  # well-formed: only the bound can catch it
    out = from_shareable(agg.aggregate(fl_ctx)).data
    assert set(agg.last_round_weights) == {"site-1", "site-2"}
    kw = {"state": AggregationState()} if strategy == "fra-ef" else {}
    expected = aggregate([sites["site-1"], sites["site-2"]], [10, 10], strategy, rank=R, global_state=glob, **kw)
    for k in KEYS:
        np.testing.assert_allclose(out[k], expected[k], atol=1e-6)
    rows = {r["site"]: r for r in recorder.table() if r["round"] == 4}  # round 3 (0-based) = row 4
    assert "rejected" not in rows["site-1"] and "rejected" not in rows["site-2"]
    assert "the median of the other sites'" in rows["site-3"]["rejected"]
    assert rows["site-3"]["update_norm"] > 10 * rows["site-1"]["update_norm"]
    assert rows["site-1"]["update_norm_ratio"] < 1  # the others' median includes the outlier: no false alarm


def test_too_few_usable_contributions_fail_the_round_cleanly():
    from nvflare.apis.event_type import EventType

    from fedesm.flare.metrics_recorder import MetricsRecorder

    glob = site_weights(0)
    recorder = MetricsRecorder()
    engine = Engine(metrics_recorder=recorder)
    agg = make(min_clients=2)
    fl_ctx = engine_context(engine, global_weights=glob)
    assert agg.accept(contribution(near(glob, 1), "site-1"), fl_ctx)
    assert agg.accept(contribution(scaled(near(glob, 2), glob, 1e3), "site-2"), fl_ctx)  # 2 sites: the big one goes
    head_only = {k: v for k, v in near(glob, 3).items() if ".head." in k}
    assert not agg.accept(contribution(head_only, "site-3"), fl_ctx)
    out = from_shareable(agg.aggregate(fl_ctx))
    assert out.data == {}  # nothing to persist: the workflow stops on the panic before saving a round
    panics = [data for event, data in engine.events if event == EventType.FATAL_SYSTEM_ERROR]
    assert len(panics) == 1 and "1 usable contribution(s) (site-1), federation.min_clients is 2" in panics[0]
    rows = {r["site"]: r for r in recorder.table()}
    assert "missing keys" in rows["site-3"]["rejected"] and "median" in rows["site-2"]["rejected"]


@pytest.mark.parametrize("strategy", ["fra", "fedit"])
def test_the_order_contributions_arrive_in_does_not_change_a_bit(strategy):
    """Sites answer in any order; the aggregate must not depend on it (runs without noise repeat exactly)."""
    out = []
    for order in (("site-1", "site-2", "site-3"), ("site-3", "site-1", "site-2")):
        agg, fl_ctx = make(strategy, weigh_by="declared", max_weight_share=1.0), context()
        for site in order:
            assert agg.accept(contribution(site_weights(int(site[-1])), site, n_samples=10 * int(site[-1])), fl_ctx)
        out.append(from_shareable(agg.aggregate(fl_ctx)).data)
    assert out[0].keys() == out[1].keys()
    assert all(np.array_equal(out[0][k], out[1][k]) for k in out[0])
