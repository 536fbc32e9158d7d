"""One secure round, part by part: what each site and the server compute, in the order the messages flow
(keys, then for fra / fra-ef the sketch's pass 1 and pass 2, for fedit / ffa one masked sum).
Transport-free: the NVFLARE glue is to carry these objects (docs/architecture.md, "Secure
aggregation"); ``run_round`` plays a whole round in one process.

A round's roster (its sites) is fixed when the keys are exchanged: masks cancel only over exactly those
sites, so a site lost after that point cannot be left out of a sum; the round is run again with the
sites left (new keys, new masks), never finished with a partial sum.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from fedesm.aggregation import AggregationState, _like, _normalise_weights, _to_f64
from fedesm.errors import FedesmError
from fedesm.keys import lora_pairs
from fedesm.secure import masking
from fedesm.secure.keys import SignedKey, load_root, new_key_pair, shared_secrets, sign_public_key
from fedesm.secure.sketch import ServerSketch, SketchPlan, site_pass1, site_pass2
from fedesm.strategies import STRATEGY

SECURE_STRATEGIES = tuple(name for name, how in STRATEGY.items() if how.secure)


def context(job_id: str, round_num: int, step: str) -> bytes:
    """What a signature or a mask is bound to: the job, the round and the step (keys, pass1, pass2)."""
    return f"{job_id}\x00{int(round_num)}\x00{step}".encode()


def pass_context(job_id: str, round_num: int, step: str, roster: Sequence[str], sent: bytes) -> bytes:
    """A pass's mask context, bound to the roster and to a digest of what the server sent for it (the plan,
    the bases). A server that sends one site other bases (Q_k = 0 for all sites but one would make the sum
    that one site's term) or another roster makes that site's masks differ from its peers': the sum does
    not cancel and is refused (``masking.unmask_sum``'s check word)."""
    h = hashlib.sha256("\x00".join(sorted(roster)).encode() + b"\x01" + sent).hexdigest()
    return context(job_id, round_num, step) + b"\x00" + h.encode()


def plan_bytes(plan: SketchPlan) -> bytes:
    return f"{plan.seed}:".encode() + ";".join(f"{k}={v}" for k, v in sorted(plan.widths.items())).encode()


def bases_bytes(bases: Mapping[str, np.ndarray]) -> bytes:
    h = hashlib.sha256()
    for name in sorted(bases):
        q = np.ascontiguousarray(bases[name], dtype="<f8")
        h.update(name.encode() + b"\x00" + str(q.shape).encode() + b"\x00" + q.tobytes())
    return h.digest()


def site_weights(weights: Mapping[str, float]) -> dict[str, float]:
    """Every site's normalised weight, from weights every party knows before the round (the job's)."""
    names = sorted(weights)
    return dict(zip(names, _normalise_weights([weights[n] for n in names], len(names)).tolist()))


@dataclass
class SiteRound:
    """A site's part of one round: its key pair, its secrets with the other sites, its two messages."""

    site: str
    startup: Path
    job_id: str
    round_num: int
    weight: Optional[float] = None  # None: 1 / the roster's size (weigh_by uniform), set when the keys arrive
    min_sites: int = 2  # the job's min_clients: a smaller roster is refused (alone, a site's message is plaintext)
    secrets: dict[str, bytes] = field(default_factory=dict)
    roster: tuple[str, ...] = ()

    def __post_init__(self):
        self._private, public = new_key_pair()
        self.signed_key = sign_public_key(self.site, self._context("keys"), public, self.startup)

    def _context(self, step: str) -> bytes:
        return context(self.job_id, self.round_num, step)

    def agree(self, keys: Mapping[str, SignedKey]) -> None:
        """The secrets with every other site of the roster (``keys``: every site's signed key, own included)."""
        if self.site not in keys or keys[self.site].public != self.signed_key.public:
            raise FedesmError(f"secure aggregation: the roster the server sent does not carry site {self.site!r}'s "
                              "own key; refused")
        if len(keys) < max(2, self.min_sites):
            raise FedesmError(f"secure aggregation: site {self.site!r} was sent a roster of {len(keys)} site(s) "
                              f"({sorted(keys)}); the job needs at least {max(2, self.min_sites)}, and a sum over "
                              "fewer would show too much of one site's update; refused")
        peers = {s: k for s, k in keys.items() if s != self.site}
        self.secrets = shared_secrets(self._private, peers, self._context("keys"), load_root(self.startup))
        self.roster = tuple(sorted(keys))
        if self.weight is None:
            self.weight = 1.0 / len(self.roster)

    def pass1(self, state: Mapping[str, Any], plan: SketchPlan) -> masking.MaskedMessage:
        terms = site_pass1(state, self.weight, plan)
        return masking.mask(masking.flatten(terms, masking.layout_of(terms)), self.site, self.secrets,
                            pass_context(self.job_id, self.round_num, "pass1", self.roster, plan_bytes(plan)))

    def average(self, state: Mapping[str, Any], layout: masking.Layout) -> masking.MaskedMessage:
        """fedit / ffa: the site's weighted tensors in one masked message (one pass)."""
        return masking.mask(_weighted(state, self.weight, layout), self.site, self.secrets,
                            pass_context(self.job_id, self.round_num, "sum", self.roster, repr(layout).encode()))

    def pass2(self, state: Mapping[str, Any], bases: Mapping[str, np.ndarray]) -> masking.MaskedMessage:
        terms = site_pass2(state, self.weight, bases)
        return masking.mask(masking.flatten(terms, masking.layout_of(terms)), self.site, self.secrets,
                            pass_context(self.job_id, self.round_num, "pass2", self.roster, bases_bytes(bases)))


def averaged_layout(global_state: Mapping[str, Any], freezes_a: bool) -> masking.Layout:
    """fedit / ffa: every tensor is a plain weighted sum, in the global model's order; ffa sends no lora_A (the
    server keeps the A it sent: a secure sum cannot show that no site changed it)."""
    frozen = {a for a, _ in lora_pairs(list(global_state)).values()} if freezes_a else set()
    return tuple((k, tuple(np.shape(global_state[k]))) for k in sorted(global_state) if k not in frozen)


def _weighted(state: Mapping[str, Any], weight: float, layout: masking.Layout) -> np.ndarray:
    return masking.flatten({k: weight * np.asarray(_to_f64(state[k])) for k, _ in layout}, layout)


def pass_layouts(global_state: Mapping[str, Any], plan: SketchPlan) -> tuple[masking.Layout, masking.Layout]:
    """The flat layouts of the two passes, from the global model and the plan: pairs, then the other tensors,
    each sorted by name (the order `sketch.site_pass1/2` make their terms in, whatever order a state has)."""
    pairs = lora_pairs(list(global_state))
    lora_keys = {k for pair in pairs.values() for k in pair}
    first, second = [], []
    for name, (a_key, b_key) in sorted(pairs.items()):  # sorted: the order every party flattens in
        d_in, d_out, s = np.shape(global_state[a_key])[1], np.shape(global_state[b_key])[0], plan.widths[name]
        first.append((name, (d_out, s)))
        second.append((name, (s, d_in)))
    first += [(k, tuple(np.shape(global_state[k]))) for k in sorted(global_state) if k not in lora_keys]
    return tuple(first), tuple(second)


class ServerRound:
    """The server's side of one secure round, between the masked sums it receives: fra / fra-ef plan the
    sketch (``first_step`` "pass1"), turn the pass-1 sum into bases and the pass-2 sum into the global
    factors; fedit / ffa take one masked sum (``first_step`` "sum"). It never sees a single site's term.

    ``site_ranks`` are public (each site's LoRA rank, the job's or its own, sent with its key): the plan's
    widths depend on their sum. ``state`` keeps fra-ef's residual between rounds.
    """

    def __init__(self, roster: Sequence[str], global_state: Mapping[str, Any], *, job_id: str, round_num: int,
                 seed: int, strategy: str = "fra", rank: int | None = None, site_ranks: Mapping[str, int] | None = None,
                 state: AggregationState | None = None, server_lr: float = 1.0, oversample: int | None = None):
        if strategy not in SECURE_STRATEGIES:
            raise FedesmError(f"secure aggregation supports {', '.join(SECURE_STRATEGIES)}, not {strategy!r}")
        if STRATEGY[strategy].keeps_residual and state is None:
            raise FedesmError(f"{strategy} needs an AggregationState kept between rounds")
        self.roster = tuple(sorted(roster))
        self.global_state, self.job_id, self.round_num = global_state, job_id, int(round_num)
        self.strategy, self.server_lr, self.state = strategy, float(server_lr), state
        self.refactors = STRATEGY[strategy].refactors
        self.first_step = "pass1" if self.refactors else "sum"
        if not self.refactors:
            self.layout = averaged_layout(global_state, STRATEGY[strategy].freezes_a)
            return
        self.pairs = lora_pairs(list(global_state))
        if not self.pairs:
            raise FedesmError("secure aggregation: the global model has no LoRA pairs to re-factor")
        first_a = next(iter(self.pairs.values()))[0]
        ranks = dict(site_ranks or {})
        if sorted(ranks) != list(self.roster):
            raise FedesmError(f"secure aggregation: ranks for {sorted(ranks)}, roster {list(self.roster)}")
        self.residuals = state if STRATEGY[strategy].keeps_residual else None
        extras: dict[str, list] = {}
        res_rank = 0
        for name in self.pairs:
            if self.residuals is not None and name in self.residuals.residuals:
                a_res, b_res = self.residuals.residuals[name]
                extras.setdefault(name, []).append((a_res, b_res, 1.0))
                res_rank = max(res_rank, a_res.shape[0])
        global_rank = 0
        if self.server_lr != 1.0:  # the global pair is one more term, as in aggregation.aggregate
            for name, (a_key, b_key) in self.pairs.items():
                extras.setdefault(name, []).append((global_state[a_key], global_state[b_key], 1.0 - self.server_lr))
            global_rank = int(np.shape(global_state[first_a])[0])
        self.site_rank = sum(ranks.values()) + global_rank
        kwargs = {} if oversample is None else {"oversample": oversample}
        self.plan = SketchPlan.for_model(seed, global_state, self.site_rank + res_rank, **kwargs)
        self.layout1, self.layout2 = pass_layouts(global_state, self.plan)
        self.sketch = ServerSketch(self.plan, extras, scale=self.server_lr)
        self.out_rank = int(rank) if rank is not None else max(ranks.values())
        self.first = None

    def context(self, step: str, sent: bytes) -> bytes:
        return pass_context(self.job_id, self.round_num, step, self.roster, sent)

    def sum_context(self) -> bytes:
        return self.context("sum", repr(self.layout).encode())

    def pass1_context(self) -> bytes:
        return self.context("pass1", plan_bytes(self.plan))

    def take_sum(self, messages: Sequence[masking.MaskedMessage]) -> dict[str, Any]:
        """fedit / ffa: the global state from the one masked sum."""
        total = masking.unflatten(masking.unmask_sum(messages, self.roster, self.sum_context()), self.layout)
        g = self.global_state
        out = {k: _like(self.server_lr * total[k] + (1.0 - self.server_lr) * _to_f64(g[k]), g[k]) for k in total}
        return {k: out.get(k, g[k]) for k in g}  # ffa: A as the server sent it

    def take_pass1(self, messages: Sequence[masking.MaskedMessage]) -> dict[str, np.ndarray]:
        """The bases Q of every pair (sent to the sites for pass 2) from the pass-1 sum."""
        self.first = masking.unflatten(masking.unmask_sum(messages, self.roster, self.pass1_context()), self.layout1)
        self.bases = self.sketch.bases({name: self.first[name] for name in self.pairs})
        return self.bases

    def take_pass2(self, messages: Sequence[masking.MaskedMessage]) -> dict[str, Any]:
        """The global state (fra / fra-ef) from the pass-2 sum."""
        if self.first is None:
            raise FedesmError("secure aggregation: pass 2 before pass 1")
        ctx = self.context("pass2", bases_bytes(self.bases))
        second = masking.unflatten(masking.unmask_sum(messages, self.roster, ctx), self.layout2)
        floor = masking.noise_floor(len(self.roster), max((int(np.prod(s)) for _, s in self.layout2), default=1))
        factors = self.sketch.finish({name: second[name] for name in self.pairs}, self.out_rank, self.residuals,
                                     residual_cap=self.site_rank, noise_floor=floor)
        g, out = self.global_state, {}
        for name, (a_key, b_key) in self.pairs.items():
            out[a_key] = _like(factors[name][0], g[a_key])
            out[b_key] = _like(factors[name][1], g[b_key])
        for k, _shape in self.layout1[len(self.pairs):]:
            out[k] = _like(self.server_lr * self.first[k]
                           + (1.0 - self.server_lr) * np.asarray(g[k], dtype=np.float64), g[k])
        if self.residuals is not None:
            self.residuals.rounds += 1
        return {k: out[k] for k in g}


def check_plan(plan: SketchPlan, global_state: Mapping[str, Any]) -> None:
    """A site's check of the server's plan: the job's LoRA pairs, each width in 1 .. min(d_in, d_out) (a wider
    sketch adds nothing; the plan is bound into the masks, so every site got the same one)."""
    pairs = lora_pairs(list(global_state))
    if set(plan.widths) != set(pairs):
        raise FedesmError("secure aggregation: the server's sketch plan does not name the job's LoRA pairs")
    for name, (a_key, b_key) in pairs.items():
        limit = min(np.shape(global_state[a_key])[1], np.shape(global_state[b_key])[0])
        if not 1 <= plan.widths[name] <= limit:
            raise FedesmError(f"secure aggregation: the server's sketch width {plan.widths[name]} for {name} is "
                              f"outside 1..{limit}; refused")


def run_round(sites: Mapping[str, tuple[Mapping[str, Any], Path]], weights: Mapping[str, float],
              global_state: Mapping[str, Any], *, job_id: str, round_num: int, seed: int, strategy: str = "fra",
              rank: int | None = None, state: AggregationState | None = None, server_lr: float = 1.0,
              oversample: int | None = None) -> dict[str, Any]:
    """One whole secure round in this process: ``sites[name] = (its trained state, its kit's startup dir)``.

    Returns the global state dict ``aggregation.aggregate`` would return for the same states (fra, fra-ef
    through the two-pass sketch, ``state`` keeping fra-ef's residual; fedit, ffa as one masked sum;
    ``server_lr`` steps from ``global_state``), computed by a server that only ever sees the signed keys and
    the masked messages (``ServerRound``).
    """
    if strategy not in SECURE_STRATEGIES:
        raise FedesmError(f"secure aggregation supports {', '.join(SECURE_STRATEGIES)}, not {strategy!r}")
    w = site_weights(weights)
    roster = sorted(sites)
    if sorted(w) != roster:
        raise FedesmError(f"secure aggregation: weights for {sorted(w)}, sites {roster}")
    parts = {s: SiteRound(s, Path(sites[s][1]), job_id, round_num, w[s]) for s in roster}
    keys = {s: p.signed_key for s, p in parts.items()}  # relayed by the server
    for p in parts.values():
        p.agree(keys)
    pairs = lora_pairs(list(global_state))
    first_a = next(iter(pairs.values()))[0] if pairs else None
    # A site's rank is public (sent with its key); read from the states here only because this plays every part.
    ranks = {s: int(np.shape(sites[s][0][first_a])[0]) for s in roster} if first_a else None
    server = ServerRound(roster, global_state, job_id=job_id, round_num=round_num, seed=seed, strategy=strategy,
                         rank=rank, site_ranks=ranks, state=state, server_lr=server_lr, oversample=oversample)
    if server.first_step == "sum":
        return server.take_sum([parts[s].average(sites[s][0], server.layout) for s in roster])
    bases = server.take_pass1([parts[s].pass1(sites[s][0], server.plan) for s in roster])
    return server.take_pass2([parts[s].pass2(sites[s][0], bases) for s in roster])
