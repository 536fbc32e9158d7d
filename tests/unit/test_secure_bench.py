"""bench/secure_bytes.py counts the bytes the secure messages really have (no timing asserted)."""

import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import secure_bytes  # noqa: E402

from fedesm.secure.rounds import SiteRound, site_weights  # noqa: E402
from fedesm.secure.sketch import SketchPlan  # noqa: E402


def test_counted_bytes_are_the_messages_bytes(tmp_path):
    d, layers, r, k = 40, 2, 4, 3
    names = [f"site-{i}" for i in range(1, k + 1)]
    kits = secure_bytes._kits(tmp_path, names)
    rng = np.random.default_rng(0)
    states = {n: secure_bytes._state(rng, d, layers, r) for n in names}
    w = site_weights({n: 1.0 for n in names})
    parts = {n: SiteRound(n, kits[n], "bench", 0, w[n]) for n in names}
    for p in parts.values():
        p.agree({n: q.signed_key for n, q in parts.items()})
    plan = SketchPlan.for_model(0, states[names[0]], k * r)
    first = parts[names[0]].pass1(states[names[0]], plan)
    bases = {n: np.linalg.qr(rng.standard_normal((d, s)))[0] for n, s in plan.widths.items()}
    second = parts[names[0]].pass2(states[names[0]], bases)
    key = parts[names[0]].signed_key
    counted = secure_bytes.secure_bytes(d, layers, r, k)
    assert counted["s"] == next(iter(plan.widths.values()))
    message_bytes = first.words.nbytes + second.words.nbytes
    key_bytes = len(key.public) + len(key.signature) + len(key.certificate)
    assert counted["up"] - secure_bytes.KEY_BYTES == message_bytes
    assert 0.5 * secure_bytes.KEY_BYTES < key_bytes <= secure_bytes.KEY_BYTES  # counted generously
    plain = secure_bytes.plain_bytes(d, layers, r)["up"]
    assert plain == sum(v.nbytes for v in states[names[0]].values())


def test_timed_round_plays_run_round(tmp_path):
    """The bench's part-by-part round is the round ``rounds.run_round`` plays: same global model."""
    from fedesm.secure.rounds import run_round

    names = ["site-1", "site-2", "site-3"]
    kits = secure_bytes._kits(tmp_path, names)
    rng = np.random.default_rng(1)
    states = {n: secure_bytes._state(rng, 24, 2, 4) for n in names}
    timed = secure_bytes.timed_round(states, kits, round_num=0, seed=5, rank=4)
    ref = run_round({n: (states[n], kits[n]) for n in names}, {n: 1.0 for n in names}, states[names[0]],
                    job_id="bench", round_num=0, seed=5, rank=4)
    assert set(timed["state"]) == set(ref)
    assert max(float(np.max(np.abs(timed["state"][k] - ref[k]))) for k in ref) < 1e-12
    assert set(timed["site_s"]) == set(names) and timed["server_s"] > 0


def test_secure_section_of_run_bench_on_tiny_shapes(tmp_path):
    import run_bench

    sizes = {"secure": {"dims": (32,), "sites": (2, 3), "rank": 4, "reps": 1, "threads": 1,
                        "masks": ((64, None), (32, None), (32, 4.0)), "models": {32: ("tiny", 2)}}}
    doc = run_bench.run_all(["secure"], sizes=sizes, work_dir=tmp_path, echo=lambda *a: None)
    sec = doc["results"]["secure"]
    assert doc["sections"] == ["secure"] and sec["threads"] == 1 and sec["load_average_before"] is not None
    rows = {(x["sites"], x["word_bits"]): x for x in sec["rows"] if x["bound"] is None}
    bound4 = {x["sites"]: x for x in sec["rows"] if x["bound"] == 4.0}
    assert set(rows) == {(2, 64), (2, 32), (3, 64), (3, 32)} and set(bound4) == {2, 3}
    for k in (2, 3):
        r64, r32 = rows[(k, 64)], rows[(k, 32)]
        assert r64["plain_up_bytes"] == secure_bytes.plain_bytes(32, 2, 4)["up"]
        assert r64["secure_up_bytes"] == secure_bytes.secure_bytes(32, 2, 4, k)["up"]
        # 32-bit words: the masked messages take exactly half the bytes
        assert 2 * (r32["secure_up_bytes"] - secure_bytes.KEY_BYTES) == r64["secure_up_bytes"] - secure_bytes.KEY_BYTES
        for x in (r64, r32):
            # the messages the timed round made: the counted sizes, the key at its real (smaller) length
            assert 0 < x["secure_up_bytes"] - x["secure_up_measured_bytes"] < secure_bytes.KEY_BYTES
            assert x["server_receives_secure_bytes"] == k * x["secure_up_bytes"]
            assert x["up_ratio"] == x["secure_up_bytes"] / x["plain_up_bytes"]
            assert x["plain_s"] > 0 and x["secure_site_s"] > 0 and x["secure_server_s"] > 0
        # the secure round gives plain FRA's model: to float32's rounding with 64-bit words; with 32-bit words
        # to 2^-23 steps (3 sites, bound 64) on updates of ~1e-3, a relative 1e-4
        assert r64["max_abs_diff"] < 1e-5 and r64["max_update_rel_diff"] < 1e-5
        assert r32["max_abs_diff"] < 1e-3 and r32["max_update_rel_diff"] < 1e-3
        assert r32["max_update_rel_diff"] > r64["max_update_rel_diff"]
        # a tighter public bound: 4 more fractional bits (64 = 2^6 -> 4 = 2^2), the same bytes, a closer model
        assert bound4[k]["fraction_bits"] == r32["fraction_bits"] + 4 and r64["fraction_bits"] == 32
        assert bound4[k]["secure_up_bytes"] == r32["secure_up_bytes"]
        assert bound4[k]["max_update_rel_diff"] < r32["max_update_rel_diff"]
    md = run_bench.to_markdown(doc)
    assert "## 3a. Secure aggregation" in md
    assert "| tiny | 3 | 32-bit |" in md and "| tiny | 2 | 32-bit, bound 4 |" in md
    assert any(line.startswith("secure tiny K=3 32-bit: up") for line in run_bench.summary_lines(doc))


def test_update_rel_diff_sees_the_product_not_the_factors():
    rng = np.random.default_rng(3)
    ref = secure_bytes._state(rng, 16, 1, 2)
    a_key = next(k for k in ref if k.endswith("q_proj.lora_A.weight"))
    b_key = a_key.replace("lora_A", "lora_B")
    flipped = {**ref, a_key: -ref[a_key], b_key: -ref[b_key]}  # the same update, other signs
    assert secure_bytes.update_rel_diff(flipped, ref) < 1e-6
    moved = {**ref, a_key: ref[a_key] * 1.01}
    assert secure_bytes.update_rel_diff(moved, ref) == pytest.approx(0.01, rel=1e-3)


def test_full_and_quick_sizes_of_the_secure_section():
    import inspect

    import run_bench

    assert "secure" in run_bench.SECTIONS
    full, quick = run_bench.FULL["secure"], run_bench.QUICK["secure"]
    assert set(full["dims"]) == set(secure_bytes.MODELS) and tuple(full["sites"]) == (2, 4, 8)
    assert (64, None) in full["masks"] and any(wb == 32 for wb, _ in full["masks"])
    assert set(quick["dims"]) < set(full["dims"]) and max(quick["sites"]) < max(full["sites"])
    for cfg in (full, quick):  # every key is run()'s (threads: the runner's)
        inspect.signature(secure_bytes.run).bind(**{k: v for k, v in cfg.items() if k != "threads"})
