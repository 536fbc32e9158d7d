"""How one training step turns a batch into gradients: the trainer's only privacy interface.

A mechanism has five parts, and the trainer calls nothing else:
  batches(sampler)                  the sampler the trainer draws its batches from
  backward(token_losses, tok, lab)  set `.grad` of the trainable parameters; return the batch loss
  spent()                           what it reports in each round's statistics (e.g. epsilon)
  seek(step)                        a resumed run starts at `step`: count the steps before it as spent
  accounted_steps()                 the steps its privacy accounting has counted (0 where it keeps none)

`PlainGradients` is ordinary training (mean token loss, gradient clipping, and the paper's
Gaussian gradient noise when `grad_noise_std` > 0); `fedesm.training.privacy.dpsgd.DPSGD` is formal
DP-SGD (Poisson batches, clipped per-sample gradients, noise). `make_gradients` picks by the
training settings; all privacy randomness comes from the `NoiseSource` it is given (default: a
secret one from OS entropy), never from the training seed.
"""

from __future__ import annotations

from typing import Callable, Optional, Protocol, Sequence

import torch

from fedesm.settings import TrainConfig
from fedesm.training.privacy.dpsgd import DPSGD
from fedesm.training.privacy.noise import GradientNoise
from fedesm.training.privacy.randomness import NoiseSource

TokenLosses = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class GradientMechanism(Protocol):
    def batches(self, sampler): ...

    def backward(self, token_losses: TokenLosses, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor: ...

    def spent(self) -> dict: ...

    def seek(self, step: int) -> None: ...

    def accounted_steps(self) -> int: ...


class PlainGradients:
    """Mean token loss, backward, clip to `grad_clip` (0: off), then optional gradient noise."""

    def __init__(self, params: Sequence[torch.Tensor], grad_clip: float = 0.0, noise: Optional[GradientNoise] = None):
        self.params = list(params)
        self.grad_clip = float(grad_clip)
        self.noise = noise

    def batches(self, sampler):
        return sampler

    def backward(self, token_losses: TokenLosses, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        losses, weights = token_losses(tokens, labels)
        loss = losses.sum() / weights.sum().clamp(min=1e-12)
        loss.backward()
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        if self.noise is not None:
            self.noise.apply(self.params)
        return loss

    def spent(self) -> dict:
        return {}

    def seek(self, step: int) -> None:
        """Nothing to account: plain gradients keep no privacy ledger."""

    def accounted_steps(self) -> int:
        return 0


def make_gradients(config: TrainConfig, model: torch.nn.Module, params: Sequence[torch.Tensor],
                   n_train: int, noise: Optional[NoiseSource] = None) -> GradientMechanism:
    """DP-SGD when `dp_noise_multiplier` > 0, else plain gradients (with the paper's noise if asked);
    privacy noise from `noise` (default: a fresh secret source)."""
    if config.dp_noise_multiplier > 0:
        return DPSGD(model, params, config.dp_noise_multiplier, config.dp_max_grad_norm,
                     sample_rate=config.batch_size / n_train, n_train=n_train, delta=config.dp_delta,
                     source=noise, report_prv=config.dp_report_prv)
    gradient_noise = GradientNoise(config.grad_noise_std, noise) if config.grad_noise_std > 0 else None
    return PlainGradients(params, config.grad_clip, gradient_noise)
