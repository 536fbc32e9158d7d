"""FRA-LoRA from two sums of per-site terms: a randomized range finder over the weighted sum of products.

FRA-LoRA needs only ``M = sum_k w_k B_k A_k`` of each adapted matrix. With ``Omega`` a d_in x s Gaussian
test matrix every party draws from the round's seed::

    pass 1:  Y = sum_k w_k B_k (A_k Omega)        (d_out x s; each site sends its term)
    server:  Q = orth(Y)                          (d_out x s, sent back to the sites)
    pass 2:  Z = sum_k w_k (Q^T B_k) A_k          (s x d_in; each site sends its term)
    server:  best rank-r factors of Q Z           (FRA's own re-factoring, ``aggregation._refactor``)

When s >= rank(M) (at most the sites' summed ranks, plus what the server adds itself: the fra-ef
residual, the global pair of a server_lr step) the range of Y is the range of M almost surely, so
``Q Z = Q Q^T M = M`` up to round-off and the result is FRA-LoRA's, sign convention included. Each
sum is a plain sum, so it can be aggregated under masks (``fedesm.secure.masking``); the server never
needs a single site's factors. ``OVERSAMPLE`` extra columns keep Q well conditioned when the sites'
terms are nearly dependent. The maths runs in float64 whatever the factors' dtype: the terms are
fixed-point encoded anyway, and the width s is small.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from fedesm.aggregation import AggregationState, _refactor, _store_residual, _to_f64
from fedesm.errors import FedesmError
from fedesm.keys import lora_pairs

# Columns beyond the summed rank (Halko, Martinsson & Tropp 2011 suggest 5-10): the range is exact
# already at s = rank(M); the extra columns only guard the orthonormalisation against near-dependence.
OVERSAMPLE = 8


def sketch_width(total_rank: int, d_in: int, d_out: int, oversample: int = OVERSAMPLE) -> int:
    """Columns of the test matrix: the summed rank plus oversampling, never more than the matrix has
    (at min(d_in, d_out) the range finder is exact whatever the ranks)."""
    if total_rank < 1:
        raise FedesmError(f"secure aggregation: summed LoRA rank must be >= 1, got {total_rank}")
    return int(min(d_in, d_out, total_rank + oversample))


def gaussian_test_matrix(seed: int, name: str, d_in: int, width: int) -> np.ndarray:
    """The pair's Gaussian test matrix Omega (d_in x width): a function of the round's seed and the pair's
    name only, so every site and the server draw the same one without sending it."""
    words = np.frombuffer(hashlib.sha256(name.encode()).digest(), dtype="<u4")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFFFFFFFFFF, *words.tolist()]))
    return rng.standard_normal((d_in, width))


def range_term(a: Any, b: Any, omega: np.ndarray, weight: float) -> np.ndarray:
    """One site's pass-1 term ``w B (A Omega)`` (d_out x s); never forms B A."""
    return weight * (_to_f64(b) @ (_to_f64(a) @ omega))


def core_term(a: Any, b: Any, q: np.ndarray, weight: float) -> np.ndarray:
    """One site's pass-2 term ``w (Q^T B) A`` (s x d_in)."""
    return weight * ((q.T @ _to_f64(b)) @ _to_f64(a))


def orthonormal_basis(y: np.ndarray) -> np.ndarray:
    """Q with orthonormal columns and range(Q) containing range(Y) (Householder QR; a rank-deficient Y
    still gives orthonormal columns, the extra ones harmless)."""
    return torch.linalg.qr(torch.from_numpy(np.asarray(y, dtype=np.float64)), mode="reduced")[0].numpy()


def refactor(q: np.ndarray, z: np.ndarray, rank: int, *, tail: bool = False):
    """FRA-LoRA's best rank-``rank`` factors ``(A, B)`` of ``Q Z`` (and the dropped :class:`Tail` with
    ``tail=True``): ``_refactor`` with Z as the stacked A and Q as the stacked B, so the split of the
    singular values and the sign convention are FRA's own. Batched like ``_refactor`` (leading dims)."""
    zt, qt = torch.from_numpy(np.ascontiguousarray(z)), torch.from_numpy(np.ascontiguousarray(q))
    return _refactor(zt, qt, torch.ones(zt.shape[-2], dtype=torch.float64), int(rank), tail=tail)


# --------------------------------------------------------------------------------------------
# state-dict level: what a site computes for each pass, what the server does between and after
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SketchPlan:
    """What every party knows before a round's first pass: the seed of the test matrices and each LoRA
    pair's sketch width (pair name -> s). Both are public; neither depends on a site's numbers."""

    seed: int
    widths: Mapping[str, int]

    @classmethod
    def for_model(cls, seed: int, global_state: Mapping[str, Any], total_rank: int,
                  oversample: int = OVERSAMPLE) -> "SketchPlan":
        """A plan for the pairs of ``global_state``, ``total_rank`` being every term's rank summed (the sites'
        ranks plus what the server adds: residual, global pair)."""
        widths = {}
        for name, (a_key, b_key) in lora_pairs(list(global_state)).items():
            d_in, d_out = np.shape(global_state[a_key])[1], np.shape(global_state[b_key])[0]
            widths[name] = sketch_width(total_rank, d_in, d_out, oversample)
        return cls(int(seed), widths)

    def omega(self, name: str, d_in: int) -> np.ndarray:
        return gaussian_test_matrix(self.seed, name, d_in, self.widths[name])


def _pairs(state: Mapping[str, Any], plan: SketchPlan) -> dict[str, tuple[str, str]]:
    pairs = lora_pairs(list(state))
    if set(pairs) != set(plan.widths):
        raise FedesmError(f"secure aggregation: the site's LoRA pairs differ from the round's plan "
                          f"(missing {sorted(set(plan.widths) - set(pairs))[:3]}, "
                          f"unexpected {sorted(set(pairs) - set(plan.widths))[:3]})")
    return pairs


def site_pass1(state: Mapping[str, Any], weight: float, plan: SketchPlan) -> dict[str, np.ndarray]:
    """A site's pass-1 terms: ``w B (A Omega)`` for every pair, and ``w x`` for every other tensor (the head
    is a plain weighted sum, sent once)."""
    pairs = _pairs(state, plan)
    out: dict[str, np.ndarray] = {}
    for name, (a_key, b_key) in sorted(pairs.items()):  # sorted: the order every party flattens in
        out[name] = range_term(state[a_key], state[b_key], plan.omega(name, np.shape(state[a_key])[1]), weight)
    lora_keys = {k for pair in pairs.values() for k in pair}
    for k in sorted(state):
        if k not in lora_keys:
            out[k] = weight * _to_f64(state[k])
    return out


def site_pass2(state: Mapping[str, Any], weight: float, bases: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A site's pass-2 terms ``w (Q^T B) A`` for every pair, with the bases the server sent."""
    pairs = lora_pairs(list(state))
    if set(pairs) != set(bases):
        raise FedesmError("secure aggregation: the server's bases do not name this site's LoRA pairs")
    return {name: core_term(state[a], state[b], bases[name], weight) for name, (a, b) in sorted(pairs.items())}


@dataclass
class ServerSketch:
    """The server's side of one secure FRA round, between the decoded sums.

    ``extras[pair]`` lists terms the server adds in the clear, ``(A, B, weight)``: the fra-ef residual
    (weight 1), the global pair of a ``server_lr`` step (weight 1 - server_lr). ``scale`` multiplies the
    sites' summed terms (server_lr; the sites send ``w_k`` terms with weights summing to 1).
    """

    plan: SketchPlan
    extras: dict[str, list[tuple[Any, Any, float]]] = field(default_factory=dict)
    scale: float = 1.0
    q: dict[str, np.ndarray] = field(default_factory=dict)

    def bases(self, y_sums: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Q of every pair from the decoded pass-1 sums (plus the server's own terms); kept for ``finish``."""
        if set(y_sums) != set(self.plan.widths):
            raise FedesmError("secure aggregation: the pass-1 sum does not cover the round's LoRA pairs")
        ys = {}
        for name, y in y_sums.items():
            y = self.scale * np.asarray(y, dtype=np.float64)
            for a, b, w in self.extras.get(name, ()):
                y = y + range_term(a, b, self.plan.omega(name, np.shape(a)[1]), w)
            ys[name] = y
        for names in _by_shape(ys):  # pairs of one shape in one batched call, as aggregation does
            q = torch.linalg.qr(torch.from_numpy(np.stack([ys[n] for n in names])), mode="reduced")[0].numpy()
            self.q.update(zip(names, q))
        return dict(self.q)

    def finish(self, z_sums: Mapping[str, np.ndarray], rank: int, residuals: AggregationState | None = None,
               residual_cap: int | None = None, noise_floor: float = 0.0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Rank-``rank`` factors ``(A, B)`` (float64) of every pair from the decoded pass-2 sums.

        With ``residuals`` (fra-ef) the dropped tail is kept there as ``aggregation.aggregate`` keeps it
        (capped at ``residual_cap``, FRA's default being the sites' summed rank), less the components
        below ``noise_floor``: the fixed-point rounding of the sums (``masking.noise_floor``), which FRA
        in the clear does not have and which must not grow the residual's rank round after round.
        """
        if set(z_sums) != set(self.q):
            raise FedesmError("secure aggregation: the pass-2 sum does not cover the pairs of pass 1")
        zs = {}
        for name, z in z_sums.items():
            z = self.scale * np.asarray(z, dtype=np.float64)
            for a, b, w in self.extras.get(name, ()):
                z = z + core_term(a, b, self.q[name], w)
            zs[name] = z
        out = {}
        for names in _by_shape(zs):
            q, z = np.stack([self.q[n] for n in names]), np.stack([zs[n] for n in names])
            if residuals is None:
                a_new, b_new = refactor(q, z, rank)
            else:
                a_new, b_new, tail = refactor(q, z, rank, tail=True)
                cap = residual_cap if residual_cap is not None else q.shape[-1]
                for j, name in enumerate(names):
                    keep = int(torch.sum(tail.s[j] > noise_floor))
                    _store_residual(residuals, name, tail.a[j, :keep].numpy(), tail.b[j, :, :keep].numpy(),
                                    tail.s[j, :keep].numpy(), cap)
            out.update((name, (a_new[j].numpy(), b_new[j].numpy())) for j, name in enumerate(names))
        return out


def _by_shape(arrays: Mapping[str, np.ndarray]) -> list[list[str]]:
    groups: dict[tuple, list[str]] = {}
    for name, x in arrays.items():
        groups.setdefault(np.shape(x), []).append(name)
    return list(groups.values())


def plain_sums(terms: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The sum of the sites' terms in the clear (what the masked sum decodes to; for tests and the bench)."""
    keys = list(terms[0])
    return {k: np.sum([t[k] for t in terms], axis=0) for k in keys}
