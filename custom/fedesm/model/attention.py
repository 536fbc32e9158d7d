"""ESM-2 self-attention through PyTorch's fused ``scaled_dot_product_attention``, on fair-esm's own modules.

fair-esm's ``MultiheadAttention`` materialises every head's T x T weight matrix (fp32 softmax) and
keeps it for the backward pass: at 1,000 residues that is most of a training step's memory. The
fused path computes the same function with ``F.scaled_dot_product_attention`` (flash or
memory-efficient kernels on CUDA, the fused kernel on CPU), exactly as fair-esm does it:

* ``q = q_proj(x) * scaling``, ``k = k_proj(x)``, ``v = v_proj(x)``: the layer's own projections,
  so PEFT's LoRA layers (which replace those ``nn.Linear`` modules) and DP-SGD's hooks see the same
  calls and the same (T, B, C) inputs;
* the layer's own rotary embedding on q and k (same cos/sin tables);
* the padding mask on the keys (padded keys get no weight), dropout ``attn.dropout`` in training;
* ``out_proj`` on the heads' outputs, then the block's residuals, layer norms and GELU feed-forward
  (fair-esm's erf GELU as PyTorch's one kernel, ``gelu_erf``).

The packed path (``Packing``, ``packed_layer``; the default ``model.attention``) goes further: the
batch's padding is dropped before the embeddings, every projection (LoRA included), layer norm,
feed-forward and the head run on the (N, C) real tokens only, rotary positions are each token's
column in its own sequence, and attention runs per sequence: PyTorch's variable-length flash kernel
(``varlen_attn``) on CUDA in bf16/fp16, otherwise one SDPA call per sequence, or per run of equal-length
sequences (``Packing.runs``: evaluation's tiles of long chains). Same function as the
padded path (the tests hold logits and LoRA gradients to 1e-5 in fp32).

Nothing in fair-esm is replaced: where attention weights are asked for (``need_head_weights``,
contacts) a caller uses fair-esm's own forward, which is the stock path. The checkpoints, the
adapter files and every job are unchanged.
"""

from __future__ import annotations

import warnings
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def can_fuse(layer: nn.Module) -> bool:
    """True for a fair-esm ESM-2 ``TransformerLayer`` whose attention the fused path reproduces exactly."""
    attn = getattr(layer, "self_attn", None)
    return (attn is not None and getattr(attn, "rot_emb", None) is not None and attn.bias_k is None
            and not attn.add_zero_attn and attn.qkv_same_dim and not getattr(attn, "onnx_trace", False)
            and all(hasattr(layer, n) for n in ("self_attn_layer_norm", "final_layer_norm", "fc1", "fc2")))


def fused_self_attention(attn: nn.Module, x: torch.Tensor, key_padding_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """fair-esm's ``MultiheadAttention(x, x, x, key_padding_mask)`` output (T, B, C), without the weights."""
    t, b, c = x.shape
    h, d = attn.num_heads, attn.head_dim
    q = attn.q_proj(x) * attn.scaling
    k = attn.k_proj(x)
    v = attn.v_proj(x)
    # (T, B, C) -> (B, H, T, D): views, no copies
    q, k, v = (z.view(t, b, h, d).permute(1, 2, 0, 3) for z in (q, k, v))
    q, k = attn.rot_emb(q, k)  # fp32 tables: under autocast q, k come back fp32, as in fair-esm
    mask = None if key_padding_mask is None else ~key_padding_mask.bool()[:, None, None, :]  # True = attend
    out = F.scaled_dot_product_attention(q.to(v.dtype), k.to(v.dtype), v, attn_mask=mask,
                                         dropout_p=attn.dropout if attn.training else 0.0, scale=1.0)
    return attn.out_proj(out.permute(2, 0, 1, 3).reshape(t, b, c))


def gelu_erf(x: torch.Tensor) -> torch.Tensor:
    """fair-esm's ``gelu`` (``x * 0.5 * (1 + erf(x / sqrt(2)))``) as PyTorch's one fused kernel: the same
    erf-based function (not the tanh approximation) to float rounding, without five full-size temporaries
    (fair-esm's version was a quarter of the tiny demo model's evaluation time)."""
    return F.gelu(x)


def fused_layer(layer: nn.Module, x: torch.Tensor, padding_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """fair-esm's ``TransformerLayer.forward`` (pre-norm attention + GELU feed-forward) with fused attention."""
    residual = x
    x = residual + fused_self_attention(layer.self_attn, layer.self_attn_layer_norm(x), padding_mask)
    residual = x
    return residual + layer.fc2(gelu_erf(layer.fc1(layer.final_layer_norm(x))))


def stock_layer(layer: nn.Module, x: torch.Tensor, padding_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """fair-esm's own ``TransformerLayer.forward`` (explicit softmax over the T x T weights)."""
    return layer(x, self_attn_padding_mask=padding_mask, need_head_weights=False)[0]


# ---------------------------------------------------------------------------------------------
# Packed (unpadded) batches: only real tokens are computed
# ---------------------------------------------------------------------------------------------


class Packing:
    """Where a padded (B, T) batch's real tokens sit once packed into one (N,) run, sequence after sequence.

    ``flat``: their positions in the flattened (B * T) batch; ``positions``: their columns (rotary
    positions, exactly those of the padded path); ``offsets``: cumulative sequence starts (B + 1,),
    so sequence b is packed rows ``offsets[b]:offsets[b + 1]``; ``lengths`` the same as a Python list.
    """

    def __init__(self, real: torch.Tensor):
        b, t = real.shape
        self.shape = (b, t)
        self.flat = real.reshape(-1).nonzero().squeeze(1)
        self.positions = self.flat % t if t else self.flat
        counts = real.sum(1)
        self.offsets = F.pad(counts.cumsum(0), (1, 0))
        self.lengths = [int(n) for n in counts.tolist()]
        ends = np.cumsum(self.lengths).tolist()
        self.bounds = list(zip([0] + ends[:-1], ends))  # (start, end) of each sequence's rows, host-side
        self.runs = _equal_length_runs(self.lengths)
        self.max_length = max(self.lengths, default=0)
        self.segments = torch.repeat_interleave(torch.arange(b, device=real.device), counts)  # sequence of each row
        self._cu32 = None

    @property
    def n_tokens(self) -> int:
        return int(self.flat.numel())

    def cu_seqlens(self) -> torch.Tensor:
        if self._cu32 is None:
            self._cu32 = self.offsets.to(torch.int32)
        return self._cu32

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """(N, ...) packed rows back into a padded (B, T, ...) tensor, zeros at padding."""
        out = x.new_zeros((self.shape[0] * self.shape[1], *x.shape[1:]))
        return out.index_copy(0, self.flat, x).view(*self.shape, *x.shape[1:])


def _equal_length_runs(lengths: list[int]) -> list[tuple[int, int, int]]:
    """(start row, end row, length) of each run of consecutive non-empty sequences of one length.

    Evaluation packs windows sorted by length (every tile of a long chain is ``max_len`` long), so a
    run's sequences go through one batched SDPA call: the same per-sequence attention, fewer calls."""
    runs: list[list[int]] = []
    rows = 0
    for n in lengths:
        if n and runs and runs[-1][2] == n:
            runs[-1][1] += n
        elif n:
            runs.append([rows, rows + n, n])
        rows += n
    return [tuple(r) for r in runs]


def rotary_tables(attn: nn.Module, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 1, D) cos and sin of fair-esm's rotary embedding at each packed token's position (same fp32 values)."""
    inv_freq = attn.rot_emb.inv_freq
    freqs = torch.einsum("i,j->ij", positions.type_as(inv_freq), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos()[:, None, :], emb.sin()[:, None, :]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _varlen(q, k, v, packing: Packing) -> Optional[torch.Tensor]:
    """Flash variable-length attention on CUDA (bf16 / fp16, no dropout), else None."""
    if q.device.type != "cuda" or v.dtype not in (torch.bfloat16, torch.float16):
        return None
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    cu = packing.cu_seqlens()
    try:
        return varlen_attn(q, k, v, cu, cu, packing.max_length, packing.max_length, scale=1.0)
    except (RuntimeError, NotImplementedError) as e:  # no flash kernel for this GPU / head size: per sequence
        warnings.warn(f"varlen attention unavailable ({type(e).__name__}: {str(e)[:120]}); "
                      "packed attention runs per sequence", stacklevel=2)
        return None


def packed_self_attention(attn: nn.Module, x: torch.Tensor, packing: Packing,
                          tables: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """fair-esm's self-attention output (N, C) for packed tokens: each sequence attends to itself only."""
    n, c = x.shape
    h, d = attn.num_heads, attn.head_dim
    q = (attn.q_proj(x) * attn.scaling).view(n, h, d)
    k = attn.k_proj(x).view(n, h, d)
    v = attn.v_proj(x).view(n, h, d)
    cos, sin = tables
    q = (q * cos) + (_rotate_half(q) * sin)  # fair-esm's apply_rotary_pos_emb, per-sequence positions
    k = (k * cos) + (_rotate_half(k) * sin)
    q, k = q.to(v.dtype), k.to(v.dtype)
    dropout = attn.dropout if attn.training else 0.0
    out = _varlen(q, k, v, packing) if not dropout else None
    if out is None:  # one SDPA call per run of equal-length sequences, each on its own tokens: no padding, no mask
        parts = []
        for s, e, length in packing.runs:
            qs, ks, vs = (z[s:e].view(-1, length, h, d).transpose(1, 2) for z in (q, k, v))
            parts.append(F.scaled_dot_product_attention(qs, ks, vs, dropout_p=dropout, scale=1.0)
                         .transpose(1, 2).reshape(e - s, h, d))
        out = torch.cat(parts) if len(parts) > 1 else parts[0]
    return attn.out_proj(out.reshape(n, c))


def packed_layer(layer: nn.Module, x: torch.Tensor, packing: Packing,
                 tables: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """fair-esm's ``TransformerLayer.forward`` on packed (N, C) tokens."""
    residual = x
    x = residual + packed_self_attention(layer.self_attn, layer.self_attn_layer_norm(x), packing, tables)
    residual = x
    return residual + layer.fc2(gelu_erf(layer.fc1(layer.final_layer_norm(x))))
