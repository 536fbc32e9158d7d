"""Formal differential privacy for a site's local training: DP-SGD with an RDP accountant.

The paper's mode (`fedesm.privacy.GradientNoise`) adds a fixed noise scale to the batch gradient;
without a bound on each sample's influence it gives no (epsilon, delta) guarantee. DP-SGD (Abadi et
al. 2016) as DP users expect it:

* batches by Poisson sampling: each training record joins a step's batch independently with
  probability q = batch_size / n_train (the sampled Gaussian mechanism the accountant analyses);
* per-sample gradients of the trainable parameters only (LoRA factors + head; the frozen backbone
  needs none), each clipped to L2 norm <= C over all of them together;
* Gaussian noise N(0, (sigma * C)^2) added to the sum of clipped gradients, divided by the expected
  batch size q * n_train, then the usual optimizer step.

Per-sample gradients come from one forward and backward pass over the whole batch: every trainable
parameter sits in an `nn.Linear` (PEFT's lora_A / lora_B and the head), whose per-sample weight
gradient is sum_t grad_out[t]^T x[t] over that sample's tokens. Hooks capture x and grad_out; the
batch axis is 1 inside fair-esm's encoder layers, which run in (T, B, C) layout, and 0 in the head.

Privacy spent: `RDPAccountant` (Renyi DP of the sampled Gaussian mechanism, Mironov et al. 2019, and
the RDP -> (epsilon, delta) conversion of Balle et al. 2020) -- the same analysis as Opacus'
`RDPAccountant`, with which the tests check it agrees. Each site accounts for its own data.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from fedesm.errors import FedesmError

DEFAULT_ORDERS = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))  # as Opacus


# ---------------------------------------------------------------------------------------------
# RDP accountant for the sampled Gaussian mechanism
# ---------------------------------------------------------------------------------------------


def _log_add(a: float, b: float) -> float:
    lo, hi = min(a, b), max(a, b)
    if lo == -math.inf:
        return hi
    return math.log1p(math.exp(lo - hi)) + hi


def _log_sub(a: float, b: float) -> float:
    """log(exp(a) - exp(b)) for a >= b."""
    if a < b:
        raise ValueError("log-space subtraction would be negative")
    if b == -math.inf:
        return a
    if a == b:
        return -math.inf
    try:
        return math.log(math.expm1(a - b)) + b
    except OverflowError:
        return a


def _log_erfc(x: float) -> float:
    from scipy import special

    return math.log(2) + float(special.log_ndtr(-x * math.sqrt(2)))


def _log_a_int(q: float, sigma: float, alpha: int) -> float:
    log_a = -math.inf
    for i in range(alpha + 1):
        log_binom = math.lgamma(alpha + 1) - math.lgamma(i + 1) - math.lgamma(alpha - i + 1)
        s = log_binom + i * math.log(q) + (alpha - i) * math.log(1 - q) + (i * i - i) / (2 * sigma ** 2)
        log_a = _log_add(log_a, s)
    return log_a


def _log_a_frac(q: float, sigma: float, alpha: float) -> float:
    from scipy import special

    log_a0 = log_a1 = -math.inf
    z0 = sigma ** 2 * math.log(1 / q - 1) + 0.5
    i = 0
    while True:
        coef = float(special.binom(alpha, i))
        log_coef = math.log(abs(coef))
        j = alpha - i
        log_t0 = log_coef + i * math.log(q) + j * math.log(1 - q)
        log_t1 = log_coef + j * math.log(q) + i * math.log(1 - q)
        log_e0 = math.log(0.5) + _log_erfc((i - z0) / (math.sqrt(2) * sigma))
        log_e1 = math.log(0.5) + _log_erfc((z0 - j) / (math.sqrt(2) * sigma))
        log_s0 = log_t0 + (i * i - i) / (2 * sigma ** 2) + log_e0
        log_s1 = log_t1 + (j * j - j) / (2 * sigma ** 2) + log_e1
        if coef > 0:
            log_a0, log_a1 = _log_add(log_a0, log_s0), _log_add(log_a1, log_s1)
        else:
            log_a0, log_a1 = _log_sub(log_a0, log_s0), _log_sub(log_a1, log_s1)
        i += 1
        if max(log_s0, log_s1) < -30:
            return _log_add(log_a0, log_a1)


def rdp_sampled_gaussian(q: float, noise_multiplier: float, order: float) -> float:
    """RDP at `order` of one step of the sampled Gaussian mechanism (sampling rate q, noise sigma)."""
    if q == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    if q == 1.0:
        return order / (2 * noise_multiplier ** 2)
    if math.isinf(order):
        return math.inf
    if float(order).is_integer():
        log_a = _log_a_int(q, noise_multiplier, int(order))
    else:
        log_a = _log_a_frac(q, noise_multiplier, order)
    return log_a / (order - 1)


def rdp_to_epsilon(orders: Sequence[float], rdp: Sequence[float], delta: float) -> tuple[float, float]:
    """(epsilon, best order) for target delta (Balle et al. 2020, Theorem 21)."""
    orders_v = np.asarray(orders, dtype=np.float64)
    rdp_v = np.asarray(rdp, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        eps = rdp_v - (math.log(delta) + np.log(orders_v)) / (orders_v - 1) + np.log((orders_v - 1) / orders_v)
    if np.isnan(eps).all():
        return math.inf, math.nan
    best = int(np.nanargmin(eps))
    return float(eps[best]), float(orders_v[best])


def compute_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float,
                    orders: Sequence[float] = DEFAULT_ORDERS) -> float:
    """Epsilon after `steps` steps of DP-SGD with one (sigma, q); 0 before any step."""
    if steps <= 0:
        return 0.0
    rdp = [steps * rdp_sampled_gaussian(sample_rate, noise_multiplier, a) for a in orders]
    return rdp_to_epsilon(orders, rdp, delta)[0]


class RDPAccountant:
    """Privacy spent by a sequence of DP-SGD steps, each with its own (noise multiplier, sample rate)."""

    def __init__(self, orders: Sequence[float] = DEFAULT_ORDERS):
        self.orders = tuple(orders)
        self.history: list[list] = []  # [noise_multiplier, sample_rate, steps]
        self._rdp_cache: dict[tuple[float, float], np.ndarray] = {}

    def step(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        if self.history and self.history[-1][:2] == [noise_multiplier, sample_rate]:
            self.history[-1][2] += steps
        else:
            self.history.append([noise_multiplier, sample_rate, steps])

    @property
    def steps(self) -> int:
        return sum(h[2] for h in self.history)

    def _rdp_per_step(self, sigma: float, q: float) -> np.ndarray:
        key = (sigma, q)
        if key not in self._rdp_cache:
            self._rdp_cache[key] = np.array([rdp_sampled_gaussian(q, sigma, a) for a in self.orders])
        return self._rdp_cache[key]

    def get_privacy_spent(self, delta: float) -> tuple[float, float]:
        """(epsilon, best RDP order); (0, nan) before any step."""
        if not self.history:
            return 0.0, math.nan
        rdp = sum(n * self._rdp_per_step(sigma, q) for sigma, q, n in self.history)
        return rdp_to_epsilon(self.orders, rdp, delta)

    def get_epsilon(self, delta: float) -> float:
        return self.get_privacy_spent(delta)[0]


def noise_multiplier_for(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                         tolerance: float = 0.01) -> float:
    """The smallest noise multiplier (to `tolerance`) whose epsilon after `steps` is <= target (bisection)."""
    if target_epsilon <= 0:
        raise FedesmError("target epsilon must be > 0")
    lo, hi = 0.0, 1.0
    while compute_epsilon(hi, sample_rate, steps, delta) > target_epsilon:
        lo, hi = hi, 2 * hi
        if hi > 1e4:
            raise FedesmError(f"epsilon {target_epsilon} is out of reach for q={sample_rate}, {steps} steps")
    while hi - lo > tolerance:
        mid = (lo + hi) / 2
        if compute_epsilon(mid, sample_rate, steps, delta) > target_epsilon:
            lo = mid
        else:
            hi = mid
    return hi


# ---------------------------------------------------------------------------------------------
# Poisson batches
# ---------------------------------------------------------------------------------------------


class PoissonBatchSampler:
    """Each record joins a batch independently with probability `sample_rate`; same `next_batch` as
    `fedesm.data.batching.RandomBatchSampler`, whose tokenizer and random crops it reuses. An empty
    draw gives (0, 2)-shaped tensors: the step then adds noise only, as the analysis assumes."""

    def __init__(self, base, sample_rate: float, seed: int = 0):
        if not 0 < sample_rate <= 1:
            raise FedesmError(f"DP-SGD sample rate must be in (0, 1], got {sample_rate:.4g} "
                              "(batch_size larger than the site's training set?)")
        self.base = base
        self.records = base.records
        self.sample_rate = float(sample_rate)
        self.rng = np.random.default_rng(seed + 7919)  # its own stream; the base keeps its crops

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        idx = np.flatnonzero(self.rng.random(len(self.records)) < self.sample_rate)
        if len(idx) == 0:
            tok = self.base.tokenizer
            return (torch.full((0, 2), tok.padding_idx, dtype=torch.long),
                    torch.full((0, 2), -100, dtype=torch.long))
        return self.base.tokenizer.collate([self.base.crop(self.records[i]) for i in idx])


# ---------------------------------------------------------------------------------------------
# Per-sample gradients of the trainable nn.Linear layers
# ---------------------------------------------------------------------------------------------


def _batch_axis(module_name: str) -> int:
    """fair-esm's encoder layers run in (T, B, C) layout; everything else (the head) in (B, T, C)."""
    return 1 if ".layers." in f".{module_name}" else 0


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
        for i, (name, module) in enumerate(self.layers):
            if i not in self._grads:  # layer unused in this pass: zero gradient for every sample
                for p in module.parameters(recurse=False):
                    if p.requires_grad:
                        out.append((p, torch.zeros((batch_size, *p.shape), device=p.device, dtype=torch.float32)))
                continue
            axis = _batch_axis(name)
            x, g = self._acts[i], self._grads[i]
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


def clip_and_sum(per_sample: list[tuple[torch.Tensor, torch.Tensor]], max_grad_norm: float
                 ) -> tuple[dict[int, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Clip each sample's gradient (over all parameters together) to `max_grad_norm` and sum over samples.

    Returns ({id(param): summed clipped gradient}, per-sample norms before, per-sample norms after).
    """
    norms = torch.sqrt(sum(gs.flatten(1).pow(2).sum(1) for _, gs in per_sample))
    factor = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
    summed = {id(p): torch.einsum("b,b...->...", factor, gs) for p, gs in per_sample}
    return summed, norms, norms * factor


# ---------------------------------------------------------------------------------------------
# DP-SGD for the local trainer
# ---------------------------------------------------------------------------------------------


class DPSGD:
    """DP-SGD for one `fedesm.train.LocalTrainer`: Poisson batches, per-sample clipping, Gaussian noise.

    The trainer calls `backward(trainer, tokens, labels)` in place of its own loss/backward/clip
    (`per_sample = True` tells it so); `apply` is then a no-op. `spent()` gives what the trainer puts
    in each round's statistics: epsilon for `delta`, the steps so far, sigma, C and q.
    """

    per_sample = True

    def __init__(self, model: nn.Module, params: Sequence[torch.Tensor], noise_multiplier: float,
                 max_grad_norm: float, sample_rate: float, n_train: int, delta: float = 1e-5, seed: int = 0):
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
        self.params = list(params)
        self.grads = PerSampleGradients(model, self.params)
        self.accountant = RDPAccountant()
        self.generator = torch.Generator().manual_seed(seed + 104729)
        self.last_norms: Optional[torch.Tensor] = None

    @classmethod
    def attach(cls, trainer, train_records) -> "DPSGD":
        """DP-SGD for `trainer` (config dp_noise_multiplier > 0): swaps in Poisson batches of expected
        size batch_size, and refuses the paper's gradient-noise mode at the same time."""
        cfg = trainer.config
        if cfg.grad_noise_std:
            raise FedesmError("choose one privacy mode: grad_noise_std (paper) or dp_noise_multiplier (DP-SGD)")
        n = len(train_records)
        q = cfg.batch_size / n
        dp = cls(trainer.model, trainer.params, cfg.dp_noise_multiplier, cfg.dp_max_grad_norm, q, n,
                 delta=cfg.dp_delta, seed=cfg.seed)
        trainer.sampler = PoissonBatchSampler(trainer.sampler, q, seed=cfg.seed)
        return dp

    def per_sample_losses(self, trainer, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Each sequence's own (class-weighted) mean token loss, shape (B,)."""
        with torch.autocast(trainer.device.type, dtype=trainer.autocast_dtype,
                            enabled=trainer.autocast_dtype is not None):
            logits = trainer.model(tokens)
        from fedesm.train import token_losses

        losses, w = token_losses(logits, labels, trainer.loss_weight, trainer.config.focal_gamma)
        return losses.sum(1) / w.sum(1).clamp(min=1e-12)

    def backward(self, trainer, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Set each trainable parameter's .grad to (sum of clipped per-sample grads + noise) / (q n)."""
        trainer.optimizer.zero_grad(set_to_none=True)
        b = tokens.shape[0]
        summed: dict[int, torch.Tensor] = {}
        loss = torch.tensor(float("nan"))
        if b:
            self.grads.enabled = True
            try:
                losses = self.per_sample_losses(trainer, tokens, labels)
                losses.sum().backward()
            finally:
                self.grads.enabled = False
            summed, _, self.last_norms = clip_and_sum(self.grads.compute(b), self.max_grad_norm)
            loss = losses.detach().mean()
        std = self.noise_multiplier * self.max_grad_norm
        for p in self.params:
            noise = torch.randn(p.shape, generator=self.generator, dtype=torch.float32).to(p.device) * std
            g = summed[id(p)] + noise if id(p) in summed else noise
            p.grad = (g / self.expected_batch).to(p.dtype)
        self.accountant.step(self.noise_multiplier, self.sample_rate)
        return loss

    def apply(self, parameters) -> None:
        """Noise is already in the gradient (see `backward`)."""

    def epsilon(self) -> float:
        return self.accountant.get_epsilon(self.delta)

    def spent(self) -> dict:
        return {"epsilon": self.epsilon(), "dp_delta": self.delta, "dp_steps": self.accountant.steps}
