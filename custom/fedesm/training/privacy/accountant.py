"""Privacy spent by DP-SGD, from Opacus' accountants, answering any input at once.

Opacus computes the RDP of the sampled Gaussian mechanism (Mironov et al. 2019) and its (epsilon, delta)
(Balle et al. 2020, Theorem 21); its PRV accountant (Gopi et al. 2021) gives a tighter epsilon for the same
steps, which `RDPAccountant.prv_epsilon` reports beside. Each site accounts for its own data.

What this module adds is the guard, because a site answers a job's numbers: inputs are checked (finite,
in range, at most MAX_STEPS steps), and Opacus' series for a fractional order, which runs until its terms
are small (for ever on a nan, for tens of thousands of terms at q near 1/2 with large noise), is entered
only where it ends within MAX_SERIES_TERMS terms; elsewhere the unsampled Gaussian's RDP order / (2 sigma^2)
stands in, an upper bound (subsampling never adds divergence).
"""

from __future__ import annotations

import math
import warnings
from typing import Optional, Sequence

import numpy as np
from opacus.accountants import PRVAccountant
from opacus.accountants.analysis import rdp as opacus_rdp

from fedesm.errors import FedesmError

DEFAULT_ORDERS = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))  # as Opacus
MAX_SERIES_TERMS = 2_000  # terms of a fractional order's series before the upper bound stands in
MAX_STEPS = 10 ** 12
MIN_NOISE_MULTIPLIER = 1e-6  # below it the RDP is taken as infinite (an upper bound: no guarantee is claimed)
MAX_PRV_GRID = 10 ** 7  # points of the PRV accountant's discretisation (80 MB an array); above it, no PRV answer
_SERIES_END = -30.0  # Opacus stops a fractional order's series at the first term below exp(-30)


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


def _series_ends(q: float, sigma: float, order: float) -> bool:
    """Whether Opacus' series for fractional `order` meets its stopping test within MAX_SERIES_TERMS terms:
    its terms' logs (log|binom(order, i)| + the two tails' weights), all at once, without summing them."""
    from scipy import special

    i = np.arange(MAX_SERIES_TERMS, dtype=np.float64)
    j = order - i
    z0 = sigma ** 2 * math.log(1 / q - 1) + 0.5
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        log_coef = np.log(np.abs(special.binom(order, i)))
        log_s0 = (log_coef + i * math.log(q) + j * math.log1p(-q) + (i * i - i) / (2 * sigma ** 2)
                  + special.log_ndtr(-(i - z0) / sigma))
        log_s1 = (log_coef + j * math.log(q) + i * math.log1p(-q) + (j * j - j) / (2 * sigma ** 2)
                  + special.log_ndtr(-(z0 - j) / sigma))
    return bool(np.any(np.maximum(log_s0, log_s1) < _SERIES_END))


def rdp_sampled_gaussian(q: float, noise_multiplier: float, order: float) -> float:
    """RDP at `order` of one step of the sampled Gaussian mechanism (sampling rate q, noise sigma), by Opacus.
    Non-finite or out-of-range parameters are refused (AccountingError), never iterated on."""
    q = _finite("sample rate", q, 0.0, 1.0)
    noise_multiplier = _finite("noise multiplier", noise_multiplier, 0.0)
    order = _finite("RDP order", order, 1.0, low_open=True)
    if q == 0:
        return 0.0
    if noise_multiplier < MIN_NOISE_MULTIPLIER:  # no meaningful noise: no finite guarantee (and sigma^2 underflows)
        return math.inf
    unsampled = order / (2 * noise_multiplier ** 2)
    if q == 1.0 or (not float(order).is_integer() and not _series_ends(q, noise_multiplier, order)):
        return unsampled
    return float(opacus_rdp.compute_rdp(q=q, noise_multiplier=noise_multiplier, steps=1, orders=[order])[0])


def rdp_to_epsilon(orders: Sequence[float], rdp: Sequence[float], delta: float) -> tuple[float, float]:
    """(epsilon, best order) for target delta (Opacus; Balle et al. 2020, Theorem 21)."""
    delta = _finite("delta", delta, 0.0, 1.0, low_open=True)
    with warnings.catch_warnings(), np.errstate(invalid="ignore"):
        warnings.simplefilter("ignore")  # "optimal order is the largest alpha": the orders are Opacus' own
        eps, order = opacus_rdp.get_privacy_spent(orders=np.asarray(orders, dtype=np.float64),
                                                  rdp=np.asarray(rdp, dtype=np.float64), delta=delta)
    return float(eps), float(order)


def compute_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float,
                    orders: Sequence[float] = DEFAULT_ORDERS) -> float:
    """Epsilon after `steps` steps of DP-SGD with one (sigma, q); 0 before any step."""
    steps = _check_steps(steps)
    delta = _finite("delta", delta, 0.0, 1.0, low_open=True)
    if steps == 0:
        return 0.0
    rdp = [steps * rdp_sampled_gaussian(sample_rate, noise_multiplier, a) for a in orders]
    return rdp_to_epsilon(orders, rdp, delta)[0]


class _BoundedPRV(PRVAccountant):
    """Opacus' PRV accountant, refusing a discretisation grid over MAX_PRV_GRID points before it is made."""

    def _get_domain(self, *args, **kwargs):
        domain = super()._get_domain(*args, **kwargs)
        if domain.size > MAX_PRV_GRID:
            raise AccountingError(f"DP accounting: a PRV grid of {domain.size:.2g} points")
        return domain


class RDPAccountant:
    """Privacy spent by a sequence of DP-SGD steps, each with its own (noise multiplier, sample rate).

    `history` is Opacus' own: [(noise_multiplier, sample_rate, steps)], consecutive equal steps merged."""

    def __init__(self, orders: Sequence[float] = DEFAULT_ORDERS):
        self.orders = tuple(orders)
        self.history: list[tuple[float, float, int]] = []
        self._rdp_cache: dict[tuple[float, float], np.ndarray] = {}

    def step(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        steps = _check_steps(steps)
        if self.steps + steps > MAX_STEPS:
            raise AccountingError(f"DP accounting: more than {MAX_STEPS:.0e} steps")
        noise_multiplier = _finite("noise multiplier", noise_multiplier, 0.0)
        sample_rate = _finite("sample rate", sample_rate, 0.0, 1.0)
        if self.history and self.history[-1][:2] == (noise_multiplier, sample_rate):
            self.history[-1] = (noise_multiplier, sample_rate, self.history[-1][2] + steps)
        else:
            self.history.append((noise_multiplier, sample_rate, steps))

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

    def prv_epsilon(self, delta: float) -> Optional[float]:
        """Opacus' PRV accountant's epsilon for the same steps: tighter than RDP, to within its eps_error (0.01).
        0 before any step; None where it would not answer within bounds (a discretisation over MAX_PRV_GRID
        points, at extreme noise or step counts). The budget never uses it: RDP's is the bound a site enforces."""
        delta = _finite("delta", delta, 0.0, 1.0, low_open=True)
        spent = [(sigma, q, n) for sigma, q, n in self.history if q > 0 and n > 0]
        if not spent:
            return 0.0
        if any(sigma < MIN_NOISE_MULTIPLIER for sigma, _, _ in spent):
            return math.inf
        prv = _BoundedPRV()
        prv.history = list(spent)
        try:
            with warnings.catch_warnings(), np.errstate(all="ignore"):
                warnings.simplefilter("ignore")
                return float(prv.get_epsilon(delta))
        except (AccountingError, MemoryError, ValueError, OverflowError, RuntimeError):
            return None


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
