"""What a site does with its optimizer state when new global adapters arrive.

A site keeps one AdamW for the whole run, whose first and second moments describe its LoRA factors
in the basis they were trained in. FRA-LoRA returns the global update re-factored by an SVD: the same
kind of product B·A, but in a new basis (rows re-mixed, signs arbitrary) and at a new scale, so
moments kept as they are no longer belong to the factors they update. Any invertible r x r matrix G
gives the same product, (B G^-1)(G A) = B A; the policies:

  keep    load the global factors as they come and keep the moments: right where the basis does not
          change (fedit averages the factors themselves, ffa keeps A frozen)
  reset   load the global factors and zero the moments and step count of the LoRA factors (the head's
          are kept: it is averaged, not re-factored)
  align   take the global product in the factorization closest to the site's own previous factors
          (`align_factors`) and keep the moments: the moments stay meaningful, and with one site the
          site gets back exactly its own factors, so federating over one site changes nothing

`resolve_optimizer_state` maps `auto` per strategy: align for fra / fra-ef (re-factored), keep for fedit / ffa.
"""

from __future__ import annotations

from typing import Mapping

import torch

from fedesm.keys import is_lora_a, is_lora_b, lora_pairs
from fedesm.strategies import STRATEGY

POLICIES = ("keep", "reset", "align")
MAX_CONDITION = 1e6  # an alignment worse conditioned than this falls back to the global factors as sent


def resolve_optimizer_state(policy: str, strategy: str) -> str:
    """The policy a site applies: `auto` -> the strategy's own (align where it re-factors, keep otherwise)."""
    if policy == "auto":
        return STRATEGY[strategy].optimizer_state
    if policy not in POLICIES:
        raise ValueError(f"unknown optimizer-state policy {policy!r}; valid: auto, {', '.join(POLICIES)}")
    return policy


def _sylvester(p: torch.Tensor, q: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """X with X P + Q X = C for symmetric positive semi-definite P, Q (eigen-decompositions of both)."""
    dp, up = torch.linalg.eigh(p)
    dq, uq = torch.linalg.eigh(q)
    denom = dq[:, None] + dp[None, :]
    y = (uq.T @ c @ up) / denom.clamp(min=torch.finfo(denom.dtype).eps * max(1.0, float(denom.abs().max())))
    return uq @ y @ up.T


def _vec(m: torch.Tensor) -> torch.Tensor:
    return m.T.reshape(-1)  # column-major, so vec(X Y Z) = (Z^T kron X) vec(Y)


def _distance(g, al, bl, ag, bg) -> float:
    """||G A_g - A_l||^2 + ||B_g G^-1 - B_l||^2 (inf for a singular G)."""
    try:
        b = torch.linalg.solve(g.T, bg.T).T
    except RuntimeError:
        return float("inf")
    value = float((g @ ag - al).pow(2).sum() + (b - bl).pow(2).sum())
    return value if value == value else float("inf")


def _gauss_newton(g, al, bl, ag, bg, iterations: int = 20):
    """Levenberg-Marquardt on the r x r gauge G: the residuals G A_g - A_l (linear in G) and B_g G^-1 - B_l
    (linearised as B_0 - B_l - B_0 dG G^-1); normal equations of size r^2 via Kronecker identities."""
    r = g.shape[0]
    eye = torch.eye(r, dtype=g.dtype)
    best = _distance(g, al, bl, ag, bg)
    damping = 1e-6 * (float((ag @ ag.T).trace()) + float((bl.T @ bl).trace()) + 1e-12)
    for _ in range(iterations):
        g_inv = torch.linalg.inv(g)
        b0 = bg @ g_inv
        r1, r2 = g @ ag - al, b0 - bl
        jtj = torch.kron(ag @ ag.T, eye) + torch.kron(g_inv @ g_inv.T, b0.T @ b0)
        rhs = -_vec(r1 @ ag.T) + _vec(b0.T @ r2 @ g_inv.T)
        for _ in range(8):  # raise the damping until the step lowers the distance
            step = torch.linalg.solve(jtj + damping * torch.eye(r * r, dtype=g.dtype), rhs)
            candidate = g + step.reshape(r, r).T
            value = _distance(candidate, al, bl, ag, bg)
            if value < best:
                break
            damping *= 10
        else:
            return g
        improvement = (best - value) / max(best, 1e-300)
        g, best, damping = candidate, value, damping / 10
        if improvement < 1e-12:
            break
    return g


def align_factors(a_local: torch.Tensor, b_local: torch.Tensor, a_global: torch.Tensor, b_global: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """The factorization (G A_g, B_g G^-1) of the global product B_g A_g closest to the local (A_l, B_l):
    G minimises ||G A_g - A_l||^2 + ||B_g G^-1 - B_l||^2 over invertible r x r matrices.

    Started from the best of the identity and two linear relaxations (Sylvester equations that are exact
    when the global product is the local one, i.e. one site), then refined by Levenberg-Marquardt in the
    r^2 unknowns. With one site the local factors come back. Returns (A, B, aligned); aligned is False (and
    the global factors are returned) when no gauge improves on the global factors or G is worse
    conditioned than MAX_CONDITION.
    """
    dtype = a_global.dtype
    al, bl, ag, bg = (t.detach().to(torch.float64) for t in (a_local, b_local, a_global, b_global))
    eye = torch.eye(ag.shape[0], dtype=torch.float64)
    candidates = [eye, _sylvester(ag @ ag.T, bl.T @ bl, al @ ag.T + bl.T @ bg)]  # G A_g ~ A_l, B_l G ~ B_g
    k = _sylvester(al @ al.T, bg.T @ bg, ag @ al.T + bg.T @ bl)  # K = G^-1: K A_l ~ A_g, B_g K ~ B_l
    if torch.isfinite(k).all() and float(torch.linalg.svdvals(k)[-1]) > 0:
        candidates.append(torch.linalg.inv(k))
    g = min(candidates, key=lambda c: _distance(c, al, bl, ag, bg))
    g = _gauss_newton(g, al, bl, ag, bg)
    s = torch.linalg.svdvals(g)
    if (torch.equal(g, eye) or not torch.isfinite(s).all() or float(s[-1]) <= 0
            or float(s[0] / s[-1]) > MAX_CONDITION):
        return a_global, b_global, False
    a_new = g @ ag
    b_new = torch.linalg.solve(g.T, bg.T).T  # B_g G^-1
    return a_new.to(dtype), b_new.to(dtype), True


def align_state(local: Mapping[str, torch.Tensor], global_state: Mapping[str, torch.Tensor]
                ) -> tuple[dict[str, torch.Tensor], int, int]:
    """The global exchanged state with every LoRA pair aligned to the site's local factors (see
    `align_factors`); other tensors (the head) as sent. Returns (state, pairs aligned, pairs in total)."""
    out = dict(global_state)
    pairs = lora_pairs(list(global_state))
    aligned = 0
    for a_key, b_key in pairs.values():
        a, b, ok = align_factors(local[a_key], local[b_key], global_state[a_key], global_state[b_key])
        out[a_key], out[b_key] = a, b
        aligned += ok
    return out, aligned, len(pairs)


def reset_lora_moments(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Forget the optimizer state (moments, step count) of the LoRA factors; returns how many were reset."""
    n = 0
    for name, p in model.named_parameters():
        if (is_lora_a(name) or is_lora_b(name)) and p in optimizer.state:
            optimizer.state[p] = {}
            n += 1
    return n
