"""Privacy spent by DP-SGD: Renyi DP of the sampled Gaussian mechanism and its (epsilon, delta).

`RDPAccountant` follows Mironov et al. 2019 for the RDP of the sampled Gaussian mechanism and
Balle et al. 2020 (Theorem 21) for the RDP -> (epsilon, delta) conversion: the same analysis as
Opacus' `RDPAccountant`, with which the tests check it agrees. Each site accounts for its own data.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from fedesm.errors import FedesmError

DEFAULT_ORDERS = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))  # as Opacus


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
