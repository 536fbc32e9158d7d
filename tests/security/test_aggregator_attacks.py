"""A hostile site against the server's aggregator, in-process with real NVFLARE FLContext / Shareable.

Three honest sites and one liar. The liar lies about its size (1e9, 1e308, 10**400, negative, NaN), sends a
scaled (x9) or sign-flipped (x5) update, the global model back (a free-rider), a changed frozen A under ffa, or
numbers that overflow the aggregation. For every strategy the global model must stay within the honest sites'
spread of the honest-only aggregate (what the server makes of the three honest sites alone), and no such site
can end the job (no system panic while federation.min_clients is met).

Distances are :func:`fedesm.aggregation.update_norm` between models: the change of every B·A plus the head's.
Honest sites are heterogeneous as non-iid sites are: each moved by a step shared by all (the task) plus a
step of its own of the same size (pairwise cosine of their updates about 0.5).
"""

from __future__ import annotations

import numpy as np
import pytest

from nvflare.apis.dxo import from_shareable
from nvflare.apis.event_type import EventType

from fedesm.aggregation import update_norm
from fedesm.flare.aggregator import FraLoraAggregator
from fedesm.flare.metrics_recorder import MetricsRecorder
from tests.server_parts import Engine, contribution, engine_context
from tests.unit.test_flare_aggregator import KEYS

STRATEGIES = ["fra", "fra-ef", "fedit", "ffa"]
HONEST = ("site-1", "site-2", "site-3")
LIAR = "site-4"
STEP = 0.05


def global_model(seed=0):
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(shape).astype(np.float32) for k, shape in KEYS.items()}


def trained(glob, strategy, own_seed, shared_seed=100):
    """A site's honest result: the global model plus the task's step and a step of its own (ffa: A frozen)."""
    shared, own = np.random.default_rng(shared_seed), np.random.default_rng(own_seed)
    out = {}
    for k, v in glob.items():
        step = STEP * (shared.standard_normal(v.shape) + own.standard_normal(v.shape))
        if strategy == "ffa" and ".lora_A." in k:
            step = 0 * step
        out[k] = (v + step).astype(np.float32)
    return out


def scaled(site, glob, factor):
    return {k: (glob[k] + factor * (v - glob[k])).astype(np.float32) for k, v in site.items()}


def run_round(strategy, sites, glob, meta=None, **federation):
    """One round through the aggregator as ScatterAndGather drives it: accept each, aggregate once.
    Returns (global model or {}, aggregator, panics, the round's metrics rows by site)."""
    recorder = MetricsRecorder()
    engine = Engine(metrics_recorder=recorder)
    agg = FraLoraAggregator(lora={"r": 4}, federation={"strategy": strategy, "min_clients": 3, **federation})
    fl_ctx = engine_context(engine, global_weights=glob)
    for name, weights in sites.items():
        kw = {"n_samples": None, **(meta or {}).get(name, {})}
        agg.accept(contribution(weights, name, steps=10, **kw), fl_ctx)
    out = from_shareable(agg.aggregate(fl_ctx)).data
    panics = [data for event, data in engine.events if event == EventType.FATAL_SYSTEM_ERROR]
    rows = {r["site"]: r for r in recorder.table() if r["round"] == 4}
    return out, agg, panics, rows


def honest_sites(strategy, glob):
    return {name: trained(glob, strategy, own_seed=i) for i, name in enumerate(HONEST, start=1)}


def judge(strategy, out, glob, panics):
    """(distance of the global model from the honest-only aggregate, the honest sites' spread around it)."""
    assert not panics, panics
    assert set(out) == set(KEYS)
    honest_only, _, honest_panics, _ = run_round(strategy, honest_sites(strategy, glob), glob)
    assert not honest_panics
    spread = max(update_norm(w, honest_only) for w in honest_sites(strategy, glob).values())
    distance = update_norm(out, honest_only)
    return distance, spread


def attack_sites(strategy, glob, attack):
    sites = honest_sites(strategy, glob)
    own = trained(glob, strategy, own_seed=4)
    sites[LIAR] = {"honest": own, "x9": scaled(own, glob, 9.0), "flip5": scaled(own, glob, -5.0),
                   "free-rider": dict(glob)}[attack]
    return sites


# ------------------------------------------------------------------------------- lies about its size


SIZE_LIES = [1e9, 1e308, 10**400, -1000, float("nan")]


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("attack", ["honest", "x9", "flip5", "free-rider"])
@pytest.mark.parametrize("size", SIZE_LIES, ids=["1e9", "1e308", "10**400", "negative", "nan"])
def test_what_a_site_reports_about_itself_weighs_nothing(strategy, attack, size):
    """weigh_by uniform (the default): the liar's reported size is ignored, whatever it sends with it."""
    glob = global_model()
    out, agg, panics, rows = run_round(strategy, attack_sites(strategy, glob, attack), glob,
                                       meta={LIAR: {"n_samples": size}})
    distance, spread = judge(strategy, out, glob, panics)
    assert distance <= spread, (distance, spread)
    assert all(w == pytest.approx(1 / len(agg.last_round_weights)) for w in agg.last_round_weights.values())
    assert all("rejected" not in rows[s] for s in HONEST)
    if attack == "free-rider":
        assert "no update" in rows[LIAR]["rejected"] and distance == pytest.approx(0, abs=1e-6)
    if attack in ("x9", "flip5"):  # refused beyond max_update_ratio, else pulled in to the others' median norm
        assert "the median of the other sites'" in rows[LIAR].get("rejected", "") or rows[LIAR]["update_scale"] < 0.3


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("size", SIZE_LIES, ids=["1e9", "1e308", "10**400", "negative", "nan"])
def test_a_declared_count_is_capped_or_refused(strategy, size):
    """weigh_by declared: honest sites declare 100 each; the liar's 1e9 gets at most max_weight_share, the
    others (not a count) are refused with a reason; the honest sites keep the rest."""
    glob = global_model()
    meta = {s: {"n_samples": 100} for s in HONEST}
    meta[LIAR] = {"n_samples": size}
    out, agg, panics, rows = run_round(strategy, attack_sites(strategy, glob, "honest"), glob, meta=meta,
                                       weigh_by="declared", max_weight_share=0.4)
    distance, spread = judge(strategy, out, glob, panics)
    assert distance <= spread, (distance, spread)
    if size == 1e9:
        assert agg.last_round_weights[LIAR] == pytest.approx(0.4)
        assert agg.last_round_weights["site-1"] == pytest.approx(0.2)
    else:
        assert LIAR not in agg.last_round_weights and "declared count" in agg.last_reject_reason
        assert distance == pytest.approx(0, abs=1e-6)


# ------------------------------------------------------------------- contributions the maths cannot take


@pytest.mark.parametrize("transfer", ["float32", "float16"])
def test_ffa_a_changed_frozen_a_is_refused_not_the_job(transfer):
    glob = global_model()
    sites = honest_sites("ffa", glob)
    sites[LIAR] = trained(glob, "fra", own_seed=4)  # trained A as well
    out, agg, panics, rows = run_round("ffa", sites, glob, meta={LIAR: {"transfer_dtype": transfer}})
    distance, spread = judge("ffa", out, glob, panics)
    assert distance == pytest.approx(0, abs=1e-6) and spread > 1
    assert "changed the frozen" in rows[LIAR]["rejected"]
    np.testing.assert_array_equal(out[next(k for k in KEYS if ".lora_A." in k)],
                                  glob[next(k for k in KEYS if ".lora_A." in k)])


@pytest.mark.parametrize("strategy", ["fra", "fra-ef"])
def test_numbers_that_overflow_the_aggregate_reject_that_site_only(strategy):
    """With the update bounds off, a B of 1e38 passes vetting (finite float32) but its product overflows
    float32 in the aggregate: that site is rejected ("cannot be aggregated"), the round goes on."""
    glob = global_model()
    sites = honest_sites(strategy, glob)
    sites[LIAR] = {k: (np.full_like(v, 1e38) if ".lora_B." in k else v) for k, v in trained(glob, strategy, 4).items()}
    out, agg, panics, rows = run_round(strategy, sites, glob, max_update_ratio=0, clip_update_ratio=0)
    assert not panics and all(np.all(np.isfinite(v)) for v in out.values())
    assert "cannot be aggregated" in rows[LIAR]["rejected"]
    assert set(agg.last_round_weights) == set(HONEST)
    assert all("rejected" not in rows[s] for s in HONEST)


def test_free_riders_are_flagged_and_the_honest_sites_kept():
    """Two sites sending the global model back (norm ~1e-14, not 0) are refused; before, the honest site was
    refused as "1e14x the median" and with min_clients 2 the job ended."""
    glob = global_model()
    sites = {"site-1": trained(glob, "fra", 1), "site-2": dict(glob), "site-3": dict(glob)}
    recorder = MetricsRecorder()
    engine = Engine(metrics_recorder=recorder)
    agg = FraLoraAggregator(lora={"r": 4}, federation={"strategy": "fra", "min_clients": 1})
    fl_ctx = engine_context(engine, global_weights=glob)
    for name, weights in sites.items():
        assert agg.accept(contribution(weights, name), fl_ctx)
    out = from_shareable(agg.aggregate(fl_ctx)).data
    assert not [e for e, _ in engine.events if e == EventType.FATAL_SYSTEM_ERROR]
    rows = {r["site"]: r for r in recorder.table()}
    assert "rejected" not in rows["site-1"]
    assert "no update" in rows["site-2"]["rejected"] and "no update" in rows["site-3"]["rejected"]
    assert update_norm(out, sites["site-1"]) < 1e-6 * update_norm(glob)  # the one honest site's model


def test_a_contribution_that_breaks_the_vetting_refuses_only_itself():
    """Data that is no dict of arrays (here a dict of dicts) is refused with a reason; accept() never raises."""
    from nvflare.apis.dxo import DXO, DataKind
    from nvflare.apis.fl_constant import ReservedKey
    from nvflare.app_common.app_constant import AppConstants

    glob = global_model()
    engine = Engine(metrics_recorder=MetricsRecorder())
    agg = FraLoraAggregator(lora={"r": 4}, federation={"strategy": "fra", "min_clients": 2})
    fl_ctx = engine_context(engine, global_weights=glob)
    odd = DXO(DataKind.WEIGHTS, {k: {"nested": 1} for k in KEYS}).to_shareable()
    odd.set_peer_props({ReservedKey.IDENTITY_NAME: LIAR})
    odd.add_cookie(AppConstants.CONTRIBUTION_ROUND, 3)
    assert not agg.accept(odd, fl_ctx)
    assert "is not a float array" in agg.last_reject_reason or "could not be vetted" in agg.last_reject_reason
    for name, weights in honest_sites("fra", glob).items():
        assert agg.accept(contribution(weights, name), fl_ctx)
    assert from_shareable(agg.aggregate(fl_ctx)).data
    assert not [e for e, _ in engine.events if e == EventType.FATAL_SYSTEM_ERROR]
