"""Pairwise masks: the sum decodes exactly, one message alone looks uniform, an incomplete sum is refused."""

import numpy as np
import pytest
from scipy import stats

from fedesm.errors import FedesmError
from fedesm.secure import masking

SITES = ["site-1", "site-2", "site-3"]


def _secrets(names, seed=0):
    rng = np.random.default_rng(seed)
    shared = {(x, y): rng.bytes(32) for x in names for y in names if x < y}
    return {n: {p: shared[tuple(sorted((n, p)))] for p in names if p != n} for n in names}


def _messages(values, names=SITES, context=b"job\x001\x00pass1"):
    secrets = _secrets(names)
    return [masking.mask(v, n, secrets[n], context) for n, v in zip(names, values)]


def test_encode_decode_round_trip_within_half_a_step():
    x = np.array([0.0, 1.0, -1.0, 3.14159, -2.5e-7, 1e5, -1e5])
    back = masking.decode(masking.encode(x, 3))
    assert np.max(np.abs(back - x)) <= 0.5 / 2**masking.SCALE_BITS


def test_encode_refuses_values_that_could_wrap_the_sum():
    bound = masking.max_abs(4)
    assert 2**30 < bound * 4 < 2**31
    masking.encode(np.array([bound * 0.999]), 4)
    with pytest.raises(FedesmError, match="cannot be encoded"):
        masking.encode(np.array([bound * 1.001]), 4)
    with pytest.raises(FedesmError, match="cannot be encoded"):
        masking.encode(np.array([np.nan]), 4)


@pytest.mark.parametrize("names", [SITES[:2], SITES])
def test_the_masked_sum_decodes_to_the_sum_of_the_encodings_exactly(names):
    rng = np.random.default_rng(1)
    values = [rng.standard_normal(1000) * 10 for _ in names]
    values[0][:3] = [masking.max_abs(len(names)) * 0.99, -masking.max_abs(len(names)) * 0.99, 0.0]  # extremes
    total = masking.unmask_sum(_messages(values, names), names, b"job\x001\x00pass1")
    exact = masking.decode(np.sum([masking.encode(v, len(names)) for v in values], axis=0, dtype=np.uint64))
    assert np.array_equal(total, exact)  # integer arithmetic: exact, not close
    # beside the float sum (itself rounded at 7e8, so judged where it is exact): half a step per site
    assert np.max(np.abs(total[3:] - sum(values)[3:])) <= len(names) * 0.5 / 2**masking.SCALE_BITS


def test_one_masked_message_is_indistinguishable_from_uniform():
    """A site's message alone: its words' high bits uniform (chi-square), every bit balanced, and no correlation
    with what it encodes, whether the plaintext is all zeros or a strongly structured signal."""
    n = 200_000
    ramp = np.linspace(-5, 5, n)
    for plain in (np.zeros(n), ramp):
        msg = _messages([plain, np.zeros(n), np.zeros(n)])[0]
        words = msg.words[1:]
        top = (words >> np.uint64(56)).astype(np.int64)  # high byte: 256 cells, 781 expected per cell
        assert stats.chisquare(np.bincount(top, minlength=256)).pvalue > 1e-4
        as_unit = words.astype(np.float64) / 2.0**64
        assert stats.kstest(as_unit, "uniform").pvalue > 1e-4
        bits = ((words[:, None] >> np.arange(64, dtype=np.uint64)) & np.uint64(1)).mean(axis=0)
        assert np.all(np.abs(bits - 0.5) < 0.006)  # 5 sigma at n = 200k
        assert abs(np.corrcoef(as_unit, ramp)[0, 1]) < 0.01
        assert abs(np.corrcoef(masking.decode(words), ramp)[0, 1]) < 0.01
    # the checks can fail: the unmasked encoding of the ramp is nothing like uniform
    enc = masking.encode(ramp, 3).astype(np.float64) / 2.0**64
    assert stats.kstest(enc, "uniform").pvalue < 1e-10


def test_a_sum_missing_one_site_is_refused():
    values = [np.full(10, float(i)) for i in range(3)]
    msgs = _messages(values)
    with pytest.raises(FedesmError, match=r"missing \['site-3'\]"):
        masking.unmask_sum(msgs[:2], SITES, b"job\x001\x00pass1")
    # a server that shrinks the roster to the sites that answered: the masks with site-3 do not cancel
    with pytest.raises(FedesmError, match="masks did not cancel"):
        masking.unmask_sum(msgs[:2], SITES[:2], b"job\x001\x00pass1")


def test_repeated_foreign_or_altered_messages_are_refused():
    msgs = _messages([np.ones(10)] * 3)
    with pytest.raises(FedesmError, match=r"repeated \['site-1'\]"):
        masking.unmask_sum([msgs[0], *msgs], SITES, b"job\x001\x00pass1")
    with pytest.raises(FedesmError, match="context"):
        masking.unmask_sum(msgs, SITES, b"job\x001\x00pass2")
    altered = masking.MaskedMessage(msgs[0].site, msgs[0].context, msgs[0].words + np.uint64(1))
    with pytest.raises(FedesmError, match="masks did not cancel"):
        masking.unmask_sum([altered, *msgs[1:]], SITES, b"job\x001\x00pass1")


def test_masks_differ_by_pair_and_context():
    s = b"\x01" * 32
    a = masking.mask_stream(s, b"ctx1", "site-1", "site-2", 8)
    assert not np.array_equal(a, masking.mask_stream(s, b"ctx2", "site-1", "site-2", 8))
    assert not np.array_equal(a, masking.mask_stream(s, b"ctx1", "site-1", "site-3", 8))
    assert np.array_equal(a, masking.mask_stream(s, b"ctx1", "site-1", "site-2", 8))


def test_layout_flatten_round_trip_and_mismatch():
    terms = {"x": np.arange(6.0).reshape(2, 3), "y": np.ones(4)}
    layout = masking.layout_of(terms)
    back = masking.unflatten(masking.flatten(terms, layout), layout)
    assert all(np.array_equal(back[k], terms[k]) for k in terms)
    with pytest.raises(FedesmError, match="layout"):
        masking.flatten({"x": np.ones((3, 2)), "y": np.ones(4)}, layout)


# --------------------------------------------------------------------------------------------
# 32-bit words: half the bytes, a fixed point sized for the roster and a public bound
# --------------------------------------------------------------------------------------------

CTX = b"job\x001\x00pass1"


def _messages32(values, names, bound=None, context=CTX):
    secrets = _secrets(names)
    return [masking.mask(v, n, secrets[n], context, word_bits=32, bound=bound) for n, v in zip(names, values)]


def test_32_bit_fraction_bits_leave_room_for_the_roster_sum():
    assert masking.fraction_bits(2, 32) == 31 - 1 - 6  # default bound 64 = 2^6
    assert masking.fraction_bits(8, 32) == 31 - 3 - 6
    assert masking.fraction_bits(3, 32, bound=10.0) == 31 - 2 - 4
    assert masking.fraction_bits(8, 64) == masking.SCALE_BITS  # 64-bit words: unchanged
    for n in (2, 3, 8, 100):
        limit, bits = masking.max_abs(n, 32), masking.fraction_bits(n, 32)
        assert n * (limit * 2**bits) <= 2**31 - 1 + n * 0.5  # n encodings at the limit cannot reach 2^31
        assert limit > masking.BOUND_32 - 2.0**-bits  # the bound, less at most half a step
    with pytest.raises(FedesmError, match="word_bits must be one of"):
        masking.fraction_bits(2, 16)
    with pytest.raises(FedesmError, match="cannot hold the sum"):
        masking.fraction_bits(2**20, 32, bound=2.0**12)


@pytest.mark.parametrize("names", [SITES[:2], SITES, [f"site-{i}" for i in range(1, 9)]])
def test_32_bit_sum_is_exact_to_the_fixed_point_resolution(names):
    n, rng = len(names), np.random.default_rng(2)
    limit = masking.max_abs(n, 32)
    values = [rng.uniform(-limit, limit, 5000) for _ in names]
    for v in values:  # every site at the extremes: the worst case for a wrap
        v[:2] = [limit * (1 - 1e-9), -limit * (1 - 1e-9)]
    msgs = _messages32(values, names)
    assert all(m.words.dtype == np.uint32 and m.words.nbytes == 4 * 5001 for m in msgs)  # half the 64-bit bytes
    total = masking.unmask_sum(msgs, names, CTX, word_bits=32)
    bits = masking.fraction_bits(n, 32)
    exact = np.sum([masking.encode(v, n, 32).view(np.int32).astype(np.int64) for v in values], axis=0) / 2.0**bits
    assert np.array_equal(total, exact)  # integer arithmetic modulo 2^32: exact, no wrap at the extremes
    assert total[0] > 0 > total[1]
    assert np.max(np.abs(total - sum(values))) <= n * 0.5 / 2**bits
    noise = masking.noise_floor(n, values[0].size, 32)
    assert np.linalg.norm(total - sum(values)) <= noise


def test_32_bit_values_that_could_wrap_are_refused_in_one_line():
    limit = masking.max_abs(4, 32)
    masking.encode(np.array([limit * 0.999, -limit * 0.999]), 4, 32)
    for bad in (limit * 1.001, -limit * 1.001, np.inf, np.nan):
        with pytest.raises(FedesmError, match="32-bit fixed point with 23 fractional bits needs finite"):
            masking.encode(np.array([0.5, bad]), 4, 32)
    # a smaller bound buys resolution and refuses what exceeds it
    assert masking.fraction_bits(4, 32, bound=1.0) == 29
    with pytest.raises(FedesmError, match="cannot be encoded"):
        _messages32([np.array([1.5]), np.zeros(1)], SITES[:2], bound=1.0)
    # why the roster size is in the fixed point: values sized for 2 sites, summed over 4, wrap to a wrong sign
    big = 0.9 * masking.max_abs(2, 32)
    words = masking.encode(np.array([big]), 2, 32)
    assert masking.decode(words + words, masking.fraction_bits(2, 32))[0] == pytest.approx(2 * big)
    assert masking.decode(words + words + words + words, masking.fraction_bits(2, 32))[0] < 0


def test_32_bit_masked_message_is_indistinguishable_from_uniform():
    n = 200_000
    ramp = np.linspace(-5, 5, n)
    for plain in (np.zeros(n), ramp):
        words = _messages32([plain, np.zeros(n), np.zeros(n)], SITES)[0].words[1:]
        top = (words >> np.uint32(24)).astype(np.int64)
        assert stats.chisquare(np.bincount(top, minlength=256)).pvalue > 1e-4
        as_unit = words.astype(np.float64) / 2.0**32
        assert stats.kstest(as_unit, "uniform").pvalue > 1e-4
        bits = ((words[:, None] >> np.arange(32, dtype=np.uint32)) & np.uint32(1)).mean(axis=0)
        assert np.all(np.abs(bits - 0.5) < 0.006)
        assert abs(np.corrcoef(as_unit, ramp)[0, 1]) < 0.01
    enc = masking.encode(ramp, 3, 32).astype(np.float64) / 2.0**32  # the checks can fail: unmasked is not uniform
    assert stats.kstest(enc, "uniform").pvalue < 1e-10


def test_32_and_64_bit_messages_do_not_mix():
    names = SITES[:2]
    m32 = _messages32([np.ones(4), np.ones(4)], names)
    with pytest.raises(FedesmError, match="uint32 words, this sum is 64-bit"):
        masking.unmask_sum(m32, names, CTX)
    s = b"\x01" * 32
    w64 = masking.mask_stream(s, CTX, "site-1", "site-2", 4)
    w32 = masking.mask_stream(s, CTX, "site-1", "site-2", 8, word_bits=32)
    assert w64.dtype == np.uint64 and w32.dtype == np.uint32
    assert not np.array_equal(w64.view(np.uint32), w32)  # separate keystreams
    msgs = _messages32([np.ones(4)] * 3, SITES)
    with pytest.raises(FedesmError, match="masks did not cancel"):
        masking.unmask_sum(msgs[:2], SITES[:2], CTX, word_bits=32)
