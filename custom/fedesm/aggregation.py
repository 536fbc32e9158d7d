"""Server-side aggregation of LoRA adapters (no NVFLARE: numpy in and out, torch for the linear algebra).

Averaging LoRA factors separately (FedIT) is not the average of the sites' updates:
``mean(B) @ mean(A) != mean(B @ A)``. FRA-LoRA ("factored re-factorisation") aggregates the
products exactly and re-factors the result to rank ``r``; while the stacked rank K*r is well below
d it never forms the dense ``d_out x d_in`` matrix::

    sum_k w_k B_k A_k = Bs diag(w) As,   Bs = [B_1 .. B_K] (d_out x Kr),  As = [A_1; ..; A_K] (Kr x d_in)
    As^T = Q_A R_A,   X = Bs diag(w) R_A^T (d_out x Kr),   X = U S V^T
    B_new = U_r sqrt(S_r),  A_new = sqrt(S_r) V_r^T Q_A^T

(``U S V^T`` from the eigenvectors of the small ``X^T X``; ``Q_A`` is applied to the r kept columns
only, never formed.) Once K*r approaches d (many sites, small models) the dense average is the
cheaper route to the same decomposition (``choose_route``). ``B_new @ A_new`` is the best
rank-``r`` Frobenius approximation of the average (Eckart-Young). The maths runs in float32 for
float32 (or float16) factors, which is what sites send, and in float64 for float64 input; all
adapted matrices of one shape are re-factored in batched calls (``_refactor`` takes stacks with
leading batch dimensions).

``fra-ef`` keeps the truncated tail (in factored form) in an :class:`AggregationState` and adds
it back the next round, so nothing is lost over rounds; only ``fra-ef`` forms that tail. ``ffa``
(FFA-LoRA) freezes A, which makes plain averaging of B exact.

State dicts are flat ``{name: array}`` dicts with PEFT names (``fedesm.keys``): LoRA pairs
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

from fedesm.keys import lora_pairs
from fedesm.strategies import STRATEGIES, STRATEGY, Strategy



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
# array helpers: accept numpy arrays and torch tensors
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
# FRA-LoRA core: stacked factors + column weights -> rank-r factors (and the dropped tail)
# --------------------------------------------------------------------------------------------

ROUTES = ("auto", "factored", "dense")

# ``auto`` forms the dense d_out x d_in average once the stacked rank m = K*r (+ residual) reaches
# this fraction of min(d_out, d_in): there the QR of the A stack costs more than forming the
# product, and both routes end in an eigenproblem of about the same size (measured: the factored
# route is faster up to m ~ 0.8 d, the dense one from m ~ d; bench/results.md, section 2).
DENSE_FROM = 0.9

# Pairs of one shape are re-factored together in batches of at most this many bytes of stacked
# factors: one call for many small pairs saves per-call overhead, while on a CPU a batch of large
# pairs that leaves the cache is slower than one pair at a time.
_CHUNK_BYTES = 8 << 20


@dataclass
class Tail:
    """The components truncation dropped: ``b @ a`` is the dropped matrix, ``s`` its singular values
    (descending), split like the kept ones."""

    a: torch.Tensor  # (..., t, d_in)
    b: torch.Tensor  # (..., d_out, t)
    s: torch.Tensor  # (..., t)


def choose_route(m: int, d_in: int, d_out: int) -> str:
    """``factored`` while the stacked rank ``m`` is well below the matrix size, else ``dense``."""
    return "dense" if m >= DENSE_FROM * min(d_in, d_out) else "factored"


def _top_svd(x: torch.Tensor, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``k`` leading singular triplets of ``x`` (batched; all when ``k`` is None) from the smaller Gram.

    An eigendecomposition of ``x^T x`` costs about half an SVD of ``x``. The singular values and the
    other side's vectors come from projecting ``x`` on the eigenvectors (``x V = U S``), not from
    square roots of rounded eigenvalues, so ``U diag(s) Vt`` is ``x`` projected on the kept
    directions to working precision relative to ``s_max``. Returns ``(U, s, Vt)``.
    """
    p, q = x.shape[-2], x.shape[-1]
    n = min(p, q) if k is None else min(k, p, q)
    tiny = torch.finfo(x.dtype).tiny
    scale = x.abs().amax(dim=(-2, -1), keepdim=True).clamp(min=tiny)
    x = x / scale  # the Gram squares magnitudes: keep them far from under- and overflow
    if q <= p:
        v = torch.linalg.eigh(x.transpose(-1, -2) @ x)[1][..., -n:].flip(-1)  # eigh sorts ascending
        left = x @ v  # U S
        s = torch.linalg.vector_norm(left, dim=-2)
        u, vt = left / s.clamp(min=tiny).unsqueeze(-2), v.transpose(-1, -2)  # s = 0: a zero column
    else:
        u = torch.linalg.eigh(x @ x.transpose(-1, -2))[1][..., -n:].flip(-1)
        right = u.transpose(-1, -2) @ x  # S Vt
        s = torch.linalg.vector_norm(right, dim=-1)
        vt = right / s.clamp(min=tiny).unsqueeze(-1)
    return u, s * scale.squeeze(-1), vt


def _split(u: torch.Tensor, s: torch.Tensor, vt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) = (sqrt(S) Vt, U sqrt(S)): the singular values split evenly between the factors."""
    root = s.sqrt()
    return root.unsqueeze(-1) * vt, u * root.unsqueeze(-2)


def _fix_signs(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each component's sign chosen so that its B column's largest-magnitude entry is positive.

    A singular pair (u, v) is only defined up to a common sign, and which one the eigensolver returns
    depends on the order the sites were stacked in; fixing it makes the global factors (and so every
    site's next start) a function of the contributions alone. B A is unchanged.
    """
    if b.shape[-1] == 0:
        return a, b
    idx = b.abs().argmax(dim=-2, keepdim=True)  # (..., 1, k)
    sign = torch.where(torch.gather(b, -2, idx) < 0, -1.0, 1.0).to(b.dtype)
    return a * sign.transpose(-1, -2), b * sign


def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    if x.shape[-2] == rows:
        return x
    out = x.new_zeros((*x.shape[:-2], rows, x.shape[-1]))
    out[..., : x.shape[-2], :] = x
    return out


def _refactor(a_stack: torch.Tensor, b_stack: torch.Tensor, col_weights: torch.Tensor, rank: int, *,
              tail: bool = False, route: str = "auto"):
    """Best rank-``rank`` factors of ``b_stack @ diag(col_weights) @ a_stack``, for a batch of pairs.

    ``a_stack`` (..., m, d_in) and ``b_stack`` (..., d_out, m) are the sites' factors stacked along
    the rank axis (``[A_1; ..; A_K]``, ``[B_1 .. B_K]``), ``col_weights`` (..., m) or (m,) weighs each
    stacked component. Computes in the stacks' dtype. Returns ``(A_new, B_new)`` of shapes
    (..., rank, d_in) and (..., d_out, rank), zero-padded where fewer components exist, and with
    ``tail=True`` also the dropped components as a :class:`Tail` (only ``fra-ef`` needs it).

    ``factored`` (stacked rank m well below d): Householder QR ``As^T = Q_A R_A``, so the average is
    ``X Q_A^T`` with the thin ``X = Bs diag(w) R_A^T`` (d_out x m); X is decomposed and only the kept
    columns are multiplied by Q_A (``ormqr``: Q is never formed). ``dense``: the d_out x d_in average
    formed once and decomposed. Both decompose through the smaller Gram matrix (``_top_svd``).
    """
    if route not in ROUTES:
        raise ValueError(f"unknown route {route!r}; valid: {', '.join(ROUTES)}")
    m, d_in, d_out = a_stack.shape[-2], a_stack.shape[-1], b_stack.shape[-2]
    if route == "auto":
        route = choose_route(m, d_in, d_out)
    w = col_weights.to(b_stack.dtype).unsqueeze(-2)  # (..., 1, m)
    keep = None if tail else rank  # without the tail only the leading components are needed
    if route == "dense":
        u, s, vt = _top_svd((b_stack * w) @ a_stack, keep)
        h_a = tau_a = None
    else:
        h_a, tau_a = torch.geqrf(a_stack.transpose(-1, -2))  # As^T = Q_A R_A, R_A: (q, m)
        u, s, vt = _top_svd((b_stack * w) @ h_a[..., : min(d_in, m), :].triu().transpose(-1, -2), keep)

    def factors(lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = _split(u[..., lo:hi], s[..., lo:hi], vt[..., lo:hi, :])
        a, b = _fix_signs(a, b)
        if h_a is not None:  # back from the QR coordinates: A^T = Q_A a^T
            a = torch.ormqr(h_a, tau_a, _pad_rows(a.transpose(-1, -2), d_in)).transpose(-1, -2)
        return a, b

    k = min(rank, s.shape[-1])
    a_k, b_k = factors(0, k)
    if k < rank:  # fewer components than the rank asked for: zero-pad
        a_k = torch.cat([a_k, a_k.new_zeros((*a_k.shape[:-2], rank - k, d_in))], dim=-2)
        b_k = torch.cat([b_k, b_k.new_zeros((*b_k.shape[:-2], d_out, rank - k))], dim=-1)
    if not tail:
        return a_k, b_k
    a_t, b_t = factors(k, s.shape[-1])
    return a_k, b_k, Tail(a_t, b_t, s[..., k:])


def _compute_dtype(arrays) -> torch.dtype:
    """float32 when every input is float32 or narrower (what sites send), float64 otherwise."""
    narrow = (np.float32, np.float16)
    for x in arrays:
        if _is_torch(x):
            if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
                return torch.float64
        elif np.asarray(x).dtype not in narrow:
            return torch.float64
    return torch.float32


def _fill(dst: torch.Tensor, src: Any) -> None:
    """Copy one factor (numpy or torch, any float dtype or device) into a slice of a CPU stack."""
    if _is_torch(src):
        dst.copy_(src.detach())
    else:
        dst.numpy()[...] = src  # numpy casts; read-only arrays need no torch view


def fra_lora(factors: Sequence[tuple[Any, Any]], weights: Sequence[float], rank: int) -> tuple[Any, Any]:
    """Best rank-``rank`` factors ``(A_new, B_new)`` of ``sum_k w_k B_k A_k`` (weights normalised).

    ``factors`` holds one ``(A, B)`` pair per site (A: r x d_in, B: d_out x r). The dense matrix is
    never formed while K*r is well below d (QR of the stacked factors and a small K*r core suffice);
    beyond that the dense average is the cheaper route. Singular values are split evenly
    (``sqrt(S)`` into each factor). Computes in float32 for float32 (or narrower) input, float64
    for float64, and returns the input's kind (numpy array or torch tensor) and dtype.
    """
    if not factors:
        raise ValueError("fra_lora needs at least one (A, B) pair")
    if int(rank) != rank or rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    w = _normalise_weights(weights, len(factors))
    a_ref, b_ref = factors[0]
    for i, (a, b) in enumerate(factors):
        sa, sb = _shape(a), _shape(b)
        if len(sa) != 2 or len(sb) != 2 or sa[0] != sb[1]:
            raise ValueError(f"site {i}: expected A (r x d_in) and B (d_out x r), got A {sa} and B {sb}")
        if sa[1] != _shape(a_ref)[1] or sb[0] != _shape(b_ref)[0]:
            raise ValueError(f"site {i}: A {sa} / B {sb} do not match site 0: A {_shape(a_ref)} / B {_shape(b_ref)}")
    active = [(i, f) for i, f in enumerate(factors) if w[i] > 0]
    dtype = _compute_dtype([x for _, f in active for x in f])
    m = sum(_shape(a)[0] for _, (a, _b) in active)
    d_in, d_out = _shape(a_ref)[1], _shape(b_ref)[0]
    a_stack = torch.empty((m, d_in), dtype=dtype)
    b_stack = torch.empty((d_out, m), dtype=dtype)
    cols = torch.empty(m, dtype=dtype)
    at = 0
    for i, (a, b) in active:
        r = _shape(a)[0]
        _fill(a_stack[at : at + r], a)
        _fill(b_stack[:, at : at + r], b)
        cols[at : at + r] = float(w[i])
        at += r
    a_new, b_new = _refactor(a_stack, b_stack, cols, int(rank))
    return _like(a_new.numpy(), a_ref), _like(b_new.numpy(), b_ref)


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
    server_lr: float = 1.0,
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
        server_lr: the server's step along the averaged update (FedOpt's server SGD without momentum):
            ``G + server_lr * (avg - G)``, needs ``global_state``; 1 (default) is the plain average. For
            fra / fra-ef the global pair joins the stack with column weight ``1 - server_lr``, so the
            result is still re-factored from the factors (``sum_k server_lr w_k B_k A_k + (1 - server_lr)
            B_g A_g``), never a dense matrix.

    Returns:
        ``{name: array}`` with the same keys (in order), kinds and dtypes as site 0.
    """
    how = _strategy(strategy, state, rank, server_lr)
    if not site_states:
        raise ValueError("no site states to aggregate")
    w = _normalise_weights(weights, len(site_states))
    if server_lr != 1.0:
        if global_state is None:
            raise ValueError("server_lr != 1 steps from the global model: pass global_state")
        site_states = [*site_states, global_state]  # the global model as one more (signed) term
        w = np.concatenate([server_lr * w, [1.0 - server_lr]])
    keys = _check_sites(site_states)
    sites = _Sites(site_states, [i for i in range(len(site_states)) if w[i] != 0], w, lora_pairs(keys))
    residuals = state if how.keeps_residual else None
    out: dict[str, Any] = {}
    groups: dict[_Group, list[str]] = {}  # re-factoring strategies: pairs of one shape, re-factored together
    for name in sites.pairs:
        ranks = _pair_ranks(sites, name)
        if not how.any_rank and len(set(ranks)) > 1:
            raise ValueError(f"{name}: {strategy} averages the factors themselves, so every site needs the same "
                             f"rank (got {sorted(set(ranks))}); fra and fra-ef average products of any ranks")
        if how.refactors:
            group = _Group(*_pair_dims(sites, name), tuple(ranks[i] for i in sites.active),
                           int(rank) if rank is not None else max(ranks), _residual_rank(residuals, sites, name))
            groups.setdefault(group, []).append(name)
        else:
            out.update(_average_factors(sites, name, global_state if how.freezes_a else None, ffa_tol,
                                        frozen_a=how.freezes_a))
    for group, names in groups.items():
        out.update(_refactor_group(sites, group, names, residuals))
    lora_keys = {k for pair in sites.pairs.values() for k in pair}
    for k in keys:
        if k not in lora_keys:
            out[k] = sites.mean(k)
    if residuals is not None:
        residuals.rounds += 1
    return {k: out[k] for k in keys}


def _strategy(strategy: str, state: AggregationState | None, rank, server_lr: float) -> Strategy:
    """The strategy's record, once the call's arguments are known to suit it."""
    if strategy not in STRATEGY:
        raise ValueError(f"unknown aggregation strategy {strategy!r}; valid: {', '.join(STRATEGIES)}")
    how = STRATEGY[strategy]
    if how.keeps_residual and state is None:
        raise ValueError(f"strategy {strategy!r} needs an AggregationState kept by the caller between rounds")
    if rank is not None and (int(rank) != rank or rank < 1):
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    if not (np.isfinite(server_lr) and server_lr > 0):
        raise ValueError(f"server_lr must be > 0, got {server_lr!r}")
    return how


@dataclass(frozen=True)
class _Sites:
    """One call's contributions: the state dicts, those that weigh (``active``), the weights and the LoRA pairs."""
    states: Sequence[dict[str, Any]]
    active: list[int]
    w: np.ndarray
    pairs: dict[str, tuple[str, str]]

    def mean(self, key: str) -> Any:
        """The weighted mean of one tensor, in site 0's kind and dtype."""
        return _like(_weighted_mean([self.states[i][key] for i in self.active], self.w[self.active]),
                     self.states[0][key])


@dataclass(frozen=True)
class _Group:
    """Pairs re-factored together: the same shapes, site ranks, output rank and residual rank."""
    d_in: int
    d_out: int
    site_ranks: tuple[int, ...]
    r_out: int
    res_rank: int


def _pair_ranks(sites: _Sites, name: str) -> list[int]:
    """Each site's rank for one pair, once its A and B are known to make one."""
    a_key, b_key = sites.pairs[name]
    ranks = []
    for i, site in enumerate(sites.states):
        a_shape, b_shape = _shape(site[a_key]), _shape(site[b_key])
        if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1]:
            raise ValueError(f"{name}: site {i}'s lora_A {a_shape} and lora_B {b_shape} are not an "
                             "(r x d_in, d_out x r) pair")
        ranks.append(a_shape[0])
    return ranks


def _pair_dims(sites: _Sites, name: str) -> tuple[int, int]:
    a_key, b_key = sites.pairs[name]
    return _shape(sites.states[0][a_key])[1], _shape(sites.states[0][b_key])[0]


def _residual_rank(residuals: AggregationState | None, sites: _Sites, name: str) -> int:
    """The rank of the error-feedback residual kept for this pair (0: none)."""
    if residuals is None or name not in residuals.residuals:
        return 0
    a_res, b_res = residuals.residuals[name]
    d_in, d_out = _pair_dims(sites, name)
    if a_res.shape[1] != d_in or b_res.shape[0] != d_out:
        raise ValueError(f"{name}: error-feedback residual shape does not match this round's factors")
    return a_res.shape[0]


def _average_factors(sites: _Sites, name: str, global_state, tol: float, *, frozen_a: bool) -> dict[str, Any]:
    """fedit: A and B averaged each; ffa: A kept frozen, B averaged."""
    a_key, b_key = sites.pairs[name]
    ref = sites.states[0]
    a = _like(_frozen_a(sites.states, sites.active, a_key, global_state, tol), ref[a_key]) if frozen_a \
        else sites.mean(a_key)
    return {a_key: a, b_key: sites.mean(b_key)}


def _refactor_group(sites: _Sites, group: _Group, names: list[str], residuals: AggregationState | None) -> dict:
    """FRA-LoRA for one group of equal-shape pairs, stacked and re-factored in batched chunks (with error
    feedback, ``residuals`` given, the dropped tail is kept there)."""
    ref = sites.states[0]
    arrays = [sites.states[i][k] for name in names for k in sites.pairs[name] for i in sites.active]
    dtype = _compute_dtype(arrays)
    m = sum(group.site_ranks) + group.res_rank
    per_pair = (group.d_in + group.d_out) * m * torch.empty((), dtype=dtype).element_size()
    step = max(1, _CHUNK_BYTES // per_pair)
    out = {}
    for lo in range(0, len(names), step):
        chunk = names[lo : lo + step]
        a_stack, b_stack, cols = _stack_pairs(sites, group, chunk, residuals, dtype)
        if residuals is not None:
            a_new, b_new, tail = _refactor(a_stack, b_stack, cols, group.r_out, tail=True)
        else:
            a_new, b_new = _refactor(a_stack, b_stack, cols, group.r_out)
        for j, name in enumerate(chunk):
            a_key, b_key = sites.pairs[name]
            out[a_key] = _like(a_new[j].numpy(), ref[a_key])
            out[b_key] = _like(b_new[j].numpy(), ref[b_key])
            if residuals is not None:
                _store_residual(residuals, name, tail.a[j].double().numpy(), tail.b[j].double().numpy(),
                                tail.s[j].double().numpy(), sum(group.site_ranks), torch.finfo(dtype).eps)
    return out


def _stack_pairs(sites: _Sites, group: _Group, names: list[str], residuals: AggregationState | None, dtype):
    """The stacks of the pairs ``names`` (one group): A (n, m, d_in), B (n, d_out, m), column weights (m,).

    Site k's factors (its own rank r_k, ``group.site_ranks``) occupy the next r_k columns with weight w_k; an
    ``fra-ef`` residual (rank ``group.res_rank``) takes the last columns with weight 1.
    """
    offsets = np.concatenate([[0], np.cumsum(group.site_ranks)]).astype(int)
    res_rank = group.res_rank
    m = int(offsets[-1]) + res_rank
    a_stack = torch.empty((len(names), m, group.d_in), dtype=dtype)
    b_stack = torch.empty((len(names), group.d_out, m), dtype=dtype)
    for j, name in enumerate(names):
        a_key, b_key = sites.pairs[name]
        for slot, i in enumerate(sites.active):
            lo, hi = offsets[slot], offsets[slot + 1]
            _fill(a_stack[j, lo:hi], sites.states[i][a_key])
            _fill(b_stack[j, :, lo:hi], sites.states[i][b_key])
        if res_rank:
            a_res, b_res = residuals.residuals[name]
            _fill(a_stack[j, m - res_rank :], a_res)
            _fill(b_stack[j, :, m - res_rank :], b_res)
    cols = torch.ones(m, dtype=dtype)
    cols[: offsets[-1]] = torch.from_numpy(np.repeat(sites.w[sites.active], group.site_ranks)).to(dtype)
    return a_stack, b_stack, cols


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


def _store_residual(state: AggregationState, name: str, a_tail, b_tail, s_tail, default_cap: int,
                    eps: float = float(np.finfo(np.float64).eps)) -> None:
    """Keep the dropped triplets, minus numerically-zero ones (below ``eps`` of the computation, scaled),
    capped to bound memory."""
    cap = state.max_residual_rank if state.max_residual_rank is not None else default_cap
    smax = float(s_tail[0]) if s_tail.size else 0.0
    tol = eps * max(a_tail.shape[1], b_tail.shape[0], 1) * smax
    keep = min(int(np.sum(s_tail > tol)), cap)
    if keep == 0:
        state.residuals.pop(name, None)
        state.residual_norms[name] = 0.0
        return
    state.residuals[name] = (np.ascontiguousarray(a_tail[:keep]), np.ascontiguousarray(b_tail[:, :keep]))
    state.residual_norms[name] = float(np.sqrt(np.sum(s_tail[:keep] ** 2)))


# --------------------------------------------------------------------------------------------
# bounded updates: how far each site moves the model, from the factors (strategy-independent)
# --------------------------------------------------------------------------------------------


def product_norm(a: Any, b: Any) -> float:
    """``||B A||_F`` from the factors: ``||BA||_F^2 = trace((B^T B)(A A^T))``, two r x r Gram matrices.

    Fine when the product itself is wanted; a *difference* of two products is better taken with
    :func:`product_difference_norm`, which does not subtract nearly equal squares.
    """
    a64, b64 = _to_f64(a), _to_f64(b)
    return float(np.sqrt(max(0.0, float(np.sum((b64.T @ b64) * (a64 @ a64.T))))))


def product_difference_norm(a: Any, b: Any, a_ref: Any = None, b_ref: Any = None) -> float:
    """``||B A - B_ref A_ref||_F`` without forming either d_out x d_in product.

    ``B A - B_ref A_ref = [B, -B_ref] [A; A_ref]``; with the QR factorisations ``[B, -B_ref] = Q_B R_B``
    and ``[A; A_ref]^T = Q_A R_A`` (orthonormal Q), the norm is that of the small 2r x 2r core
    ``R_B R_A^T``: O((d_out + d_in) r^2) work, and stable when the update is tiny next to the product.
    Without a reference it is ``||B A||_F``.
    """
    a64, b64 = _to_f64(a), _to_f64(b)
    if a_ref is not None:
        a64 = np.concatenate([a64, _to_f64(a_ref)], axis=0)
        b64 = np.concatenate([b64, -_to_f64(b_ref)], axis=1)
    r_b = np.linalg.qr(b64, mode="r")
    r_a = np.linalg.qr(a64.T, mode="r")
    return float(np.linalg.norm(r_b @ r_a.T))


def update_norm(site_state: dict[str, Any], global_state: dict[str, Any] | None = None) -> float:
    """The size of one site's update: ``sqrt(sum_pairs ||B_k A_k - B_g A_g||_F^2 + sum_rest ||x_k - x_g||^2)``.

    LoRA pairs count by the change of their product B·A (what the model applies; the factors themselves
    are not unique), every other tensor (the head) by its plain change. Without ``global_state`` it is
    the norm of the site's own state (its change from zero).
    """
    keys = list(site_state)
    pairs = lora_pairs(keys)
    lora_keys = {k for pair in pairs.values() for k in pair}
    total = 0.0
    for a_key, b_key in pairs.values():
        ref = (global_state[a_key], global_state[b_key]) if global_state is not None else (None, None)
        total += product_difference_norm(site_state[a_key], site_state[b_key], *ref) ** 2
    for k in keys:
        if k not in lora_keys:
            diff = _to_f64(site_state[k]) - (_to_f64(global_state[k]) if global_state is not None else 0.0)
            total += float(np.sum(diff * diff))
    return float(np.sqrt(total))


# An update smaller than this fraction of the global model's own norm counts as none: a site that sends the
# global model back differs from it by rounding only (~1e-14 relative), an honest site by far more than 1e-6.
ZERO_RTOL = 1e-6
_ZERO_ATOL = 1e-12  # the floor when the global model itself is zero


@dataclass(frozen=True)
class UpdateCheck:
    """One site's update in a round: its norm, its ratio to the median of the others', the factor it is scaled
    by before averaging (1 = as sent) and why it is rejected (None = kept)."""

    norm: float
    ratio: float  # norm / median of the other sites' norms; nan when there is no other site or that median is 0
    reason: str | None
    scale: float = 1.0


def screen_updates(site_states: Sequence[dict[str, Any]], global_state: dict[str, Any] | None = None,
                   max_ratio: float = 0.0, max_norm: float | None = None, clip_ratio: float = 0.0,
                   zero_rtol: float = ZERO_RTOL) -> list[UpdateCheck]:
    """Bound the sites' updates before any strategy averages them; one site's odd numbers reject that site only.

    * A norm below ``zero_rtol`` x the global model's norm is no update (a free-rider sending the global model
      back): rejected, and left out of the median the others are judged by.
    * A norm that is not finite, or cannot be computed at all, is rejected with the error.
    * A site is rejected when its :func:`update_norm` exceeds ``max_norm`` (an absolute cap), or is more than
      ``max_ratio`` times the median of the *other* sites' non-zero norms (0 = off); with two sites the larger
      is judged against the smaller.
    * With at least two other sites (and the global model to scale towards), an update larger than
      ``clip_ratio`` times their median is scaled down to it (``scale`` < 1; 0 = off): no single site pulls
      harder than a typical one.
    """
    norms, errors = [], []
    for s in site_states:
        try:
            with np.errstate(all="ignore"):
                norms.append(update_norm(s, global_state))
            errors.append(None)
        except Exception as e:  # noqa: BLE001 - whatever a site's numbers break, only that site is refused
            norms.append(float("nan"))
            errors.append(f"update norm not computable ({type(e).__name__}: {str(e)[:200]})")
    floor = _ZERO_ATOL
    if global_state is not None:
        try:
            with np.errstate(all="ignore"):
                own = update_norm(global_state)
            floor = max(floor, zero_rtol * own) if np.isfinite(own) else floor
        except Exception:  # noqa: BLE001 - a global model the server made; keep the absolute floor
            pass
    usable = [bool(np.isfinite(n) and n > floor) for n in norms]
    out = []
    for i, norm in enumerate(norms):
        others = [n for j, n in enumerate(norms) if j != i and usable[j]]
        median = float(np.median(others)) if others else 0.0
        ratio = norm / median if median > 0 and np.isfinite(norm) else float("nan")
        reason, scale = errors[i], 1.0
        if reason is None and not np.isfinite(norm):
            reason = f"update norm is {norm}"
        elif reason is None and norm <= floor:
            reason = (f"no update: norm {norm:.3g} is below {floor:.3g} ({zero_rtol:g} of the global model's), "
                      "the global model sent back")
        elif reason is None and max_norm is not None and norm > max_norm:
            reason = f"update norm {norm:.4g} > federation.max_update_norm {max_norm:g}"
        elif reason is None and max_ratio and np.isfinite(ratio) and ratio > max_ratio:
            reason = (f"update norm {norm:.4g} is {ratio:.3g}x the median of the other sites' ({median:.4g}); "
                      f"federation.max_update_ratio is {max_ratio:g}")
        elif (reason is None and clip_ratio and global_state is not None and len(others) >= 2
              and np.isfinite(ratio) and ratio > clip_ratio):
            scale = clip_ratio / ratio
        out.append(UpdateCheck(norm=norm, ratio=ratio, reason=reason, scale=scale))
    return out


def capped_shares(counts: Sequence[float], max_share: float) -> np.ndarray:
    """Shares proportional to ``counts`` with none above ``max_share``: a capped share's excess goes to the
    others in proportion (water-filling); equal shares when the cap cannot be met (K x max_share < 1)."""
    w = np.asarray(counts, dtype=np.float64)
    n = w.size
    if n == 0:
        return w
    if not np.all(np.isfinite(w)) or np.any(w <= 0) or max_share * n <= 1:
        return np.full(n, 1.0 / n)
    w = w / w.sum()
    capped = np.zeros(n, dtype=bool)
    while True:
        over = (w > max_share * (1 + 1e-12)) & ~capped
        if not over.any():
            return w
        capped |= over
        w[capped] = max_share
        rest = ~capped
        w[rest] = w[rest] / w[rest].sum() * (1.0 - max_share * capped.sum())
