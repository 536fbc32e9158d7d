"""The aggregation strategies as one table: what each one does, looked up wherever it matters.

Settings, the aggregation core, the server's aggregator and persistor and the site's optimizer state
ask a strategy's record (`STRATEGY["fra-ef"].keeps_residual`) instead of testing its name, so a new
strategy is one row here plus its arithmetic in ``fedesm.aggregation`` (as PEFT dispatches its variants).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Strategy:
    name: str
    refactors: bool  # the global pair is re-factored from the averaged product B·A (a new basis every round)
    any_rank: bool  # a site may send factors of a smaller rank than the job's (products of any rank average)
    keeps_residual: bool  # the server keeps the truncated tail between rounds (error feedback)
    freezes_a: bool  # sites train only lora_B; the server keeps A as it sent it
    optimizer_state: str  # what `auto` means for a site's optimizer state (fedesm.training.optimizer_state)
    secure: bool = False  # has a secure-aggregation path in fedesm.secure (re-factoring: the two-pass sketch;
    #                       averaging: one masked sum)


STRATEGY = {s.name: s for s in (
    Strategy("fra", refactors=True, any_rank=True, keeps_residual=False, freezes_a=False, optimizer_state="align",
             secure=True),
    Strategy("fra-ef", refactors=True, any_rank=True, keeps_residual=True, freezes_a=False, optimizer_state="align",
             secure=True),
    Strategy("fedit", refactors=False, any_rank=False, keeps_residual=False, freezes_a=False, optimizer_state="keep",
             secure=True),
    Strategy("ffa", refactors=False, any_rank=False, keeps_residual=False, freezes_a=True, optimizer_state="keep",
             secure=True),
)}
STRATEGIES = tuple(STRATEGY)  # the names, in the table's order
