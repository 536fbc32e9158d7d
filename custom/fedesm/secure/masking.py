"""Pairwise additive masking (Bonawitz et al., CCS 2017, without dropout recovery): the server adds the
sites' masked messages and learns the sum, and nothing else.

Each site encodes its terms in fixed point (two's complement modulo 2^w: ``word_bits`` w = 64, the default,
with ``SCALE_BITS`` fractional bits; or w = 32, half the bytes, with the fractional bits ``fraction_bits``
leaves after room for the sum of the sites' values, each below a public ``bound``) and adds, for every
other site j, a mask drawn from the secret it shares with j: ``+m_ij`` when its name sorts before j's,
``-m_ij`` after. Summed over all the round's sites the masks cancel exactly
(integer arithmetic modulo 2^w), so the decoded sum is the sum of the encodings; each message alone is
its encoding plus pseudorandom uniform words, which says nothing about it without a peer's secret.

Masks are AES-256 in counter mode keyed by HKDF-SHA256 of the pair's X25519 secret and the message's
context (job, round, pass) and the two names: fresh for every message, never reused across passes.

A sum missing one site's message leaves that site's masks in the others' messages: the decoded numbers
are uniform noise. It is never used: ``unmask_sum`` requires exactly the round's sites, and every message
carries one check word holding the integer 1, so a correct sum's check word is the number of sites and
a wrong roster (sites that masked for different peers) fails it, but for a 2^-w chance.

32-bit words halve every masked message; the price is resolution and range, both public and fixed before
the round (every party must use the same ``word_bits`` and ``bound``): at 8 sites and the default bound of
64, 22 fractional bits (2.4e-7 per value), and a check word that a wrong roster passes with chance 2^-32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedesm.errors import FedesmError

# 2^-32 ~ 2.3e-10 resolution, |value| < 2^31 / n_sites: LoRA terms (|x| << 1e3) sit far inside both.
SCALE_BITS = 32
_SCALE = float(2**SCALE_BITS)
_CHECK = 1  # words before the payload: the check word
WORD_BITS = (64, 32)
# 32-bit words: the public bound on |value| a site may send when none is given (weighted LoRA sketch terms and
# head weights sit far below it)
BOUND_32 = 64.0
_DTYPE = {64: np.uint64, 32: np.uint32}
_SIGNED = {64: np.int64, 32: np.int32}


def _check_word_bits(word_bits: int) -> None:
    if word_bits not in WORD_BITS:
        raise FedesmError(f"secure aggregation: word_bits must be one of {WORD_BITS}, not {word_bits!r}")


def fraction_bits(n_sites: int, word_bits: int = 64, bound: float | None = None) -> int:
    """The fixed point's fractional bits: ``SCALE_BITS`` for 64-bit words; for 32-bit words as many as leave
    room for the sum of ``n_sites`` values each below ``bound`` (``BOUND_32`` if None) in magnitude:
    31 - ceil(log2(n_sites)) - ceil(log2(bound)). Refuses a bound and roster that leave none."""
    _check_word_bits(word_bits)
    if word_bits == 64:
        return SCALE_BITS
    bound = BOUND_32 if bound is None else float(bound)
    if not (math.isfinite(bound) and bound > 0) or n_sites < 1:
        raise FedesmError(f"secure aggregation: a 32-bit fixed point needs a bound > 0 and sites >= 1, not "
                          f"bound {bound!r} at {n_sites} sites")
    bits = 31 - math.ceil(math.log2(n_sites)) - math.ceil(math.log2(bound))
    if bits < 1:
        raise FedesmError(f"secure aggregation: 32-bit words cannot hold the sum of {n_sites} values below "
                          f"{bound:g} with any fractional bits; use word_bits 64 or a smaller bound")
    return bits


def max_abs(n_sites: int, word_bits: int = 64, bound: float | None = None) -> float:
    """The largest |value| one site may encode so that the sum of ``n_sites`` values cannot wrap. 64-bit: each
    encoding below 2^63 / n_sites in magnitude keeps the sum inside int64. 32-bit: each encoding at most
    (2^31 - 1) // n_sites steps (exact in float64): ``bound``, less at most half a step."""
    _check_word_bits(word_bits)
    if word_bits == 64:
        return (2.0**63 - 2.0**11) / _SCALE / n_sites  # 2^11: float64 rounding of the product below 2^63
    return ((2**31 - 1) // n_sites + 0.5) / 2.0 ** fraction_bits(n_sites, word_bits, bound)


def noise_floor(n_sites: int, size: int, word_bits: int = 64, bound: float | None = None) -> float:
    """A bound on the Frobenius norm of the rounding error of a decoded sum of ``size`` numbers (half a step
    per site and number)."""
    return 0.5 * n_sites * math.sqrt(max(size, 1)) / 2.0 ** fraction_bits(n_sites, word_bits, bound)


def encode(x: np.ndarray, n_sites: int, word_bits: int = 64, bound: float | None = None) -> np.ndarray:
    """Fixed point modulo 2^word_bits (uint64 or uint32 words) of float values; refuses a value that could wrap
    the sum of ``n_sites`` encodings."""
    x = np.asarray(x, dtype=np.float64)
    limit = max_abs(n_sites, word_bits, bound)
    bits = fraction_bits(n_sites, word_bits, bound)
    if x.size and not (np.all(np.isfinite(x)) and float(np.max(np.abs(x))) < limit):
        worst = float(np.max(np.abs(x))) if np.all(np.isfinite(x)) else float("nan")
        raise FedesmError(f"secure aggregation: a value of {worst:.3g} cannot be encoded "
                          f"({word_bits}-bit fixed point with {bits} fractional bits needs finite |x| < "
                          f"{limit:.3g} at {n_sites} sites)")
    return np.rint(x * 2.0**bits).astype(_SIGNED[word_bits]).view(_DTYPE[word_bits])


def decode(words: np.ndarray, bits: int = SCALE_BITS) -> np.ndarray:
    """The float values of fixed-point words (two's complement: a negative sum decodes negative); the word size
    is the array's (uint64 or uint32), ``bits`` its fractional bits (``fraction_bits``)."""
    words = np.asarray(words)
    signed = np.int32 if words.dtype == np.uint32 else np.int64
    unsigned = np.uint32 if signed is np.int32 else np.uint64
    return words.astype(unsigned, copy=False).view(signed).astype(np.float64) / 2.0**bits


def mask_stream(secret: bytes, context: bytes, low: str, high: str, n: int, word_bits: int = 64) -> np.ndarray:
    """``n`` pseudorandom words (uint64, or uint32) for the pair (low, high) and one message context: AES-256-CTR
    keystream under a key derived from the pair's shared secret (a counter-mode PRG); the word size is in the
    key's derivation for 32-bit words, so the two sizes never share a keystream."""
    _check_word_bits(word_bits)
    info = b"fedesm-secagg-mask\x00" + context + b"\x00" + low.encode() + b"\x00" + high.encode()
    if word_bits != 64:
        info += b"\x00w%d" % word_bits
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)
    enc = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
    nbytes = word_bits // 8
    return np.frombuffer(enc.update(bytes(nbytes * n)) + enc.finalize(), dtype=f"<u{nbytes}") \
        .astype(_DTYPE[word_bits], copy=False)


@dataclass(frozen=True)
class MaskedMessage:
    """One site's masked contribution to one sum: the check word then the masked payload words."""

    site: str
    context: bytes
    words: np.ndarray  # uint64 (or uint32: word_bits 32), 1 + payload length


def mask(values: np.ndarray, site: str, secrets: Mapping[str, bytes], context: bytes, word_bits: int = 64,
         bound: float | None = None) -> MaskedMessage:
    """A site's message: its values (flat float64, already weighted) encoded, plus the check word, plus one
    mask per peer in ``secrets`` (the round's other sites and the secret shared with each). ``word_bits`` and
    ``bound`` (32-bit words only) are the round's, the same at every site."""
    if site in secrets:
        raise FedesmError(f"secure aggregation: site {site!r} is listed among its own peers")
    n_sites = len(secrets) + 1
    words = np.concatenate([np.ones(_CHECK, dtype=_DTYPE.get(word_bits, np.uint64)),
                            encode(np.ravel(values), n_sites, word_bits, bound)])
    for peer in sorted(secrets):
        low, high = sorted((site, peer))
        stream = mask_stream(secrets[peer], context, low, high, words.size, word_bits)
        if site == low:  # unsigned arithmetic wraps: modulo 2^word_bits
            words += stream
        else:
            words -= stream
    return MaskedMessage(site, bytes(context), words)


def unmask_sum(messages: Iterable[MaskedMessage], expected: Sequence[str], context: bytes, word_bits: int = 64,
               bound: float | None = None) -> np.ndarray:
    """The decoded sum (flat float64) of one message from each of exactly the ``expected`` sites.

    Refuses (FedesmError) a missing, extra or repeated site, a message for another context, length or word
    size, and a sum whose check word is not the number of sites: masks that did not cancel.
    """
    bits = fraction_bits(len(expected), word_bits, bound)
    messages = list(messages)
    names = [m.site for m in messages]
    missing, extra = sorted(set(expected) - set(names)), sorted(set(names) - set(expected))
    repeated = sorted({n for n in names if names.count(n) > 1})
    if missing or extra or repeated:
        raise FedesmError(f"secure aggregation: the sum needs one message from each of {sorted(expected)}; "
                          f"missing {missing}, unexpected {extra}, repeated {repeated}: an incomplete sum is "
                          "never used")
    for m in messages:
        if m.context != context:
            raise FedesmError(f"secure aggregation: site {m.site!r} sent a message for context {m.context!r}, "
                              f"this sum is {context!r}")
        if m.words.dtype != _DTYPE[word_bits]:
            raise FedesmError(f"secure aggregation: site {m.site!r} sent {m.words.dtype} words, this sum is "
                              f"{word_bits}-bit")
        if m.words.shape != messages[0].words.shape:
            raise FedesmError(f"secure aggregation: site {m.site!r} sent {m.words.size} words, site "
                              f"{messages[0].site!r} {messages[0].words.size}")
    total = np.zeros_like(messages[0].words)
    for m in messages:
        total += m.words
    if int(total[0]) != len(expected):
        raise FedesmError(f"secure aggregation: the masks did not cancel in the sum of {sorted(expected)} "
                          "(the sites masked for different rosters, or a message was altered); the sum is "
                          "not used")
    return decode(total[_CHECK:], bits)


# --------------------------------------------------------------------------------------------
# flat messages: a dict of arrays in a layout every party knows
# --------------------------------------------------------------------------------------------

Layout = tuple[tuple[str, tuple[int, ...]], ...]


def layout_of(terms: Mapping[str, np.ndarray]) -> Layout:
    """Names and shapes in order: what the flat vector holds (public; the same at every site)."""
    return tuple((k, tuple(np.shape(v))) for k, v in terms.items())


def flatten(terms: Mapping[str, np.ndarray], layout: Layout) -> np.ndarray:
    if [k for k, _ in layout] != list(terms) or any(np.shape(terms[k]) != s for k, s in layout):
        raise FedesmError("secure aggregation: the terms do not match the round's layout")
    return np.concatenate([np.ravel(np.asarray(terms[k], dtype=np.float64)) for k, _ in layout]) \
        if layout else np.zeros(0)


def unflatten(flat: np.ndarray, layout: Layout) -> dict[str, np.ndarray]:
    out, at = {}, 0
    for k, shape in layout:
        n = int(np.prod(shape))
        out[k] = flat[at : at + n].reshape(shape)
        at += n
    if at != flat.size:
        raise FedesmError(f"secure aggregation: the sum holds {flat.size} numbers, the layout {at}")
    return out
