"""The paper's privacy mode: Gaussian noise of a fixed scale on every trainable gradient at every step.

It gives no formal guarantee by itself (no bound on a sample's influence); DP-SGD
(`fedesm.training.privacy.dpsgd`) does. The noise comes from a `NoiseSource`: secret (OS entropy)
unless the site's own config asks for reproducible noise to debug.
"""

from __future__ import annotations

from typing import Optional

from fedesm.training.privacy.randomness import NoiseSource


class GradientNoise:
    """Adds N(0, std^2) to the gradient of every trainable parameter before the optimizer step."""

    def __init__(self, std: float, source: Optional[NoiseSource] = None):
        if std < 0:
            raise ValueError("gradient noise std must be >= 0")
        self.std = float(std)
        self.source = source if source is not None else NoiseSource.secret()

    def apply(self, parameters) -> None:
        if self.std == 0:
            return
        grads = [p.grad for p in parameters if p.grad is not None]
        for g, noise in zip(grads, self.source.normal_like(grads, self.std)):
            g.add_(noise.to(dtype=g.dtype))
