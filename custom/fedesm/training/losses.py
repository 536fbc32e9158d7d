"""Per-token losses for per-residue binding-site labels (padding and special tokens weigh 0)."""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from fedesm.data.batching import IGNORE_INDEX
from fedesm.data.records import Record


def class_weights(mode, records: Sequence[Record]) -> Optional[list[float]]:
    """The loss weights of classes 0 and 1 for `training.class_weights` on these records.

    "balanced": w_c = 0.5 / (share of class c), so both classes weigh the same in the loss (at 4% positives
    the positive class weighs 24x the negative); "sqrt": w_c proportional to 1 / sqrt(share of class c), the
    square root of that ratio (about 4.9x at 4%); both scaled so the mean weight per residue is 1. None:
    plain cross-entropy; [w0, w1]: as given.
    """
    if mode is None:
        return None
    if mode in ("balanced", "sqrt"):
        pos = sum(r.n_positive for r in records) / max(1, sum(len(r) for r in records))
        pos = min(max(pos, 1e-3), 1 - 1e-3)
        if mode == "balanced":
            return [0.5 / (1 - pos), 0.5 / pos]
        k = 1 / (math.sqrt(1 - pos) + math.sqrt(pos))
        return [k / math.sqrt(1 - pos), k / math.sqrt(pos)]
    return [float(w) for w in mode]


def token_losses(logits: torch.Tensor, labels: torch.Tensor, class_weight: Optional[torch.Tensor] = None,
                 focal_gamma: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (weighted) losses and the weights they carry, both (B, T); padding/specials weigh 0.

    Cross-entropy, class-weighted when `class_weight` is set, times (1 - p_t)^gamma when `focal_gamma`
    > 0 (focal loss). The batch loss is losses.sum() / weights.sum(): with gamma 0 exactly PyTorch's
    weighted-mean cross-entropy.
    """
    valid = labels != IGNORE_INDEX
    safe = labels.clamp(min=0)
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    loss = -logp
    if focal_gamma:
        loss = loss * (1 - logp.exp()).pow(focal_gamma)
    weights = class_weight[safe] * valid if class_weight is not None else valid.float()
    return loss * weights, weights
