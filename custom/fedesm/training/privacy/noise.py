"""The paper's privacy mode: Gaussian noise of a fixed scale on every trainable gradient at every step.

It gives no formal guarantee by itself (no bound on a sample's influence); DP-SGD
(`fedesm.training.privacy.dpsgd`) does.
"""

from __future__ import annotations

import torch


class GradientNoise:
    """Adds N(0, std^2) to the gradient of every trainable parameter before the optimizer step."""

    def __init__(self, std: float, seed: int = 0):
        if std < 0:
            raise ValueError("gradient noise std must be >= 0")
        self.std = float(std)
        self.generator = torch.Generator().manual_seed(seed)

    def apply(self, parameters) -> None:
        if self.std == 0:
            return
        for p in parameters:
            if p.grad is not None:
                noise = torch.randn(p.grad.shape, generator=self.generator, dtype=torch.float32)
                p.grad.add_(noise.to(device=p.grad.device, dtype=p.grad.dtype), alpha=self.std)
