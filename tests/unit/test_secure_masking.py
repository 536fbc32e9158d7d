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
