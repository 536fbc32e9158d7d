"""Bounded updates: the norm of each site's change of B·A from the factors, and the screen that rejects
outliers before any strategy averages them (fedesm.aggregation), plus the settings that bound it."""

from __future__ import annotations

import numpy as np
import pytest

from fedesm.aggregation import (aggregate, product_difference_norm, product_norm, screen_updates,
                                update_norm)
from fedesm.errors import FedesmError
from fedesm.settings import FederationSettings, JobSettings

P = "base_model.model.esm.layers.{i}.self_attn.{m}_proj"
HEAD_W, HEAD_B = "base_model.model.classifier.modules_to_save.default.weight", \
    "base_model.model.classifier.modules_to_save.default.bias"


def state(rng, d=24, r=4, layers=2, scale=1.0):
    out = {}
    for i in range(layers):
        for m in ("q", "v"):
            out[f"{P.format(i=i, m=m)}.lora_A.weight"] = rng.standard_normal((r, d)) * scale
            out[f"{P.format(i=i, m=m)}.lora_B.weight"] = rng.standard_normal((d, r)) * scale
    out[HEAD_W] = rng.standard_normal((2, d)) * scale
    out[HEAD_B] = rng.standard_normal(2) * scale
    return out


def dense_update_norm(site, glob):
    total = 0.0
    for key in site:
        if key.endswith("lora_A.weight"):
            b_key = key.replace("lora_A", "lora_B")
            delta = site[b_key] @ site[key] - glob[b_key] @ glob[key]
        elif key.endswith("lora_B.weight"):
            continue
        else:
            delta = site[key] - glob[key]
        total += float(np.sum(delta * delta))
    return np.sqrt(total)


def honest(glob, rng, step=0.05):
    """A site that trained a little from the global model: every factor moved by a small random step."""
    return {k: v + step * rng.standard_normal(v.shape) for k, v in glob.items()}


def test_norms_from_factors_equal_the_dense_ones():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((4, 30)), rng.standard_normal((20, 4))
    a2, b2 = rng.standard_normal((4, 30)), rng.standard_normal((20, 4))
    assert product_norm(a, b) == pytest.approx(np.linalg.norm(b @ a), rel=1e-12)
    assert product_difference_norm(a, b) == pytest.approx(np.linalg.norm(b @ a), rel=1e-12)
    assert product_difference_norm(a, b, a2, b2) == pytest.approx(np.linalg.norm(b @ a - b2 @ a2), rel=1e-10)
    # a tiny update of a large product: the Gram-difference route would lose it, the QR route keeps it
    a_new, b_new = a + 1e-7 * a2, b + 1e-7 * b2
    exact = np.linalg.norm(b_new @ a_new - b @ a)
    assert product_difference_norm(a_new, b_new, a, b) == pytest.approx(exact, rel=1e-6)
    glob = state(rng)
    site = honest(glob, rng)
    assert update_norm(site, glob) == pytest.approx(dense_update_norm(site, glob), rel=1e-10)
    zero = {k: np.zeros_like(v) for k, v in glob.items()}
    assert update_norm(site) == pytest.approx(dense_update_norm(site, zero), rel=1e-10)
    assert update_norm(glob, glob) == pytest.approx(0.0, abs=1e-9)


def test_never_dense_at_shapes_where_dense_would_not_fit():
    """50,000 x 50,000 float64 products would take 20 GB each; the factors take 13 MB."""
    rng = np.random.default_rng(1)
    d, r = 50_000, 16
    a, b = rng.standard_normal((r, d)), rng.standard_normal((d, r))
    a2, b2 = rng.standard_normal((r, d)), rng.standard_normal((d, r))
    # ||BA||_F^2 = trace((B^T B)(A A^T)) gives the reference without forming anything dense either
    expected = np.sqrt(np.trace((b.T @ b) @ (a @ a.T)))
    assert product_difference_norm(a, b) == pytest.approx(expected, rel=1e-10)
    assert product_difference_norm(a, b, a2, b2) > 0


def test_scaled_and_sign_flipped_updates_are_rejected_honest_ones_kept():
    rng = np.random.default_rng(2)
    glob = state(rng)
    good = [honest(glob, rng) for _ in range(2)]
    scaled = {k: glob[k] + 1e3 * (v - glob[k]) for k, v in honest(glob, rng).items()}  # update x 1e3
    flipped = {k: glob[k] - 40 * (v - glob[k]) for k, v in honest(glob, rng).items()}  # sign-flipped, large
    for bad in (scaled, flipped):
        checks = screen_updates([good[0], bad, good[1]], glob, max_ratio=10)
        assert [c.reason is None for c in checks] == [True, False, True]
        assert "the median of the other sites'" in checks[1].reason and checks[1].ratio > 10
        assert all(c.ratio < 2 for c in (checks[0], checks[2]))
    # off: nobody rejected; the absolute cap works alone
    assert all(c.reason is None for c in screen_updates([good[0], scaled, good[1]], glob, max_ratio=0))
    cap = 2 * max(update_norm(g, glob) for g in good)
    checks = screen_updates([good[0], scaled, good[1]], glob, max_ratio=0, max_norm=cap)
    assert [c.reason is None for c in checks] == [True, False, True]
    assert "federation.max_update_norm" in checks[1].reason
    # two sites: the larger is judged against the smaller; one site: no ratio, only the cap
    two = screen_updates([good[0], scaled], glob, max_ratio=10)
    assert [c.reason is None for c in two] == [True, False]
    (one,) = screen_updates([scaled], glob, max_ratio=10)
    assert one.reason is None and np.isnan(one.ratio)
    # a non-finite update is rejected whatever the bounds
    nan = dict(good[0], **{HEAD_B: np.array([np.inf, 0.0])})
    assert "update norm is inf" in screen_updates([nan, good[1]], glob)[0].reason


@pytest.mark.parametrize("strategy", ["fra", "fra-ef", "fedit", "ffa"])
def test_the_screen_works_for_every_strategy(strategy):
    """Whatever the strategy, what is rejected by the screen never reaches the average."""
    from fedesm.aggregation import AggregationState

    rng = np.random.default_rng(3)
    glob = state(rng)
    sites = [honest(glob, rng) for _ in range(3)]
    if strategy == "ffa":  # A frozen: only B moves
        sites = [{k: (glob[k] if ".lora_A." in k else v) for k, v in s.items()} for s in sites]
    bad = {k: (glob[k] + 1e3 * (v - glob[k])) for k, v in sites[2].items()}
    checks = screen_updates([sites[0], sites[1], bad], glob, max_ratio=10)
    kept = [s for s, c in zip([sites[0], sites[1], bad], checks) if c.reason is None]
    assert len(kept) == 2 and kept[1] is sites[1]
    kw = {"state": AggregationState()} if strategy == "fra-ef" else {}
    out = aggregate(kept, [1, 1], strategy, rank=4, global_state=glob, **kw)
    ref = aggregate(sites[:2], [1, 1], strategy, rank=4, global_state=glob,
                    **({"state": AggregationState()} if strategy == "fra-ef" else {}))
    for k in out:
        np.testing.assert_allclose(out[k], ref[k])
    # the bad site would have moved the global model by orders of magnitude more than the honest pair does
    kw = {"state": AggregationState()} if strategy == "fra-ef" else {}
    poisoned = aggregate([sites[0], sites[1], bad], [1, 1, 1], strategy, rank=4, global_state=glob, **kw)
    assert update_norm(poisoned, glob) > 50 * update_norm(out, glob)


def test_bound_settings_are_checked_where_they_are_read():
    assert FederationSettings().max_update_ratio == 10.0 and FederationSettings().max_update_norm is None
    assert FederationSettings(max_update_ratio=0).max_update_ratio == 0
    for bad, message in (({"max_update_ratio": 1}, "federation.max_update_ratio: must be > 1"),
                         ({"max_update_ratio": -3}, "federation.max_update_ratio: must be > 1"),
                         ({"max_update_ratio": "lots"}, "federation.max_update_ratio: expected a number"),
                         ({"max_update_norm": 0}, "federation.max_update_norm: must be > 0")):
        with pytest.raises(FedesmError, match=message):
            FederationSettings.from_dict(bad)
    s = JobSettings().with_overrides(["max_update_ratio=4", "federation.max_update_norm=2.5"])
    assert s.federation.max_update_ratio == 4 and s.federation.max_update_norm == 2.5
    with pytest.raises(FedesmError, match="federation.wait_after_min_clients: must be >= 0, got -1"):
        FederationSettings(wait_after_min_clients=-1)


def test_the_workflow_waits_for_the_other_sites_as_the_setting_says():
    """Once min_clients have answered, ScatterAndGather still waits federation.wait_after_min_clients for
    the rest, so a fast outlier cannot close the round with too few updates left."""
    from fedesm.launch.jobs import JOBS, SERVER_CONFIG, render_job

    flow = render_job(JOBS["esm2_fra_lora"])[SERVER_CONFIG]["workflows"][0]["args"]
    assert flow["wait_time_after_min_received"] == FederationSettings().wait_after_min_clients == 3600
    s = JOBS["esm2_fra_lora"].settings.with_overrides({"wait_after_min_clients": 5})
    flow = render_job(JOBS["esm2_fra_lora"], s)[SERVER_CONFIG]["workflows"][0]["args"]
    assert flow["wait_time_after_min_received"] == 5


def test_a_free_rider_counts_as_no_update_and_does_not_get_the_honest_sites_rejected():
    """The global model sent back differs from it by rounding (~1e-14): flagged, left out of the others' median."""
    rng = np.random.default_rng(3)
    glob = state(rng)
    sites = [honest(glob, rng), {k: v.copy() for k, v in glob.items()}, honest(glob, rng)]
    checks = screen_updates(sites, glob, max_ratio=10.0, clip_ratio=1.0)
    assert "no update" in checks[1].reason
    assert checks[0].reason is None and checks[2].reason is None
    assert 0.5 < checks[0].ratio < 2  # judged against the other honest site, not the free-rider's ~0


def test_an_update_above_the_clip_is_scaled_to_the_others_median_and_needs_two_others():
    from fedesm.aggregation import capped_shares

    rng = np.random.default_rng(4)
    glob = state(rng)
    sites = [honest(glob, rng) for _ in range(3)]
    big = {k: glob[k] + 4 * (v - glob[k]) for k, v in honest(glob, rng).items()}
    checks = screen_updates([*sites, big], glob, max_ratio=10.0, clip_ratio=1.0)
    assert checks[3].reason is None and checks[3].scale == pytest.approx(1 / checks[3].ratio)
    assert checks[3].scale * checks[3].norm == pytest.approx(np.median([c.norm for c in checks[:3]]))
    two = screen_updates([sites[0], big], glob, max_ratio=100.0, clip_ratio=1.0)
    assert [c.scale for c in two] == [1.0, 1.0]  # two sites: no majority to clip to
    assert capped_shares([100, 100, 1e9], 0.4) == pytest.approx([0.3, 0.3, 0.4])
    assert capped_shares([1, 2], 0.4) == pytest.approx([0.5, 0.5])  # 2 x 0.4 < 1: equal shares
    assert capped_shares([1, 1, 1, 97], 0.5) == pytest.approx([1 / 6, 1 / 6, 1 / 6, 0.5])


def test_a_norm_that_cannot_be_computed_rejects_that_site_only():
    rng = np.random.default_rng(5)
    glob = state(rng)
    broken = honest(glob, rng)
    key = next(k for k in broken if k.endswith("lora_B.weight"))
    broken[key] = broken[key][:, :2]  # not one LoRA pair with its A
    checks = screen_updates([honest(glob, rng), broken, honest(glob, rng)], glob, max_ratio=10.0)
    assert "not computable" in checks[1].reason and checks[0].reason is None and checks[2].reason is None
