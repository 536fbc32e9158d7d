"""The names other modules must agree on: the head, the LoRA factor keys of the exchanged state, and
which modules of fair-esm's encoder run time-major. Pure string rules, importable from anywhere
(the aggregation maths, the trainer, DP-SGD) without building a model.

Exchanged tensors are keyed by PEFT's own state-dict names: LoRA factors end in ``.lora_A.weight`` /
``.lora_B.weight`` (an adapter name, ``.lora_A.default.weight``, is accepted too) and a pair shares
its prefix; the head is ``...classifier.weight`` / ``...classifier.bias``.
"""

from __future__ import annotations

import re
from typing import Optional, Sequence

CLASSIFIER_NAME = "classifier"  # attribute of the head in EsmTokenClassifier; PEFT saves it (modules_to_save)

_LORA_KEY = re.compile(r"^(?P<prefix>.+)\.lora_(?P<which>[AB])(?P<adapter>\.[^.]+)?\.weight$")


def split_lora_key(key: str) -> Optional[tuple[str, str]]:
    """('<module>[.<adapter>]', 'A' | 'B') for a LoRA factor key, else None."""
    m = _LORA_KEY.match(key)
    return (m.group("prefix") + (m.group("adapter") or ""), m.group("which")) if m else None


def fits_within_rank(key: str, shape: tuple, reference: tuple, any_rank: bool = False) -> bool:
    """The one rank rule for a site's tensor against a reference shape (sites of different means,
    fedesm.ranks): a LoRA factor, A (r_k x d_in) or B (d_out x r_k), matches on the other axis and has
    1 <= r_k <= the reference's rank (any r_k >= 1 with `any_rank`); every other tensor matches exactly."""
    shape, reference = tuple(shape), tuple(reference)
    split = split_lora_key(key)
    if split is None or len(shape) != 2 or len(reference) != 2:
        return shape == reference
    rank_axis = 0 if split[1] == "A" else 1
    limit = shape[rank_axis] if any_rank else reference[rank_axis]
    return shape[1 - rank_axis] == reference[1 - rank_axis] and 1 <= shape[rank_axis] <= limit


def lora_key(prefix: str, which: str, adapter: str = "") -> str:
    return f"{prefix}.lora_{which}{adapter}.weight"


def is_lora_a(name: str) -> bool:
    """A parameter or state-dict name of a LoRA A factor (`...lora_A.weight`, `...lora_A.default.weight`)."""
    return ".lora_A." in f"{name}."


def is_lora_b(name: str) -> bool:
    return ".lora_B." in f"{name}."


def lora_pairs(keys: Sequence[str]) -> dict[str, tuple[str, str]]:
    """Each adapted module (prefix incl. adapter name) -> its (lora_A key, lora_B key); a lone factor raises."""
    key_set = set(keys)
    pairs: dict[str, tuple[str, str]] = {}
    for key in keys:
        m = _LORA_KEY.match(key)
        if not m:
            continue
        prefix, adapter = m.group("prefix"), m.group("adapter") or ""
        other = lora_key(prefix, "B" if m.group("which") == "A" else "A", adapter)
        if other not in key_set:
            raise ValueError(f"LoRA key {key!r} has no matching {other!r}")
        if m.group("which") == "A":
            pairs[prefix + adapter] = (key, other)
    return pairs


def batch_axis(module_name: str) -> int:
    """fair-esm's encoder layers run in (T, B, C) layout; everything else (the head) in (B, T, C)."""
    return 1 if ".layers." in f".{module_name}" else 0
