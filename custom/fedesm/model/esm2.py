"""The network fedesm trains: fair-esm's ESM-2 encoder and a linear per-residue head on its last layer."""

from __future__ import annotations

import torch
import torch.nn as nn

from fedesm.model.keys import CLASSIFIER_NAME


class EsmTokenClassifier(nn.Module):
    """ESM-2 encoder + a linear per-residue head on the last layer's representations."""

    def __init__(self, esm2: nn.Module, num_labels: int = 2, head_dropout: float = 0.1):
        super().__init__()
        self.esm = esm2
        self.dropout = nn.Dropout(head_dropout)
        setattr(self, CLASSIFIER_NAME, nn.Linear(esm2.embed_dim, num_labels))

    @property
    def head(self) -> nn.Linear:
        return getattr(self, CLASSIFIER_NAME)

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
        for layer in esm2.layers:
            x, _ = layer(x, self_attn_padding_mask=mask, need_head_weights=False)
        x = esm2.emb_layer_norm_after(x)
        return x.transpose(0, 1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.encode(tokens)))
