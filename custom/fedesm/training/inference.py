"""Per-residue probabilities from a model: devices, mixed precision, and windows over long chains."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from fedesm.data.batching import ESM2_MAX_RESIDUES, Tokenizer, eval_batches


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast_dtype(device: torch.device, precision: str = "auto") -> Optional[torch.dtype]:
    """bf16 autocast on CUDA (or when asked), none (fp32) otherwise."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def check_max_len(max_len: int) -> None:
    if not 1 <= int(max_len) <= ESM2_MAX_RESIDUES:
        raise ValueError(f"max_len {max_len}: ESM-2 takes 1 to {ESM2_MAX_RESIDUES} residues per window "
                         f"(longer chains are cropped in training and tiled in evaluation)")


@torch.no_grad()
def predict_proba(model, tokenizer: Tokenizer, sequences: Sequence[str], max_len: int, device=None,
                  batch_tokens: int = 16384, autocast=None, progress: bool = False,
                  desc: str = "predict") -> list[np.ndarray]:
    """Per-residue probability of the positive class; long chains tiled, each residue scored once.

    Windows go in batches of ~`batch_tokens` tokens, by length (little padding; on the default packed
    path none is computed). `progress`: a bar over the residues scored, for long passes."""
    check_max_len(max_len)
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = [np.full(len(s), np.nan, dtype=np.float64) for s in sequences]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(len(s) for s in sequences), desc=desc, unit="res", leave=False, dynamic_ncols=True)
    for windows, tokens in eval_batches(list(sequences), tokenizer, max_len, batch_tokens):
        with torch.autocast(torch.device(device).type, dtype=autocast, enabled=autocast is not None):
            logits = model(tokens.to(device))
        prob = torch.softmax(logits.float(), dim=-1)[..., 1].cpu().numpy()
        for row, w in enumerate(windows):  # token 0 is <cls>: residue j of the window is token j + 1
            out[w.record][w.keep_start : w.keep_end] = prob[row, 1 + w.keep_start - w.start : 1 + w.keep_end - w.start]
        if bar is not None:
            bar.update(sum(w.keep_end - w.keep_start for w in windows))
    if bar is not None:
        bar.close()
    if was_training:
        model.train()
    return out
