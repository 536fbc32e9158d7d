"""The network fedesm trains: fair-esm's ESM-2 encoder and a linear per-residue head on its last layer."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from fedesm.model.attention import Packing, can_fuse, fused_layer, packed_layer, rotary_tables, stock_layer
from fedesm.keys import CLASSIFIER_NAME
from fedesm.settings import ATTENTIONS, ModelSettings


class EsmTokenClassifier(nn.Module):
    """ESM-2 encoder + a linear per-residue head on the last layer's representations.

    ``attention``: ``packed`` (default, ``model.attention``) drops the padding first: only real
    tokens go through the embeddings, layers and head, attention runs per sequence
    (``fedesm.model.attention.Packing``), and the logits come back padded (zeros at padding);
    ``fused`` runs the padded batch with PyTorch's fused kernel, ``stock`` through fair-esm's own
    forward. All three compute the same function with the same weights. ``checkpoint_layers``: recompute each layer's
    activations in the backward pass instead of keeping them (less memory, ~one more forward). ``head_dropout``:
    ``model.head_dropout`` (None: its default).
    """

    def __init__(self, esm2: nn.Module, num_labels: int = 2, head_dropout: Optional[float] = None,
                 attention: Optional[str] = None, checkpoint_layers: bool = False):
        super().__init__()
        self.esm = esm2
        self.dropout = nn.Dropout(ModelSettings.head_dropout if head_dropout is None else head_dropout)
        setattr(self, CLASSIFIER_NAME, nn.Linear(esm2.embed_dim, num_labels))
        self.set_attention(attention or ModelSettings.attention)
        self.checkpoint_layers = bool(checkpoint_layers)

    @property
    def head(self) -> nn.Linear:
        return getattr(self, CLASSIFIER_NAME)

    def set_attention(self, attention: str) -> None:
        """``packed``, ``fused`` or ``stock``; packed and fused fall back to the padded stock layers on a
        model they cannot reproduce exactly."""
        if attention not in ATTENTIONS:
            raise ValueError(f"attention {attention!r} is not one of {', '.join(ATTENTIONS)}")
        self.attention = attention
        self._packed = attention == "packed" and all(can_fuse(layer) for layer in self.esm.layers)
        self._layer_fns = [fused_layer if attention in ("packed", "fused") and can_fuse(layer) else stock_layer
                           for layer in self.esm.layers]
        self.last_packing: Optional[Packing] = None  # the last packed forward's layout (DP-SGD's per-sample sums)

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Last-layer representations (B, T, E); fair-esm's ESM2.forward without the LM head."""
        esm2 = self.esm
        padding_mask = tokens.eq(esm2.padding_idx)
        x = esm2.embed_scale * esm2.embed_tokens(tokens)
        if esm2.token_dropout:  # same rescaling as fair-esm, so pretrained features are unchanged
            x = x.masked_fill((tokens == esm2.mask_idx).unsqueeze(-1), 0.0)
            mask_ratio_train = 0.15 * 0.8
            src_lengths = (~padding_mask).sum(-1)
            mask_ratio_observed = (tokens == esm2.mask_idx).sum(-1).to(x.dtype) / src_lengths
            x = x * (1 - mask_ratio_train) / (1 - mask_ratio_observed)[:, None, None]
        x = x * (1 - padding_mask.unsqueeze(-1).type_as(x))
        x = x.transpose(0, 1)
        mask = padding_mask if padding_mask.any() else None
        recompute = self.checkpoint_layers and self.training and torch.is_grad_enabled()
        for layer, fn in zip(esm2.layers, self._layer_fns):
            if recompute:
                x = checkpoint(fn, layer, x, mask, use_reentrant=False)
            else:
                x = fn(layer, x, mask)
        x = esm2.emb_layer_norm_after(x)
        return x.transpose(0, 1)

    def encode_packed(self, tokens: torch.Tensor, packing: Packing) -> torch.Tensor:
        """Last-layer representations (N, E) of the real tokens only; same values as ``encode``'s."""
        esm2 = self.esm
        tok = tokens.reshape(-1).index_select(0, packing.flat)
        x = esm2.embed_scale * esm2.embed_tokens(tok)
        if esm2.token_dropout:  # fair-esm's rescaling, per sequence, in the same operation order
            is_mask = tok == esm2.mask_idx
            x = x.masked_fill(is_mask.unsqueeze(-1), 0.0)
            mask_ratio_train = 0.15 * 0.8
            src_lengths = packing.offsets[1:] - packing.offsets[:-1]
            n_masked = torch.zeros_like(src_lengths).index_add_(0, packing.segments, is_mask.long())
            mask_ratio_observed = n_masked.to(x.dtype) / src_lengths
            x = x * (1 - mask_ratio_train) / (1 - mask_ratio_observed)[packing.segments][:, None]
        tables = rotary_tables(esm2.layers[0].self_attn, packing.positions)
        recompute = self.checkpoint_layers and self.training and torch.is_grad_enabled()
        for layer in esm2.layers:
            if recompute:
                x = checkpoint(packed_layer, layer, x, packing, tables, use_reentrant=False)
            else:
                x = packed_layer(layer, x, packing, tables)
        return esm2.emb_layer_norm_after(x)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Per-token logits (B, T, num_labels); on the packed path zeros at padding tokens."""
        if self._packed:
            packing = Packing(tokens.ne(self.esm.padding_idx))
            if packing.n_tokens:
                self.last_packing = packing
                return packing.unpack(self.head(self.dropout(self.encode_packed(tokens, packing))))
        self.last_packing = None
        return self.head(self.dropout(self.encode(tokens)))


def classifiers(model: nn.Module) -> list[EsmTokenClassifier]:
    """The EsmTokenClassifier(s) in ``model`` (itself, or inside PEFT's wrapper)."""
    found = [m for m in model.modules() if isinstance(m, EsmTokenClassifier)]
    if not found:
        raise ValueError(f"{type(model).__name__} holds no EsmTokenClassifier")
    return found


def set_attention(model: nn.Module, attention: str) -> None:
    """Switch every EsmTokenClassifier in ``model`` to ``packed``, ``fused`` or ``stock`` (``model.attention``)."""
    for clf in classifiers(model):
        clf.set_attention(attention)


def set_activation_checkpointing(model: nn.Module, enabled: bool) -> None:
    """Recompute layer activations in the backward pass (``training.activation_checkpointing``)."""
    for clf in classifiers(model):
        clf.checkpoint_layers = bool(enabled)
