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
* ``out_proj`` on the heads' outputs, then the block's residuals, layer norms and GELU feed-forward.

Nothing in fair-esm is replaced: where attention weights are asked for (``need_head_weights``,
contacts) a caller uses fair-esm's own forward, which is the stock path. The checkpoints, the
adapter files and every job are unchanged.
"""

from __future__ import annotations

from typing import Optional

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


def fused_layer(layer: nn.Module, x: torch.Tensor, padding_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """fair-esm's ``TransformerLayer.forward`` (pre-norm attention + GELU feed-forward) with fused attention."""
    from esm.modules import gelu

    residual = x
    x = residual + fused_self_attention(layer.self_attn, layer.self_attn_layer_norm(x), padding_mask)
    residual = x
    return residual + layer.fc2(gelu(layer.fc1(layer.final_layer_norm(x))))


def stock_layer(layer: nn.Module, x: torch.Tensor, padding_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """fair-esm's own ``TransformerLayer.forward`` (explicit softmax over the T x T weights)."""
    return layer(x, self_attn_padding_mask=padding_mask, need_head_weights=False)[0]
