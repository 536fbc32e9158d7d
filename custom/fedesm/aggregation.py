"""Server-side aggregation of LoRA adapters (no NVFLARE: numpy in and out, torch for the linear algebra).

Averaging LoRA factors separately (FedIT) is not the average of the sites' updates:
``mean(B) @ mean(A) != mean(B @ A)``. FRA-LoRA ("factored re-factorisation") aggregates the
products exactly and re-factors the result to rank ``r`` without ever forming the dense
``d_out x d_in`` matrix::

    sum_k w_k B_k A_k = Bs diag(w) As,   Bs = [B_1 .. B_K] (d_out x Kr),  As = [A_1; ..; A_K] (Kr x d_in)
    Bs = Q_B R_B,  As^T = Q_A R_A,  R_B diag(w) R_A^T = U S V^T      (small Kr x Kr core)
    B_new = Q_B U_r sqrt(S_r),  A_new = sqrt(S_r) V_r^T Q_A^T

``B_new @ A_new`` is the best rank-``r`` Frobenius approximation of the average (Eckart-Young).
``fra-ef`` keeps the truncated tail (in factored form) in an :class:`AggregationState` and adds
it back the next round, so nothing is lost over rounds. ``ffa`` (FFA-LoRA) freezes A, which
makes plain averaging of B exact.

State dicts are flat ``{name: array}`` dicts with PEFT names (``fedesm.model.keys``): LoRA pairs
end in ``.lora_A.weight`` / ``.lora_B.weight`` and share a prefix; every other tensor (e.g. the
classification head) is weighted-averaged (FedAvg). Sites may send factors of different ranks r_k
(``fedesm.ranks``): the stacks above simply have ``sum_k r_k`` columns; fedit and ffa, which average
the factors themselves, need equal ranks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from fedesm.model.keys import lora_pairs
from fedesm.settings import STRATEGIES



@dataclass
class AggregationState:
    """Server-side memory kept by the caller between rounds (used by ``fra-ef``).

    ``residuals[pair]`` is the part of the aggregate that truncation dropped, as factors
    ``(A_res, B_res)`` (float64, rank <= ``max_residual_rank`` or K*r), with ``B_res @ A_res`` the
    dropped matrix. ``residual_norms[pair]`` is its Frobenius norm (for logging).
    """

    max_residual_rank: int | None = None
    residuals: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    residual_norms: dict[str, float] = field(default_factory=dict)
    rounds: int = 0

    def clear(self) -> None:
        self.residuals.clear()
        self.residual_norms.clear()
        self.rounds = 0

    def residual_matrix(self, pair: str) -> np.ndarray | None:
        """Dense residual of one LoRA pair (for tests and diagnostics only; never used to aggregate)."""
        if pair not in self.residuals:
            return None
        a_res, b_res = self.residuals[pair]
        return b_res @ a_res


# --------------------------------------------------------------------------------------------
# array helpers: accept numpy arrays and torch tensors, compute in float64 numpy
# --------------------------------------------------------------------------------------------


def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "detach")


def _to_f64(x: Any) -> np.ndarray:
    if _is_torch(x):
        return x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def _like(x64: np.ndarray, ref: Any) -> Any:
    """Convert a float64 result back to the kind (numpy/torch), dtype and device of ``ref``."""
    if _is_torch(ref):
        return torch.from_numpy(np.ascontiguousarray(x64)).to(dtype=ref.dtype, device=ref.device)
    ref = np.asarray(ref)
    if not np.issubdtype(ref.dtype, np.floating):
        x64 = np.rint(x64)
    return np.ascontiguousarray(x64.astype(ref.dtype, copy=False))


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(x.shape) if hasattr(x, "shape") else np.shape(x)


def _normalise_weights(weights: Sequence[float], n: int) -> np.ndarray:
    w = np.asarray([float(v) for v in weights], dtype=np.float64)
    if w.shape != (n,):
        raise ValueError(f"got {w.size} weights for {n} sites")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError(f"weights must be finite and >= 0, got {w.tolist()}")
    total = w.sum()
    if total <= 0:
        raise ValueError(f"weights must not all be zero, got {w.tolist()}")
    return w / total


# --------------------------------------------------------------------------------------------
# FRA-LoRA core
# --------------------------------------------------------------------------------------------


def _refactor(
    a_list: list[np.ndarray], b_list: list[np.ndarray], col_weights: np.ndarray, rank: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Truncated SVD of ``sum_k c_k B_k A_k`` from the factors (float64).

    Returns ``(A_new, B_new, A_tail, B_tail, S_tail)``: the kept rank-``rank`` factors (zero-padded
    when fewer components exist) and the dropped singular triplets, split evenly the same way.
    """
    # torch (MKL) QR/SVD run ~2x faster than numpy (OpenBLAS) on CPU; from_numpy/.numpy() are zero-copy
    bs = torch.from_numpy(np.concatenate(b_list, axis=1))  # d_out x m
    as_ = torch.from_numpy(np.concatenate(a_list, axis=0))  # m x d_in
    d_out, d_in = bs.shape[0], as_.shape[1]
    q_b, r_b = torch.linalg.qr(bs)  # d_out x p, p x m
    q_a, r_a = torch.linalg.qr(as_.T)  # d_in x q, q x m
    core = (r_b * torch.from_numpy(col_weights)[None, :]) @ r_a.T  # p x q
    u, s, vt = torch.linalg.svd(core, full_matrices=False)
    k = min(rank, s.numel())
    root = s.sqrt()
    b_new = np.zeros((d_out, rank))
    a_new = np.zeros((rank, d_in))
    b_new[:, :k] = (q_b @ (u[:, :k] * root[:k])).numpy()
    a_new[:k, :] = ((root[:k, None] * vt[:k]) @ q_a.T).numpy()
    b_tail = (q_b @ (u[:, k:] * root[k:])).numpy()
    a_tail = ((root[k:, None] * vt[k:]) @ q_a.T).numpy()
    return a_new, b_new, a_tail, b_tail, s[k:].numpy()


def fra_lora(factors: Sequence[tuple[Any, Any]], weights: Sequence[float], rank: int) -> tuple[Any, Any]:
    """Best rank-``rank`` factors ``(A_new, B_new)`` of ``sum_k w_k B_k A_k`` (weights normalised).

    ``factors`` holds one ``(A, B)`` pair per site (A: r x d_in, B: d_out x r). The dense matrix is
    never formed: QR of the stacked factors and an SVD of the small (K*r x K*r) core suffice.
    Singular values are split evenly (``sqrt(S)`` into each factor). Computes in float64 and
    returns the input's kind (numpy array or torch tensor) and dtype.
    """
    if not factors:
        raise ValueError("fra_lora needs at least one (A, B) pair")
    if int(rank) != rank or rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    w = _normalise_weights(weights, len(factors))
    a_ref, b_ref = factors[0]
    a_list, b_list, cols = [], [], []
    for i, (a, b) in enumerate(factors):
        sa, sb = _shape(a), _shape(b)
        if len(sa) != 2 or len(sb) != 2 or sa[0] != sb[1]:
            raise ValueError(f"site {i}: expected A (r x d_in) and B (d_out x r), got A {sa} and B {sb}")
        if sa[1] != _shape(a_ref)[1] or sb[0] != _shape(b_ref)[0]:
            raise ValueError(f"site {i}: A {sa} / B {sb} do not match site 0: A {_shape(a_ref)} / B {_shape(b_ref)}")
        if w[i] == 0:
            continue
        a_list.append(_to_f64(a))
        b_list.append(_to_f64(b))
        cols.append(np.full(sa[0], w[i]))
    a_new, b_new, *_ = _refactor(a_list, b_list, np.concatenate(cols), int(rank))
    return _like(a_new, a_ref), _like(b_new, b_ref)


# --------------------------------------------------------------------------------------------
# state-dict level entry point
# --------------------------------------------------------------------------------------------


def _check_sites(site_states: Sequence[dict[str, Any]]) -> list[str]:
    """Same keys everywhere; same shapes, except that LoRA factors may differ in rank (sites of different
    means: A is r_k x d_in, B d_out x r_k, with r_k the site's own)."""
    if not site_states:
        raise ValueError("no site states to aggregate")
    ref = site_states[0]
    keys = list(ref.keys())
    factor_axis = {}
    for a_key, b_key in lora_pairs(keys).values():
        factor_axis[a_key], factor_axis[b_key] = 0, 1  # the rank axis of each factor
    for i, st in enumerate(site_states[1:], start=1):
        missing = [k for k in keys if k not in st]
        extra = [k for k in st if k not in ref]
        if missing or extra:
            raise ValueError(f"site {i}: keys differ from site 0 (missing {missing[:5]}, unexpected {extra[:5]})")
        for k in keys:
            s_shape, r_shape = _shape(st[k]), _shape(ref[k])
            if k in factor_axis and len(s_shape) == len(r_shape) == 2:
                keep = 1 - factor_axis[k]
                if s_shape[keep] == r_shape[keep]:
                    continue
            if s_shape != r_shape:
                raise ValueError(f"site {i}: shape of {k!r} is {s_shape}, site 0 has {r_shape}")
    return keys


def _weighted_mean(values: Sequence[Any], w: np.ndarray) -> np.ndarray:
    out = np.zeros(_shape(values[0]), dtype=np.float64)
    for v, wk in zip(values, w):
        if wk != 0:
            out += wk * _to_f64(v)
    return out


def aggregate(
    site_states: Sequence[dict[str, Any]],
    weights: Sequence[float],
    strategy: str = "fra",
    rank: int | None = None,
    state: AggregationState | None = None,
    global_state: dict[str, Any] | None = None,
    ffa_tol: float = 1e-6,
) -> dict[str, Any]:
    """Aggregate the sites' PEFT state dicts into one global state dict.

    Args:
        site_states: one flat ``{name: array}`` dict per site, same keys and shapes, except that a site's
            LoRA factors may have its own rank r_k (fra / fra-ef average the products B_k A_k whatever r_k).
        weights: per-site weights (normalised here; a weight of 0 drops the site).
        strategy: ``fra`` | ``fra-ef`` | ``fedit`` | ``ffa`` (see the module docstring).
        rank: output LoRA rank for ``fra``/``fra-ef``; default: each pair's largest input rank.
        state: the :class:`AggregationState` kept between rounds (required by ``fra-ef``).
        global_state: the global model sent this round; ``ffa`` takes the frozen A from it
            (falls back to site 0's A when absent).
        ffa_tol: ``ffa`` raises if a site's A differs from the frozen A by more than this
            (relative to max |A|): averaging B alone is only exact if nobody trained A.

    Returns:
        ``{name: array}`` with the same keys (in order), kinds and dtypes as site 0.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown aggregation strategy {strategy!r}; valid: {', '.join(STRATEGIES)}")
    if strategy == "fra-ef" and state is None:
        raise ValueError("strategy 'fra-ef' needs an AggregationState kept by the caller between rounds")
    if rank is not None and (int(rank) != rank or rank < 1):
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    keys = _check_sites(site_states)
    w = _normalise_weights(weights, len(site_states))
    active = [i for i in range(len(site_states)) if w[i] > 0]
    ref = site_states[0]
    pairs = lora_pairs(keys)
    lora_keys = {k for pair in pairs.values() for k in pair}

    out: dict[str, Any] = {}
    for name, (a_key, b_key) in pairs.items():
        ranks = []
        for i in range(len(site_states)):
            a_shape, b_shape = _shape(site_states[i][a_key]), _shape(site_states[i][b_key])
            if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1]:
                raise ValueError(f"{name}: site {i}'s lora_A {a_shape} and lora_B {b_shape} are not an "
                                 "(r x d_in, d_out x r) pair")
            ranks.append(a_shape[0])
        a_shape, b_shape = _shape(ref[a_key]), _shape(ref[b_key])
        if strategy in ("fedit", "ffa") and len(set(ranks)) > 1:
            raise ValueError(f"{name}: {strategy} averages the factors themselves, so every site needs the same "
                             f"rank (got {sorted(set(ranks))}); fra and fra-ef average products of any ranks")
        r_out = int(rank) if rank is not None else max(ranks)
        if strategy == "fedit":
            a_new = _weighted_mean([site_states[i][a_key] for i in active], w[active])
            b_new = _weighted_mean([site_states[i][b_key] for i in active], w[active])
        elif strategy == "ffa":
            a_new = _frozen_a(site_states, active, a_key, global_state, ffa_tol)
            b_new = _weighted_mean([site_states[i][b_key] for i in active], w[active])
        else:
            a_list = [_to_f64(site_states[i][a_key]) for i in active]
            b_list = [_to_f64(site_states[i][b_key]) for i in active]
            cols = [np.full(ranks[i], w[i]) for i in active]  # each site's own rank r_k
            if strategy == "fra-ef" and name in state.residuals:
                a_res, b_res = state.residuals[name]
                if a_res.shape[1] != a_shape[1] or b_res.shape[0] != b_shape[0]:
                    raise ValueError(f"{name}: error-feedback residual shape does not match this round's factors")
                a_list.append(a_res)
                b_list.append(b_res)
                cols.append(np.ones(a_res.shape[0]))
            a_new, b_new, a_tail, b_tail, s_tail = _refactor(a_list, b_list, np.concatenate(cols), r_out)
            if strategy == "fra-ef":
                _store_residual(state, name, a_tail, b_tail, s_tail, sum(ranks[i] for i in active))
        out[a_key] = _like(a_new, ref[a_key])
        out[b_key] = _like(b_new, ref[b_key])

    for k in keys:
        if k not in lora_keys:
            out[k] = _like(_weighted_mean([site_states[i][k] for i in active], w[active]), ref[k])
    if strategy == "fra-ef":
        state.rounds += 1
    return {k: out[k] for k in keys}


def _frozen_a(site_states, active, a_key, global_state, tol) -> np.ndarray:
    if global_state is not None:
        if a_key not in global_state:
            raise ValueError(f"ffa: global model has no {a_key!r} to keep frozen")
        a_frozen = _to_f64(global_state[a_key])
        if a_frozen.shape != _shape(site_states[0][a_key]):
            site_shape = _shape(site_states[0][a_key])
            raise ValueError(f"ffa: global {a_key!r} has shape {a_frozen.shape}, sites send {site_shape}")
    else:
        a_frozen = _to_f64(site_states[active[0]][a_key])
    scale = max(1.0, float(np.max(np.abs(a_frozen))) if a_frozen.size else 1.0)
    for i in active:
        diff = float(np.max(np.abs(_to_f64(site_states[i][a_key]) - a_frozen))) if a_frozen.size else 0.0
        if diff > tol * scale:
            raise ValueError(
                f"ffa: site {i} changed frozen {a_key!r} (max abs diff {diff:.3g} > {tol:g}); "
                "FFA-LoRA requires sites to train only lora_B"
            )
    return a_frozen


def _store_residual(state: AggregationState, name: str, a_tail, b_tail, s_tail, default_cap: int) -> None:
    """Keep the dropped triplets, minus numerically-zero ones, capped to bound memory."""
    cap = state.max_residual_rank if state.max_residual_rank is not None else default_cap
    smax = float(s_tail[0]) if s_tail.size else 0.0
    tol = np.finfo(np.float64).eps * max(a_tail.shape[1], b_tail.shape[0], 1) * smax
    keep = min(int(np.sum(s_tail > tol)), cap)
    if keep == 0:
        state.residuals.pop(name, None)
        state.residual_norms[name] = 0.0
        return
    state.residuals[name] = (np.ascontiguousarray(a_tail[:keep]), np.ascontiguousarray(b_tail[:, :keep]))
    state.residual_norms[name] = float(np.sqrt(np.sum(s_tail[:keep] ** 2)))
