"""The secure round's messages as flat dicts of numpy arrays, the form NVFLARE carries (``DXO`` data) and a
site's outbound filter can check by name, dtype and size: signed keys, the sketch plan, bases, masked words.

Framework-free, like the rest of ``fedesm.secure``: ``fedesm.flare`` puts these dicts into Shareables.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from fedesm.errors import FedesmError
from fedesm.secure.keys import SignedKey
from fedesm.secure.masking import MaskedMessage
from fedesm.secure.sketch import SketchPlan

KEY_FIELDS = ("public", "signature", "certificate", "context")
# Sizes a site's filter allows for its key message: X25519 is 32 bytes; an RSA-PSS signature of a kit key
# (2048-4096 bits) at most 512; a kit certificate in PEM a few KB; the context a few hundred bytes.
KEY_LIMITS = {"public": 32, "signature": 1024, "certificate": 16384, "context": 1024}
WORDS, CONTEXT = "words", "context"
# The NVFLARE tasks that carry the masked passes (the keys ride on the train task's reply).
SECURE_TASKS = {"pass1": "secure_pass1", "pass2": "secure_pass2", "sum": "secure_sum"}


def _bytes(a) -> bytes:
    arr = np.asarray(a)
    if arr.dtype != np.uint8 or arr.ndim != 1:
        raise FedesmError(f"secure aggregation: expected a byte array, got {arr.dtype} of shape {arr.shape}")
    return arr.tobytes()


def _array(b: bytes) -> np.ndarray:
    return np.frombuffer(bytes(b), dtype=np.uint8).copy()


def key_to_arrays(key: SignedKey, prefix: str = "") -> dict[str, np.ndarray]:
    return {f"{prefix}{f}": _array(getattr(key, f)) for f in KEY_FIELDS}


def key_from_arrays(data: Mapping[str, np.ndarray], site: str, prefix: str = "") -> SignedKey:
    try:
        return SignedKey(site, *(_bytes(data[f"{prefix}{f}"]) for f in ("context", "public", "signature",
                                                                          "certificate")))
    except KeyError as e:
        raise FedesmError(f"secure aggregation: the key message of {site!r} has no {e.args[0]!r}") from None


def keys_to_arrays(keys: Mapping[str, SignedKey]) -> dict[str, np.ndarray]:
    """Every site's signed key, as the server relays them (``key/<site>/<field>``)."""
    out = {}
    for site, key in keys.items():
        out.update(key_to_arrays(key, f"key/{site}/"))
    return out


def keys_from_arrays(data: Mapping[str, np.ndarray]) -> dict[str, SignedKey]:
    sites = sorted({k.split("/")[1] for k in data if k.startswith("key/") and k.count("/") == 2})
    return {s: key_from_arrays(data, s, f"key/{s}/") for s in sites}


def plan_to_arrays(plan: SketchPlan) -> dict[str, np.ndarray]:
    out = {"plan/seed": np.array([plan.seed], dtype=np.int64)}
    out.update({f"plan/width/{name}": np.array([w], dtype=np.int64) for name, w in plan.widths.items()})
    return out


def plan_from_arrays(data: Mapping[str, np.ndarray]) -> SketchPlan:
    if "plan/seed" not in data:
        raise FedesmError("secure aggregation: the pass-1 task carries no sketch plan")
    widths = {k[len("plan/width/"):]: int(np.asarray(v).ravel()[0]) for k, v in data.items()
              if k.startswith("plan/width/")}
    return SketchPlan(int(np.asarray(data["plan/seed"]).ravel()[0]), widths)


def bases_to_arrays(bases: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {f"basis/{name}": np.asarray(q, dtype=np.float64) for name, q in bases.items()}


def bases_from_arrays(data: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k[len("basis/"):]: np.asarray(v, dtype=np.float64) for k, v in data.items() if k.startswith("basis/")}


def message_to_arrays(message: MaskedMessage) -> dict[str, np.ndarray]:
    return {WORDS: np.asarray(message.words, dtype=np.uint64), CONTEXT: _array(message.context)}


def message_from_arrays(data: Mapping[str, np.ndarray], site: str) -> MaskedMessage:
    words = np.asarray(data.get(WORDS))
    if words.dtype != np.uint64 or words.ndim != 1 or words.size < 1:
        raise FedesmError(f"secure aggregation: {site!r} sent no masked words (got {words.dtype} {words.shape})")
    return MaskedMessage(site, _bytes(data.get(CONTEXT, np.zeros(0, np.uint8))), words)
