"""The server's side of a secure round in NVFLARE (federation.secure_aggregation): the sites' signed keys
arrive with their train results; the masked passes run through the workflow's relay; a site lost between
the passes makes the round run again with the sites left, who train again (fresh keys, fresh masks).

The aggregator (`fedesm.flare.aggregator.FraLoraAggregator`) hands a secure round here; the maths is
`fedesm.secure.rounds.ServerRound` and sees only masked words and their sums. `Relay` is what the workflow
(`fedesm.flare.workflows.ScatterAndGather`) lends: one task to chosen sites, and the train task again.
"""

from __future__ import annotations

import copy
import hashlib
from typing import Any, Mapping, Protocol, Sequence

import numpy as np

from nvflare.apis.dxo import DataKind, from_shareable
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable

from fedesm.errors import FedesmError
from fedesm.flare.payload import RANK_KEY, SECURE_STEP_KEY, SECURE_TASKS
from fedesm.secure import wire
from fedesm.secure.keys import SignedKey
from fedesm.secure.rounds import ServerRound

MAX_RERUNS = 2  # a round runs at most this many more times before the job ends with the reason


class Relay(Protocol):
    def exchange(self, task_name: str, data: dict, sites: Sequence[str], timeout: int,
                 fl_ctx: FLContext) -> dict[str, Shareable]: ...

    def retrain(self, sites: Sequence[str], fl_ctx: FLContext) -> None: ...


class SitesLost(Exception):
    """Sites whose message of a pass did not arrive or could not be used (``sites`` empty: the sum did not
    cancel and no one site can be blamed); the round's sums are never used."""

    def __init__(self, sites: Mapping[str, str], reason: str = ""):
        super().__init__(reason or "; ".join(f"{s}: {why}" for s, why in sites.items()))
        self.sites = dict(sites)


def read_key(site: str, shareable: Shareable, max_rank: int) -> tuple[SignedKey, int, dict]:
    """A site's key message (its train reply): the signed key, its LoRA rank and the DXO meta.
    ValueError with why when it is not one."""
    dxo = from_shareable(shareable)
    meta = dxo.meta or {}
    if dxo.data_kind != DataKind.COLLECTION or meta.get(SECURE_STEP_KEY) != "keys":
        raise ValueError(f"a {dxo.data_kind} result, not a secure-aggregation key (the job aggregates securely)")
    rank = meta.get(RANK_KEY)
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or not 1 <= int(rank) <= max_rank:
        raise ValueError(f"LoRA rank {str(rank)[:20]!r}, the job's is {max_rank}")
    try:
        key = wire.key_from_arrays(dxo.data or {}, site)
    except FedesmError as e:
        raise ValueError(str(e)) from None
    return key, int(rank), meta


def plan_seed(job_id: str, round_num: int, attempt: int) -> int:
    """The sketch's public seed: fresh for each round and each rerun of it."""
    return int.from_bytes(hashlib.sha256(f"{job_id}:{round_num}:{attempt}".encode()).digest()[:4], "big")


def _messages(replies: Mapping[str, Shareable], roster: Sequence[str], step: str):
    lost, out = {}, []
    for site in roster:
        reply = replies.get(site)
        if reply is None:
            lost[site] = f"no {step} message (lost or timed out)"
            continue
        rc = reply.get_return_code(ReturnCode.OK)
        if rc != ReturnCode.OK:
            lost[site] = f"{step} failed at the site (return code {rc})"
            continue
        try:
            dxo = from_shareable(reply)
            if (dxo.meta or {}).get(SECURE_STEP_KEY) != step:
                raise FedesmError(f"a reply for step {(dxo.meta or {}).get(SECURE_STEP_KEY)!r}")
            out.append(wire.message_from_arrays(dxo.data or {}, site))
        except (FedesmError, ValueError, TypeError) as e:
            lost[site] = f"an unusable {step} message ({str(e)[:200]})"
    if lost:
        raise SitesLost(lost)
    return out


def _unmasked(step_fn, messages):
    try:
        return step_fn(messages)
    except FedesmError as e:  # the masks did not cancel, or a message had the wrong size: nobody to blame alone
        raise SitesLost({}, str(e)) from None


def secure_round(relay: Relay, roster: Sequence[str], keys: Mapping[str, SignedKey], ranks: Mapping[str, int],
                 global_state: Mapping[str, Any], *, job_id: str, round_num: int, attempt: int, strategy: str,
                 rank: int, ef_state, server_lr: float, timeout: int, fl_ctx: FLContext) -> dict[str, Any]:
    """One try at a secure round over `roster` (the sites whose keys arrived): the global state, or SitesLost.
    fra-ef's residual (`ef_state`) changes only when the round completes."""
    state = copy.deepcopy(ef_state) if ef_state is not None else None
    server = ServerRound(roster, global_state, job_id=job_id, round_num=round_num,
                         seed=plan_seed(job_id, round_num, attempt), strategy=strategy, rank=rank,
                         site_ranks={s: ranks[s] for s in roster}, state=state, server_lr=server_lr)
    relayed = wire.keys_to_arrays({s: keys[s] for s in roster})
    if server.first_step == "sum":
        replies = relay.exchange(SECURE_TASKS["sum"], relayed, roster, timeout, fl_ctx)
        result = _unmasked(server.take_sum, _messages(replies, roster, "sum"))
    else:
        replies = relay.exchange(SECURE_TASKS["pass1"], {**relayed, **wire.plan_to_arrays(server.plan)}, roster,
                                 timeout, fl_ctx)
        bases = _unmasked(server.take_pass1, _messages(replies, roster, "pass1"))
        replies = relay.exchange(SECURE_TASKS["pass2"], wire.bases_to_arrays(bases), roster, timeout, fl_ctx)
        result = _unmasked(server.take_pass2, _messages(replies, roster, "pass2"))
    if ef_state is not None:
        ef_state.residuals, ef_state.residual_norms, ef_state.rounds = state.residuals, state.residual_norms, \
            state.rounds
    return result
