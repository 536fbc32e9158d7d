"""NVFLARE Aggregator for LoRA adapters: FRA-LoRA (exact re-factored average), FRA-LoRA with error
feedback, FedIT and FFA-LoRA, on ``DXO(WEIGHTS)`` contributions of numpy arrays.

Drop-in for ScatterAndGather's ``aggregator`` component. Unlike the in-time accumulating FedAvg
aggregator it keeps the round's contributions until ``aggregate()``, because re-factoring needs
every site's factors together. Two lines of defence, whatever the strategy:

* ``accept()`` vets each contribution on arrival against the global model the server sent this round
  (round, duplicates, the same keys, shapes and float dtypes, finite values, ffa: the frozen A unchanged,
  weigh_by declared: the site's declared count, fixed for the job), so the order in which sites arrive
  changes nothing;
* ``aggregate()`` bounds the updates (``aggregation.screen_updates``: the norm of each site's change
  of B·A and of the head; none (the global model sent back), beyond an absolute cap or a multiple of the
  other sites' median is rejected, above ``clip_update_ratio`` x that median scaled down), so a diverged
  or malicious site cannot move the global model arbitrarily.

No site sets its own weight: weights are equal (``weigh_by: uniform``; every site runs the job's steps) or
the counts the sites' operators declare in their site configs (``declared``), registered with a site's first
contribution, refused when changed, and capped at ``federation.max_weight_share`` of the average.

Every rejection is logged with its reason and lands in the metrics table (row of the round, column
``rejected``); an error while aggregating one contribution rejects that contribution, never the job. With
fewer than ``federation.min_clients`` contributions left the round fails: the job stops before anything is
persisted, so the last saved round stays the last good one.
"""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.fl_constant import ReservedKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.abstract.aggregator import Aggregator
from nvflare.app_common.app_constant import AppConstants

from fedesm import aggregation
from fedesm.flare.payload import METRICS_KEY, N_SAMPLES_KEY, TRANSFER_DTYPE_KEY, read_weights_shareable
from fedesm.keys import fits_within_rank, lora_pairs
from fedesm.settings import FederationSettings, LoraSettings
from fedesm.strategies import STRATEGY


MAX_DECLARED = 10**12  # training sequences a site may declare: more than any protein set, small enough for floats


def declared_count(value: Any) -> tuple[int | None, str | None]:
    """(the count, None) from a site's declared training count, or (None, why it is not one)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        return None, f"declared count {str(value)[:40]!r} is not a number"
    if isinstance(value, (float, np.floating)):
        if not (np.isfinite(value) and float(value).is_integer()):
            return None, f"declared count {float(value):.4g} is not a whole number"
        value = int(value)
    value = int(value)
    if not 1 <= value <= MAX_DECLARED:
        text = str(value) if len(str(value)) < 20 else f"an integer of {len(str(value))} digits"
        return None, f"declared count {text} is not in 1 .. {MAX_DECLARED:.0e}"
    return value, None


class Rejected(Exception):
    """A contribution refused at vetting, with why (one line: logged and written to the metrics table)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Contribution:
    """One site's vetted contribution this round: its arrays, its weight (1, or its declared count) and meta."""
    site: str
    weights: dict[str, np.ndarray]  # empty under secure aggregation: the factors never reach the server
    weight: float
    meta: dict
    key: Any = None  # secure aggregation: the site's signed round key (fedesm.secure.keys.SignedKey)
    rank: int = 0  # secure aggregation: the site's LoRA rank (public: the sketch's width depends on it)


def _check_finite(result: dict) -> None:
    bad = [k for k, v in result.items() if not np.all(np.isfinite(np.asarray(v)))]
    if bad:
        raise FloatingPointError(f"non-finite aggregate in {bad[:3]}")


class FraLoraAggregator(Aggregator):
    def __init__(self, lora: dict | LoraSettings | None = None, federation: dict | FederationSettings | None = None,
                 expected_data_kind: str = DataKind.WEIGHTS, metrics_recorder_id: str = "metrics_recorder"):
        """Aggregate the sites' PEFT LoRA state dicts with a strategy from ``fedesm.aggregation``.

        Args:
            lora: the job's LoRA block; ``r`` is the rank fra/fra-ef re-factor to.
            federation: the job's federation block: ``strategy`` (fra | fra-ef | fedit | ffa),
                ``weigh_by`` (uniform; declared: meta "n_samples", the count the site's operator declares)
                with ``max_weight_share``, ``max_residual_rank`` (fra-ef: cap on the kept residual's rank,
                default K*r), ``max_update_ratio`` / ``max_update_norm`` / ``clip_update_ratio`` (the bounds
                on each site's update) and ``min_clients`` (contributions a round needs after vetting).
            expected_data_kind: only "WEIGHTS": LoRA products are not linear in factor differences,
                so factor diffs (WEIGHT_DIFF) cannot be re-factored.
            metrics_recorder_id: the MetricsRecorder that gets each site's update norm and rejections.
        """
        super().__init__()
        if expected_data_kind != DataKind.WEIGHTS:
            raise ValueError(f"expected_data_kind must be {DataKind.WEIGHTS.value!r}, got {expected_data_kind!r}")
        self.lora = LoraSettings.from_dict(lora, where="FraLoraAggregator")
        self.federation = FederationSettings.from_dict(federation, where="FraLoraAggregator")
        self.strategy = self.federation.strategy
        self.how = STRATEGY[self.strategy]
        self.rank = self.lora.r
        self.weigh_by = self.federation.weigh_by
        self.expected_data_kind = DataKind.WEIGHTS
        self.ef_state = aggregation.AggregationState(max_residual_rank=self.federation.max_residual_rank)
        self.last_round_metrics: dict[str, dict] = {}
        self.last_round_weights: dict[str, float] = {}
        self.last_reject_reason: str | None = None
        self.last_round_checks: dict[str, aggregation.UpdateCheck] = {}
        self.last_round_sites: list[str] = []  # sites whose update reached aggregate() last round
        self.metrics_recorder_id = metrics_recorder_id
        self._lock = threading.Lock()
        self._round = None
        self._contributions: dict[str, Contribution] = {}
        self._round_metrics: dict[str, dict] = {}
        self._reduced_precision = False
        self.declared: dict[str, int] = {}  # weigh_by declared: each site's count, fixed by its first contribution
        # federation.secure_aggregation: contributions are signed keys, the sums run through the workflow's relay
        # (fedesm.flare.secure_gather), which the workflow sets when it starts
        self.secure = self.federation.secure_aggregation
        self.relay = None

    # ---------------------------------------------------------------------------------- accept

    def accept(self, shareable: Shareable, fl_ctx: FLContext) -> bool:
        site = shareable.get_peer_prop(key=ReservedKey.IDENTITY_NAME, default="?")
        with self._lock:
            try:
                got = self._vet(site, shareable, fl_ctx)
            except Rejected as e:
                return self._reject(site, e.reason, fl_ctx)
            except Exception as e:  # noqa: BLE001 - whatever a contribution holds, it refuses only itself
                return self._reject(site, f"could not be vetted ({type(e).__name__}: {str(e)[:200]})", fl_ctx)
            if self.weigh_by == "declared":
                self.declared.setdefault(site, int(got.weight))
            self._contributions[site] = got
            if got.meta.get(TRANSFER_DTYPE_KEY, "float32") != "float32":
                self._reduced_precision = True
            metrics = got.meta.get(METRICS_KEY)
            if isinstance(metrics, dict):
                self._round_metrics[site] = dict(metrics)
        self.log_info(fl_ctx, f"accepted contribution from {site} for round {self._round} (weight {got.weight:g})")
        return True

    def _reject(self, site: str, reason: str, fl_ctx: FLContext) -> bool:
        self.last_reject_reason = reason
        self.log_warning(fl_ctx, f"rejected contribution from {site}: {reason}")
        current = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
        if isinstance(current, int):
            self._record(fl_ctx, current + 1, {site: {"rejected": reason}})
        return False

    def _vet(self, site: str, shareable: Shareable, fl_ctx: FLContext) -> Contribution:
        """The site's contribution, once it passes every check; `Rejected` with why it does not."""
        rc = shareable.get_return_code()
        if rc and rc != ReturnCode.OK:
            raise Rejected(f"return code {rc}")
        if self.secure:
            return self._vet_key(site, shareable, fl_ctx)
        try:
            dxo = from_shareable(shareable)
        except ValueError as e:
            raise Rejected(f"not a DXO ({e})") from None
        if dxo.data_kind != self.expected_data_kind:
            raise Rejected(f"data kind {dxo.data_kind}, expected {self.expected_data_kind.value}")
        self._check_round(site, shareable, fl_ctx)
        try:
            weights, meta = read_weights_shareable(shareable)
        except (ValueError, TypeError) as e:
            raise Rejected(f"unreadable weights ({e})") from None
        if not weights:
            raise Rejected("no weights")
        self._check_arrays(weights, fl_ctx)
        self._check_frozen_a(weights, meta, fl_ctx)
        return Contribution(site, weights, self._weight(site, meta), meta)

    def _vet_key(self, site: str, shareable: Shareable, fl_ctx: FLContext) -> Contribution:
        """Secure aggregation: the site's signed key and rank instead of its factors (its peers verify the key's
        signature; the server cannot)."""
        from fedesm.flare.secure_gather import read_key

        self._check_round(site, shareable, fl_ctx)
        try:
            key, rank, meta = read_key(site, shareable, self.rank)
        except ValueError as e:
            raise Rejected(str(e)) from None
        if not self.how.any_rank and rank != self.rank:
            raise Rejected(f"LoRA rank {rank}; {self.strategy} needs the job's {self.rank}")
        return Contribution(site, {}, 1.0, meta, key=key, rank=rank)

    def _check_round(self, site: str, shareable: Shareable, fl_ctx: FLContext) -> None:
        """This round's, and the site's first of it; a new round starts here if the workflow did not reset."""
        current_round = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
        contribution_round = shareable.get_cookie(
            AppConstants.CONTRIBUTION_ROUND, shareable.get_header(AppConstants.CONTRIBUTION_ROUND)
        )
        if contribution_round != current_round:
            raise Rejected(f"contribution for round {contribution_round}, current round is {current_round}")
        if self._round != current_round:
            if self._contributions:
                self.log_warning(fl_ctx, f"round changed to {current_round} without reset: dropping old contributions")
            self._clear_round()
            self._round = current_round
        if site in self._contributions:
            raise Rejected(f"duplicate contribution in round {current_round}")

    def _weight(self, site: str, meta: dict) -> float:
        """1 (uniform: whatever sizes the site reports about itself weigh nothing) or its declared count."""
        if self.weigh_by != "declared":
            return 1.0
        if meta.get(N_SAMPLES_KEY) is None:
            raise Rejected("federation.weigh_by is declared but the site sends no declared count (its operator "
                           "sets declared_samples in its site config)")
        count, reason = declared_count(meta.get(N_SAMPLES_KEY))
        if reason:
            raise Rejected(reason)
        registered = self.declared.get(site)
        if registered is not None and registered != count:
            raise Rejected(f"declared count changed from {registered} to {count}; a site's count is fixed for the job")
        return float(count)

    def _check_frozen_a(self, weights: dict[str, np.ndarray], meta: dict, fl_ctx: FLContext) -> None:
        """ffa averages B alone, which is exact only if no site trained A: a changed A is refused here."""
        global_weights = self._global_weights(fl_ctx)
        if not self.how.freezes_a or global_weights is None:
            return
        # a frozen A sent back as float16 differs from the global one by rounding (< 2**-11 relative)
        tol = 1e-3 if meta.get(TRANSFER_DTYPE_KEY, "float32") != "float32" else 1e-6
        for a_key, _ in lora_pairs(list(weights)).values():
            ref = np.asarray(global_weights[a_key], dtype=np.float64)
            scale = max(1.0, float(np.max(np.abs(ref))) if ref.size else 1.0)
            diff = float(np.max(np.abs(weights[a_key].astype(np.float64) - ref))) if ref.size else 0.0
            if diff > tol * scale:
                raise Rejected(f"ffa: changed the frozen {a_key!r} (max abs diff {diff:.3g}); "
                               "only lora_B may be trained")

    def _check_arrays(self, weights: dict[str, np.ndarray], fl_ctx: FLContext) -> None:
        """Names, shapes, dtypes and values against the global model sent this round (ScatterAndGather
        always has one); only without it does the round's first contribution serve as the reference.
        Float arrays of another width are cast to the global model's dtype in place."""
        global_weights = self._global_weights(fl_ctx)
        if global_weights is not None:
            missing = [k for k in global_weights if k not in weights]
            if missing:
                raise Rejected(f"missing keys (the global model has them): {missing[:3]}")
            unknown = [k for k in weights if k not in global_weights]
            if unknown:
                raise Rejected(f"unknown keys (not in the global model): {unknown[:3]}")
        for key, arr in weights.items():
            if not np.issubdtype(arr.dtype, np.floating):
                raise Rejected(f"{key!r} is not a float array (dtype {arr.dtype})")
            if global_weights is not None:
                ref = np.asarray(global_weights[key])
                if not self._shape_fits(key, arr.shape, ref.shape):
                    raise Rejected(f"shape of {key!r} is {arr.shape}, global model has {ref.shape}")
                if np.issubdtype(ref.dtype, np.floating) and arr.dtype != ref.dtype:
                    with np.errstate(over="ignore"):
                        arr = weights[key] = arr.astype(ref.dtype)
            if not np.all(np.isfinite(arr)):
                raise Rejected(f"{key!r} has non-finite values")
        if global_weights is None and self._contributions:
            first = next(iter(self._contributions.values()))
            ref_site, ref = first.site, first.weights
            missing = [k for k in ref if k not in weights]
            extra = [k for k in weights if k not in ref]
            if missing or extra:
                raise Rejected(f"keys differ from {ref_site}'s (missing {missing[:3]}, unexpected {extra[:3]})")
            for key, arr in weights.items():
                if not self._shape_fits(key, arr.shape, ref[key].shape, any_rank=True):
                    raise Rejected(f"shape of {key!r} is {arr.shape}, {ref_site} sent {ref[key].shape}")
        self._check_site_rank(weights)

    # Sites of different means (fedesm.ranks): with fra / fra-ef a site's LoRA factors may have a smaller rank
    # than the global model's, A (r_k x d_in) and B (d_out x r_k) with 1 <= r_k <= the global rank, the same
    # r_k for every pair it sends; every other shape must equal the global model's.
    def _shape_fits(self, key: str, shape: tuple, reference: tuple, any_rank: bool = False) -> bool:
        """`shape` against the global model's (a rank at most the global one) or, `any_rank`, another site's
        (the global model bounds it); ranks may differ only under strategies that accept any rank."""
        if not self.how.any_rank:
            return tuple(shape) == tuple(reference)
        return fits_within_rank(key, shape, reference, any_rank=any_rank)

    def _check_site_rank(self, weights: dict[str, np.ndarray]) -> None:
        ranks = {}
        try:
            pairs = lora_pairs(list(weights))
        except ValueError as e:  # a lone factor
            raise Rejected(str(e)) from None
        for a_key, b_key in pairs.values():
            a, b = weights[a_key], weights[b_key]
            if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
                raise Rejected(f"{a_key!r} {a.shape} and {b_key!r} {b.shape} are not one LoRA pair")
            ranks[a_key] = weights[a_key].shape[0]
        if len(set(ranks.values())) > 1:
            raise Rejected(f"LoRA ranks differ between the site's own matrices ({sorted(set(ranks.values()))})")

    @staticmethod
    def _global_weights(fl_ctx: FLContext) -> dict[str, Any] | None:
        """The round's global model weights: a ModelLearnable (ScatterAndGather), an FLModel or a dict."""
        model = fl_ctx.get_prop(AppConstants.GLOBAL_MODEL)
        if model is None:
            return None
        if hasattr(model, "params"):
            model = model.params
        if isinstance(model, dict) and isinstance(model.get("weights"), dict):
            model = model["weights"]
        return model if isinstance(model, dict) and model else None

    # ------------------------------------------------------------------------------- aggregate

    def aggregate(self, fl_ctx: FLContext) -> Shareable:
        if self.secure:
            return self._aggregate_secure(fl_ctx)
        with self._lock:
            round_ = self._round if self._round is not None else fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
            global_state = self._global_weights(fl_ctx)
            sites = self._screen(global_state)
            sites, result, failed = self._combine_usable(sites, global_state)
        self._report(round_, failed, fl_ctx)
        if result is None:
            reason = (f"round {round_}: {len(sites)} usable contribution(s) ({', '.join(sites) or 'none'}), "
                      f"federation.min_clients is {self.federation.min_clients}: stopping; the last saved round is "
                      "the last good one" + (f"; {failed['*']}" if "*" in failed else ""))
            self.log_error(fl_ctx, reason)
            self.system_panic(reason, fl_ctx)
            return DXO(data_kind=DataKind.WEIGHTS, data={}).to_shareable()
        summary = ", ".join(f"{s}={w:.3f}" for s, w in self.last_round_weights.items())
        msg = f"round {round_}: {self.strategy} of {len(sites)} sites, weights by {self.weigh_by}: {summary}"
        if self.how.keeps_residual and self.ef_state.residual_norms:
            msg += f"; max EF residual norm {max(self.ef_state.residual_norms.values()):.3g}"
        self.log_info(fl_ctx, msg)
        meta = {"fedesm_strategy": self.strategy, "aggregated_sites": sites, AppConstants.CURRENT_ROUND: round_}
        return DXO(data_kind=DataKind.WEIGHTS, data=result, meta=meta).to_shareable()

    def _aggregate_secure(self, fl_ctx: FLContext) -> Shareable:
        """The round's sum through the masked passes (fedesm.flare.secure_gather); a site lost between them
        makes the round run again with the others (they train again), up to MAX_RERUNS times; with fewer than
        min_clients sites left, or a sum that does not cancel after the reruns, the job stops with the reason
        and the last saved round stays the last good one. An incomplete sum is never used."""
        from fedesm.flare.secure_gather import MAX_RERUNS, SitesLost, secure_round

        round_ = self._round if self._round is not None else fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
        global_state = self._global_weights(fl_ctx)
        need = max(2, self.federation.min_clients)
        for attempt in range(MAX_RERUNS + 1):
            with self._lock:
                got = dict(self._contributions)
            roster = sorted(got)
            if len(roster) < need or self.relay is None:
                why = ("no workflow relays the secure passes" if self.relay is None else
                       f"{len(roster)} site(s) with a key ({', '.join(roster) or 'none'}); a secure sum needs "
                       f"{need} (federation.min_clients, and never fewer than 2)")
                return self._stop(fl_ctx, f"round {round_}: {why}: stopping; the last saved round is the last good one")
            try:
                result = secure_round(self.relay, roster, {s: got[s].key for s in roster},
                                      {s: got[s].rank for s in roster}, global_state, job_id=fl_ctx.get_job_id(),
                                      round_num=int(round_), attempt=attempt, strategy=self.strategy, rank=self.rank,
                                      ef_state=self.ef_state if self.how.keeps_residual else None,
                                      server_lr=self.federation.server_lr,
                                      timeout=self.federation.secure_pass_timeout, fl_ctx=fl_ctx)
                _check_finite(result)
            except SitesLost as e:
                self.log_warning(fl_ctx, f"round {round_}: secure sum not used ({e}); "
                                 + ("the round runs again" if attempt < MAX_RERUNS else "no rerun left"))
                if isinstance(round_, int):
                    self._record(fl_ctx, round_ + 1, {s: {"rejected": f"secure pass: {why}"}
                                                      for s, why in e.sites.items()})
                if attempt == MAX_RERUNS:
                    break
                survivors = [s for s in roster if s not in e.sites] if e.sites else roster
                if len(survivors) < need:
                    return self._stop(fl_ctx, f"round {round_}: lost {', '.join(e.sites)} between the secure passes; "
                                      f"{len(survivors)} site(s) left ({', '.join(survivors) or 'none'}), a secure "
                                      f"sum needs {need} (federation.min_clients, and never fewer than 2): stopping; "
                                      "the last saved round is the last good one")
                with self._lock:
                    self._clear_round()
                    self._round = round_
                self.log_info(fl_ctx, f"round {round_}: running again with {', '.join(survivors)} (they train "
                                      "again: fresh keys and masks)")
                self.relay.retrain(survivors, fl_ctx)
                continue
            self.last_round_weights = dict(zip(roster, [1.0 / len(roster)] * len(roster)))
            self.last_round_sites = list(roster)
            self.last_round_checks = {}
            self.last_round_metrics = {s: m for s, m in self._round_metrics.items() if s in roster}
            self.log_info(fl_ctx, f"round {round_}: secure {self.strategy} of {len(roster)} sites (uniform weights; "
                                  "the server saw only masked messages and their sums)")
            meta = {"fedesm_strategy": self.strategy, "aggregated_sites": roster, AppConstants.CURRENT_ROUND: round_}
            return DXO(data_kind=DataKind.WEIGHTS, data=result, meta=meta).to_shareable()
        return self._stop(fl_ctx, f"round {round_}: the secure sum failed {MAX_RERUNS + 1} times: stopping; the last "
                                  "saved round is the last good one")

    def _stop(self, fl_ctx: FLContext, reason: str) -> Shareable:
        self.log_error(fl_ctx, reason)
        self.system_panic(reason, fl_ctx)
        return DXO(data_kind=DataKind.WEIGHTS, data={}).to_shareable()

    def _screen(self, global_state) -> list[str]:
        """The bounds on each vetted update (`aggregation.screen_updates`): the sites that pass, by name (not
        arrival: the same inputs give the same bits)."""
        fed = self.federation
        vetted = sorted(self._contributions)
        checks = aggregation.screen_updates([self._contributions[s].weights for s in vetted], global_state,
                                            max_ratio=fed.max_update_ratio, max_norm=fed.max_update_norm,
                                            clip_ratio=fed.clip_update_ratio)
        self.last_round_checks = dict(zip(vetted, checks))
        self.last_round_sites = list(vetted)
        return [s for s, c in zip(vetted, checks) if c.reason is None]

    def _combine_usable(self, sites: list[str], global_state) -> tuple[list[str], dict | None, dict[str, str]]:
        """The strategy over `sites`; a contribution that breaks it is refused alone ('*': none could be
        blamed) while at least `min_clients` remain. Returns the sites used, the result (None: the round
        fails) and the refused sites with why."""
        failed: dict[str, str] = {}
        while len(sites) >= self.federation.min_clients:
            try:
                result, shares = self._combine(sites, global_state)
            except Exception as e:  # noqa: BLE001 - find the contribution that breaks it, refuse only that one
                culprits = self._culprits(sites, global_state) or {}
                if not culprits:
                    failed["*"] = f"aggregation failed ({type(e).__name__}: {str(e)[:200]})"
                    return [], None, failed
                failed.update(culprits)
                sites = [s for s in sites if s not in culprits]
                continue
            self.last_round_weights = dict(zip(sites, shares))
            self.last_round_metrics = {s: m for s, m in self._round_metrics.items() if s in sites}
            return sites, result, failed
        return sites, None, failed

    def _report(self, round_, failed: dict[str, str], fl_ctx: FLContext) -> None:
        """Each screened site's update norm, scale and rejection, logged and written to the round's row."""
        verdicts = {}
        for site, check in self.last_round_checks.items():
            verdicts[site] = {"update_norm": check.norm, "update_norm_ratio": check.ratio}
            if check.scale < 1:
                verdicts[site]["update_scale"] = check.scale
            reason = check.reason or failed.get(site)
            if reason:
                verdicts[site]["rejected"] = reason
                self.log_warning(fl_ctx, f"round {round_}: rejected the update of {site}: {reason}")
        if isinstance(round_, int):
            self._record(fl_ctx, round_ + 1, verdicts)

    def shares(self, sites: list[str]) -> np.ndarray:
        """Each site's share of the average: equal, or by the declared counts capped at max_weight_share."""
        if self.weigh_by != "declared":
            return np.full(len(sites), 1.0 / len(sites))
        counts = [self.declared.get(s, self._contributions[s].weight) for s in sites]
        return aggregation.capped_shares(counts, self.federation.max_weight_share)

    def _combine(self, sites: list[str], global_state) -> tuple[dict, list[float]]:
        """The strategy over `sites`; an update scaled down by the screen (scale c < 1) enters as
        G + c (site - G): its share c goes to the site, 1 - c to the global model, a term of its own."""
        shares = self.shares(sites)
        states = [self._contributions[s].weights for s in sites]
        scales = np.array([self.last_round_checks[s].scale if s in self.last_round_checks else 1.0 for s in sites])
        weights = shares * scales
        if global_state is not None and np.any(scales < 1):
            states = [*states, global_state]
            weights = np.concatenate([weights, [float(np.sum(shares * (1 - scales)))]])
        saved = copy.deepcopy(self.ef_state) if self.how.keeps_residual else None
        try:
            result = aggregation.aggregate(
                states,
                weights,
                strategy=self.strategy,
                rank=self.rank,
                state=self.ef_state if self.how.keeps_residual else None,
                global_state=global_state,
                ffa_tol=1e-3 if self._reduced_precision else 1e-6,
                server_lr=self.federation.server_lr,
            )
            _check_finite(result)
        except Exception:
            if saved is not None:  # a failed fra-ef round leaves the residual as it was
                self.ef_state = saved
            raise
        return result, [float(x) for x in shares]

    def _culprits(self, sites: list[str], global_state) -> dict[str, str]:
        """The sites whose contribution alone cannot be aggregated, with why (on a copy of the fra-ef state)."""
        found = {}
        for site in sites:
            try:
                self._combine_alone(site, global_state)
            except Exception as e:  # noqa: BLE001
                found[site] = f"cannot be aggregated ({type(e).__name__}: {str(e)[:200]})"
        return found

    def _combine_alone(self, site: str, global_state) -> None:
        states = [self._contributions[site].weights]
        if global_state is not None:
            states.append(global_state)
        result = aggregation.aggregate(states, [1.0] * len(states), strategy=self.strategy, rank=self.rank,
                                       state=copy.deepcopy(self.ef_state) if self.how.keeps_residual else None,
                                       global_state=global_state, ffa_tol=1e-3 if self._reduced_precision else 1e-6)
        _check_finite(result)

    def residuals(self) -> dict[str, tuple[np.ndarray, np.ndarray]] | None:
        """The error-feedback residual factors a saved round keeps (None: the strategy keeps none)."""
        with self._lock:
            return dict(self.ef_state.residuals) if self.how.keeps_residual else None

    def restore_ef_state(self, residuals: dict, rounds: int) -> None:
        """Continue fra-ef from a saved round (a resumed job): its residual factors and round count."""
        with self._lock:
            self.ef_state.clear()
            for pair, (a_res, b_res) in residuals.items():
                a64, b64 = np.asarray(a_res, dtype=np.float64), np.asarray(b_res, dtype=np.float64)
                self.ef_state.residuals[pair] = (a64, b64)
                self.ef_state.residual_norms[pair] = aggregation.product_norm(a64, b64)
            self.ef_state.rounds = int(rounds)

    def _record(self, fl_ctx: FLContext, row: int, values_by_site: dict[str, dict]) -> None:
        """Hand per-site values to the metrics recorder (absent in bare unit set-ups)."""
        engine = fl_ctx.get_engine()
        recorder = engine.get_component(self.metrics_recorder_id) if engine and self.metrics_recorder_id else None
        if recorder is None or not hasattr(recorder, "record"):
            return
        for site, values in values_by_site.items():
            recorder.record(row, site, values)

    def reset(self, fl_ctx: FLContext):
        """Forget this round's contributions; the fra-ef residual is kept on purpose."""
        with self._lock:
            self._clear_round()

    def _clear_round(self) -> None:
        self._contributions = {}
        self._round_metrics = {}
        self._round = None
        self._reduced_precision = False
