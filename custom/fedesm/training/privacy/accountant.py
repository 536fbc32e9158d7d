"""Privacy spent by DP-SGD: Renyi DP of the sampled Gaussian mechanism and its (epsilon, delta).

`RDPAccountant` follows Mironov et al. 2019 for the RDP of the sampled Gaussian mechanism and
Balle et al. 2020 (Theorem 21) for the RDP -> (epsilon, delta) conversion: the same analysis as
Opacus' `RDPAccountant`, with which the tests check it agrees. Each site accounts for its own data.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

from fedesm.errors import FedesmError

DEFAULT_ORDERS = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))  # as Opacus
# Bounds on the work one answer may take, so that any input returns or is refused at once (a nan noise multiplier
# used to keep the fractional-order series below running for ever): terms of that series per order, and steps.
# A series that has not converged within MAX_SERIES_TERMS (large noise at q near 1/2) is replaced by the RDP of
# the unsampled Gaussian mechanism, order / (2 sigma^2): an upper bound (subsampling never adds divergence).
MAX_SERIES_TERMS = 2_000
MAX_STEPS = 10 ** 12
MIN_NOISE_MULTIPLIER = 1e-6  # below it the RDP is taken as infinite (an upper bound: no guarantee is claimed)


class AccountingError(FedesmError):
    """Parameters the RDP analysis cannot answer for (non-finite, out of range, or a series that would not end)."""


def _finite(name: str, value, low: float, high: float = math.inf, low_open: bool = False) -> float:
    """`value` as a float in [low, high] (low excluded when `low_open`), else AccountingError in one line."""
    try:
        v = float(value)
    except (TypeError, ValueError, OverflowError):
        raise AccountingError(f"DP accounting: {name} {str(value)[:40]!r} is not a number") from None
    if not math.isfinite(v) or v < low or (low_open and v == low) or v > high:
        side = "(" if low_open else "["
        raise AccountingError(f"DP accounting: {name} {value!r} is not a finite number in {side}{low:g}, {high:g}]")
    return v


def _check_steps(steps) -> int:
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not 0 <= steps <= MAX_STEPS:
        raise AccountingError(f"DP accounting: steps {str(steps)[:40]!r} is not a count in [0, {MAX_STEPS:.0e}]")
    return int(steps)


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


def _log_a_frac(q: float, sigma: float, alpha: float) -> Optional[float]:
    from scipy import special

    log_a0 = log_a1 = -math.inf
    z0 = sigma ** 2 * math.log(1 / q - 1) + 0.5
    for i in range(MAX_SERIES_TERMS):
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
        if max(log_s0, log_s1) < -30:
            return _log_add(log_a0, log_a1)
    return None  # not converged within the bound: the caller falls back to an upper bound


def rdp_sampled_gaussian(q: float, noise_multiplier: float, order: float) -> float:
    """RDP at `order` of one step of the sampled Gaussian mechanism (sampling rate q, noise sigma).
    Non-finite or out-of-range parameters are refused (AccountingError), never iterated on."""
    q = _finite("sample rate", q, 0.0, 1.0)
    noise_multiplier = _finite("noise multiplier", noise_multiplier, 0.0)
    order = _finite("RDP order", order, 1.0, low_open=True)
    if q == 0:
        return 0.0
    if noise_multiplier < MIN_NOISE_MULTIPLIER:  # no meaningful noise: no finite guarantee (and sigma^2 underflows)
        return math.inf
    if q == 1.0:
        return order / (2 * noise_multiplier ** 2)
    if float(order).is_integer():
        log_a = _log_a_int(q, noise_multiplier, int(order))
    else:
        log_a = _log_a_frac(q, noise_multiplier, order)
        if log_a is None:
            return order / (2 * noise_multiplier ** 2)
    return log_a / (order - 1)


def rdp_to_epsilon(orders: Sequence[float], rdp: Sequence[float], delta: float) -> tuple[float, float]:
    """(epsilon, best order) for target delta (Balle et al. 2020, Theorem 21)."""
    delta = _finite("delta", delta, 0.0, 1.0, low_open=True)
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
    steps = _check_steps(steps)
    delta = _finite("delta", delta, 0.0, 1.0, low_open=True)
    if steps == 0:
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
        steps = _check_steps(steps)
        if self.steps + steps > MAX_STEPS:
            raise AccountingError(f"DP accounting: more than {MAX_STEPS:.0e} steps")
        noise_multiplier = _finite("noise multiplier", noise_multiplier, 0.0)
        sample_rate = _finite("sample rate", sample_rate, 0.0, 1.0)
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
    target_epsilon = _finite("target epsilon", target_epsilon, 0.0, low_open=True)
    tolerance = _finite("tolerance", tolerance, 0.0, low_open=True)
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
