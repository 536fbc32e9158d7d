"""Pairwise additive masking (Bonawitz et al., CCS 2017, without dropout recovery): the server adds the
sites' masked messages and learns the sum, and nothing else.

Each site encodes its terms in fixed point (``SCALE_BITS`` fractional bits, two's complement modulo
2^64) and adds, for every other site j, a mask drawn from the secret it shares with j: ``+m_ij`` when its
name sorts before j's, ``-m_ij`` after. Summed over all the round's sites the masks cancel exactly
(integer arithmetic modulo 2^64), so the decoded sum is the sum of the encodings; each message alone is
its encoding plus pseudorandom uniform words, which says nothing about it without a peer's secret.

Masks are AES-256 in counter mode keyed by HKDF-SHA256 of the pair's X25519 secret and the message's
context (job, round, pass) and the two names: fresh for every message, never reused across passes.

A sum missing one site's message leaves that site's masks in the others' messages: the decoded numbers
are uniform noise. It is never used: ``unmask_sum`` requires exactly the round's sites, and every message
carries one check word holding the integer 1, so a correct sum's check word is the number of sites and
a wrong roster (sites that masked for different peers) fails it, but for a 2^-64 chance.
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


def max_abs(n_sites: int) -> float:
    """The largest |value| one site may encode so that the sum of ``n_sites`` values cannot wrap: each
    encoding below 2^63 / n_sites in magnitude keeps the sum inside int64."""
    return (2.0**63 - 2.0**11) / _SCALE / n_sites  # 2^11: float64 rounding of the product below 2^63


def noise_floor(n_sites: int, size: int) -> float:
    """A bound on the Frobenius norm of the rounding error of a decoded sum of ``size`` numbers (half a step
    per site and number)."""
    return 0.5 * n_sites * math.sqrt(max(size, 1)) / _SCALE


def encode(x: np.ndarray, n_sites: int) -> np.ndarray:
    """Fixed point modulo 2^64 (uint64 words) of float values; refuses a value that could wrap the sum."""
    x = np.asarray(x, dtype=np.float64)
    bound = max_abs(n_sites)
    if x.size and not (np.all(np.isfinite(x)) and float(np.max(np.abs(x))) < bound):
        raise FedesmError(f"secure aggregation: a value of {float(np.max(np.abs(x))):.3g} cannot be encoded "
                          f"(fixed point with {SCALE_BITS} fractional bits needs finite |x| < {bound:.3g} at "
                          f"{n_sites} sites)")
    return np.rint(x * _SCALE).astype(np.int64).view(np.uint64)


def decode(words: np.ndarray) -> np.ndarray:
    """The float values of fixed-point words (two's complement: a negative sum decodes negative)."""
    return np.asarray(words, dtype=np.uint64).view(np.int64).astype(np.float64) / _SCALE


def mask_stream(secret: bytes, context: bytes, low: str, high: str, n: int) -> np.ndarray:
    """``n`` pseudorandom uint64 words for the pair (low, high) and one message context: AES-256-CTR
    keystream under a key derived from the pair's shared secret (a counter-mode PRG)."""
    info = b"fedesm-secagg-mask\x00" + context + b"\x00" + low.encode() + b"\x00" + high.encode()
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)
    enc = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
    return np.frombuffer(enc.update(bytes(8 * n)) + enc.finalize(), dtype="<u8").astype(np.uint64, copy=False)


@dataclass(frozen=True)
class MaskedMessage:
    """One site's masked contribution to one sum: the check word then the masked payload words."""

    site: str
    context: bytes
    words: np.ndarray  # uint64, 1 + payload length


def mask(values: np.ndarray, site: str, secrets: Mapping[str, bytes], context: bytes) -> MaskedMessage:
    """A site's message: its values (flat float64, already weighted) encoded, plus the check word, plus one
    mask per peer in ``secrets`` (the round's other sites and the secret shared with each)."""
    if site in secrets:
        raise FedesmError(f"secure aggregation: site {site!r} is listed among its own peers")
    n_sites = len(secrets) + 1
    words = np.concatenate([np.ones(_CHECK, dtype=np.uint64), encode(np.ravel(values), n_sites)])
    for peer in sorted(secrets):
        low, high = sorted((site, peer))
        stream = mask_stream(secrets[peer], context, low, high, words.size)
        if site == low:  # uint64 arithmetic wraps: modulo 2^64
            words += stream
        else:
            words -= stream
    return MaskedMessage(site, bytes(context), words)


def unmask_sum(messages: Iterable[MaskedMessage], expected: Sequence[str], context: bytes) -> np.ndarray:
    """The decoded sum (flat float64) of one message from each of exactly the ``expected`` sites.

    Refuses (FedesmError) a missing, extra or repeated site, a message for another context or length,
    and a sum whose check word is not the number of sites: masks that did not cancel.
    """
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
    return decode(total[_CHECK:])


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
