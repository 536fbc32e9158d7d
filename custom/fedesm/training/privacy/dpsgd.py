"""Formal differential privacy for a site's local training: DP-SGD (Abadi et al. 2016) as DP users expect it.

* batches by Poisson sampling: each training record joins a step's batch independently with
  probability q = batch_size / n_train (the sampled Gaussian mechanism the accountant analyses);
* per-sample gradients of the trainable parameters only (LoRA factors + head; the frozen backbone
  needs none), each clipped to L2 norm <= C over all of them together;
* Gaussian noise N(0, (sigma * C)^2) added to the sum of clipped gradients, divided by the expected
  batch size q * n_train, then the usual optimizer step.

Per-sample gradients come from one forward and backward pass over the whole batch: every trainable
parameter sits in an `nn.Linear` (PEFT's lora_A / lora_B and the head), whose per-sample weight
gradient is sum_t grad_out[t]^T x[t] over that sample's tokens. Hooks capture x and grad_out; the
batch axis is 1 inside fair-esm's encoder layers, which run in (T, B, C) layout, and 0 in the head;
on the packed path (the default: padding dropped) every layer runs on (N, C) real tokens and each
sample's gradient sums its own rows (the model's `last_packing` says which).
The (epsilon, delta) spent comes from `fedesm.training.privacy.accountant`. The noise and the
Poisson draws come from a `NoiseSource` (secret, from OS entropy, unless the site's own config asks
for reproducible noise to debug): a job's seed decides neither.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from fedesm.errors import FedesmError
from fedesm.keys import batch_axis
from fedesm.training.privacy.accountant import RDPAccountant
from fedesm.training.privacy.randomness import NoiseSource


class PoissonBatchSampler:
    """Each record joins a batch independently with probability `sample_rate`; same `next_batch` as
    `fedesm.data.batching.RandomBatchSampler`, whose tokenizer and random crops it reuses. Who joins
    a batch is drawn from `source` (secret: the analysis assumes nobody knows it). An empty draw gives
    (0, 2)-shaped tensors: the step then adds noise only, as the analysis assumes."""

    def __init__(self, base, sample_rate: float, source: Optional[NoiseSource] = None):
        if not 0 < sample_rate <= 1:
            raise FedesmError(f"DP-SGD sample rate must be in (0, 1], got {sample_rate:.4g} "
                              "(batch_size larger than the site's training set?)")
        self.base = base
        self.records = base.records
        self.sample_rate = float(sample_rate)
        self.source = source if source is not None else NoiseSource.secret()  # the base keeps its seeded crops

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        idx = np.flatnonzero(self.source.uniform(len(self.records)) < self.sample_rate)
        if len(idx) == 0:
            tok = self.base.tokenizer
            return (torch.full((0, 2), tok.padding_idx, dtype=torch.long),
                    torch.full((0, 2), -100, dtype=torch.long))
        return self.base.tokenizer.collate([self.base.crop(self.records[i]) for i in idx])


# ---------------------------------------------------------------------------------------------
# Per-sample gradients of the trainable nn.Linear layers
# ---------------------------------------------------------------------------------------------


class PerSampleGradients:
    """Hooks on every trainable `nn.Linear` that yield each sample's gradient after one backward pass.

    Refuses a model whose trainable parameters are not all in such layers, since it could not bound
    their per-sample influence.
    """

    def __init__(self, model: nn.Module, params: Sequence[torch.Tensor]):
        self.layers: list[tuple[str, nn.Linear]] = []
        covered: set[int] = set()
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and any(p.requires_grad for p in module.parameters(recurse=False)):
                self.layers.append((name, module))
                covered.update(id(p) for p in module.parameters(recurse=False) if p.requires_grad)
        missing = [p for p in params if id(p) not in covered]
        if missing:
            raise FedesmError(f"DP-SGD: {len(missing)} trainable parameter(s) are not in nn.Linear layers; "
                              "per-sample clipping covers LoRA factors and the linear head only")
        self._model = model
        self._acts: dict[int, torch.Tensor] = {}
        self._grads: dict[int, torch.Tensor] = {}
        self._handles = []
        self.enabled = False
        for i, (name, module) in enumerate(self.layers):
            self._handles.append(module.register_forward_hook(self._make_hook(i)))

    def _make_hook(self, i: int):
        def hook(module, inputs, output):
            if not self.enabled or not torch.is_grad_enabled():
                return
            if i in self._acts:
                raise RuntimeError(f"DP-SGD: {self.layers[i][0]} ran twice in one forward pass")
            self._acts[i] = inputs[0].detach()

            def grad_hook(g):
                self._grads[i] = g.detach()

            output.register_hook(grad_hook)

        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def compute(self, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """[(parameter, per-sample gradients of shape (B, *parameter.shape))] after a backward pass."""
        out = []
        packing = self._packing()
        for i, (name, module) in enumerate(self.layers):
            if i not in self._grads:  # layer unused in this pass: zero gradient for every sample
                for p in module.parameters(recurse=False):
                    if p.requires_grad:
                        out.append((p, torch.zeros((batch_size, *p.shape), device=p.device, dtype=torch.float32)))
                continue
            x, g = self._acts[i], self._grads[i]
            if x.dim() == 2 and packing is not None:  # packed (N, C) tokens: sum each sequence's own rows
                if len(packing.lengths) != batch_size or x.shape[0] != packing.n_tokens:
                    raise RuntimeError(f"DP-SGD: {name} input {tuple(x.shape)} is not the packed batch of "
                                       f"{batch_size} sequences")
                out.extend(_packed_per_sample(module, x.float(), g.float(), packing))
                continue
            axis = batch_axis(name)
            if x.shape[axis] != batch_size:
                raise RuntimeError(f"DP-SGD: {name} input {tuple(x.shape)} has no batch axis {axis} of size "
                                   f"{batch_size}")
            x = x.movedim(axis, 0).float().reshape(batch_size, -1, x.shape[-1])
            g = g.movedim(axis, 0).float().reshape(batch_size, -1, g.shape[-1])
            if module.weight.requires_grad:
                out.append((module.weight, torch.einsum("bto,bti->boi", g, x)))
            if module.bias is not None and module.bias.requires_grad:
                out.append((module.bias, g.sum(1)))
        self._acts.clear()
        self._grads.clear()
        return out


    def _packing(self):
        """The last packed forward's layout (`fedesm.model.attention.Packing`), or None after a padded one."""
        return next((m.last_packing for m in self._model.modules() if hasattr(m, "last_packing")), None)


def _packed_per_sample(module: nn.Linear, x: torch.Tensor, g: torch.Tensor, packing
                       ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-sample gradients of a linear layer run on packed tokens: sequence b's rows are
    offsets[b]:offsets[b + 1], its weight gradient their sum of outer products g^T x, as in the padded layout."""
    bounds = packing.bounds
    out = []
    if module.weight.requires_grad:
        out.append((module.weight, torch.stack([g[s:e].T @ x[s:e] for s, e in bounds])))
    if module.bias is not None and module.bias.requires_grad:
        out.append((module.bias, torch.zeros((len(bounds), g.shape[1]), dtype=g.dtype, device=g.device)
                     .index_add_(0, packing.segments, g)))
    return out


def clip_and_sum(per_sample: list[tuple[torch.Tensor, torch.Tensor]], max_grad_norm: float
                 ) -> tuple[dict[int, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Clip each sample's gradient (over all parameters together) to `max_grad_norm` and sum over samples.

    Returns ({id(param): summed clipped gradient}, per-sample norms before, per-sample norms after).
    """
    norms = torch.sqrt(sum(gs.flatten(1).pow(2).sum(1) for _, gs in per_sample))
    factor = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
    summed = {id(p): torch.einsum("b,b...->...", factor, gs) for p, gs in per_sample}
    return summed, norms, norms * factor


class DPSGD:
    """DP-SGD as a gradient mechanism of `fedesm.training.trainer.LocalTrainer` (see `fedesm.training.gradients`):
    Poisson batches (`batches`), clipped per-sample gradients + Gaussian noise (`backward`), and the
    privacy spent so far (`spent`: epsilon for `delta`, steps, for each round's statistics; with `report_prv`
    the PRV accountant's epsilon beside the RDP one; `seek` for a resume).
    `source` gives the noise and the sampling (two independent streams of it); default: a secret one."""

    def __init__(self, model: nn.Module, params: Sequence[torch.Tensor], noise_multiplier: float,
                 max_grad_norm: float, sample_rate: float, n_train: int, delta: float = 1e-5,
                 source: Optional[NoiseSource] = None, report_prv: bool = False):
        if noise_multiplier <= 0:
            raise FedesmError("DP-SGD noise multiplier must be > 0")
        if max_grad_norm <= 0:
            raise FedesmError("DP-SGD max grad norm (clipping bound C) must be > 0")
        if not 0 < delta < 1:
            raise FedesmError(f"DP delta must be in (0, 1), got {delta}")
        self.noise_multiplier = float(noise_multiplier)
        self.max_grad_norm = float(max_grad_norm)
        self.sample_rate = float(sample_rate)
        self.expected_batch = sample_rate * n_train
        self.delta = float(delta)
        self.report_prv = bool(report_prv)
        self.source = source if source is not None else NoiseSource.secret()
        self.params = list(params)
        self.grads = PerSampleGradients(model, self.params)
        self.accountant = RDPAccountant()
        self.noise = self.source.stream("dpsgd-noise")
        self.last_norms: Optional[torch.Tensor] = None

    def batches(self, sampler) -> PoissonBatchSampler:
        """Poisson batches of expected size batch_size, with the base sampler's tokenizer and crops."""
        return PoissonBatchSampler(sampler, self.sample_rate, self.source.stream("poisson"))

    @staticmethod
    def per_sample_losses(token_losses, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Each sequence's own weighted mean token loss, shape (B,); `token_losses(tokens, labels)` gives
        per-token losses and weights (B, T)."""
        losses, w = token_losses(tokens, labels)
        return losses.sum(1) / w.sum(1).clamp(min=1e-12)

    def backward(self, token_losses, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Set each trainable parameter's .grad to (sum of clipped per-sample grads + noise) / (q n)."""
        b = tokens.shape[0]
        summed: dict[int, torch.Tensor] = {}
        loss = torch.tensor(float("nan"))
        if b:
            self.grads.enabled = True
            try:
                per_sample = self.per_sample_losses(token_losses, tokens, labels)
                per_sample.sum().backward()
            finally:
                self.grads.enabled = False
            summed, _, self.last_norms = clip_and_sum(self.grads.compute(b), self.max_grad_norm)
            loss = per_sample.detach().mean()
        std = self.noise_multiplier * self.max_grad_norm
        for p, noise in zip(self.params, self.noise.normal_like(self.params, std)):
            g = summed[id(p)] + noise if id(p) in summed else noise
            p.grad = (g / self.expected_batch).to(p.dtype)
        self.accountant.step(self.noise_multiplier, self.sample_rate)
        return loss

    def epsilon(self) -> float:
        return self.accountant.get_epsilon(self.delta)

    def spent(self) -> dict:
        spent = {"epsilon": self.epsilon(), "dp_delta": self.delta, "dp_steps": self.accountant.steps}
        if self.report_prv:
            prv = self.accountant.prv_epsilon(self.delta)
            if prv is not None:  # None: PRV cannot answer these numbers (the RDP epsilon still stands)
                spent["epsilon_prv"] = prv
        return spent

    def seek(self, step: int) -> None:
        """A resumed job: the rounds before `step` spent privacy on this site's data too; count them as if this
        site took part in every one (an upper bound), so its epsilon budget cannot restart at zero."""
        if self.accountant.steps < step:
            self.accountant.step(self.noise_multiplier, self.sample_rate, steps=step - self.accountant.steps)

    def accounted_steps(self) -> int:
        return self.accountant.steps
