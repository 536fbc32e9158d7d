"""NVFLARE Aggregator for LoRA adapters: FRA-LoRA (exact re-factored average), FRA-LoRA with error
feedback, FedIT and FFA-LoRA, on ``DXO(WEIGHTS)`` contributions of numpy arrays.

Drop-in for ScatterAndGather's ``aggregator`` component. Unlike the in-time accumulating FedAvg
aggregator it keeps the round's contributions until ``aggregate()``, because re-factoring needs
every site's factors together. Contributions are vetted in ``accept()`` (round, duplicates, keys,
shapes, finiteness, weight) so one bad site cannot poison the global adapter.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.fl_constant import ReservedKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.abstract.aggregator import Aggregator
from nvflare.app_common.app_constant import AppConstants

from fedesm import aggregation
from fedesm.flare.payload import METRICS_KEY, N_SAMPLES_KEY, TRANSFER_DTYPE_KEY, read_weights_shareable
from fedesm.settings import FederationSettings, LoraSettings


def _is_positive_number(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return False
    return bool(np.isfinite(value)) and value > 0


class FraLoraAggregator(Aggregator):
    def __init__(self, lora: dict | LoraSettings | None = None, federation: dict | FederationSettings | None = None,
                 expected_data_kind: str = DataKind.WEIGHTS):
        """Aggregate the sites' PEFT LoRA state dicts with a strategy from ``fedesm.aggregation``.

        Args:
            lora: the job's LoRA block; ``r`` is the rank fra/fra-ef re-factor to.
            federation: the job's federation block: ``strategy`` (fra | fra-ef | fedit | ffa),
                ``weigh_by`` (samples: meta "n_samples"; steps: meta NUM_STEPS_CURRENT_ROUND; uniform),
                ``max_residual_rank`` (fra-ef: cap on the kept residual's rank, default K*r).
            expected_data_kind: only "WEIGHTS": LoRA products are not linear in factor differences,
                so factor diffs (WEIGHT_DIFF) cannot be re-factored.
        """
        super().__init__()
        if expected_data_kind != DataKind.WEIGHTS:
            raise ValueError(f"expected_data_kind must be {DataKind.WEIGHTS.value!r}, got {expected_data_kind!r}")
        self.lora = LoraSettings.from_dict(lora, where="FraLoraAggregator")
        self.federation = FederationSettings.from_dict(federation, where="FraLoraAggregator")
        self.strategy = self.federation.strategy
        self.rank = self.lora.r
        self.weigh_by = self.federation.weigh_by
        self.expected_data_kind = DataKind.WEIGHTS
        self.ef_state = aggregation.AggregationState(max_residual_rank=self.federation.max_residual_rank)
        self.last_round_metrics: dict[str, dict] = {}
        self.last_round_weights: dict[str, float] = {}
        self.last_reject_reason: str | None = None
        self._lock = threading.Lock()
        self._round = None
        self._contributions: dict[str, tuple[dict[str, np.ndarray], float]] = {}
        self._round_metrics: dict[str, dict] = {}
        self._reduced_precision = False

    # ---------------------------------------------------------------------------------- accept

    def accept(self, shareable: Shareable, fl_ctx: FLContext) -> bool:
        site = shareable.get_peer_prop(key=ReservedKey.IDENTITY_NAME, default="?")
        with self._lock:
            reason, weights, weight, meta = self._vet(site, shareable, fl_ctx)
            if reason:
                self.last_reject_reason = reason
                self.log_warning(fl_ctx, f"rejected contribution from {site}: {reason}")
                return False
            self._contributions[site] = (weights, weight)
            if meta.get(TRANSFER_DTYPE_KEY, "float32") != "float32":
                self._reduced_precision = True
            metrics = meta.get(METRICS_KEY)
            if isinstance(metrics, dict):
                self._round_metrics[site] = dict(metrics)
        self.log_info(fl_ctx, f"accepted contribution from {site} for round {self._round} (weight {weight:g})")
        return True

    def _vet(self, site: str, shareable: Shareable, fl_ctx: FLContext):
        """Return (reject reason or None, weights, weight, meta)."""
        rc = shareable.get_return_code()
        if rc and rc != ReturnCode.OK:
            return f"return code {rc}", None, None, None
        try:
            dxo = from_shareable(shareable)
        except ValueError as e:
            return f"not a DXO ({e})", None, None, None
        if dxo.data_kind != self.expected_data_kind:
            return f"data kind {dxo.data_kind}, expected {self.expected_data_kind.value}", None, None, None

        current_round = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
        contribution_round = shareable.get_cookie(
            AppConstants.CONTRIBUTION_ROUND, shareable.get_header(AppConstants.CONTRIBUTION_ROUND)
        )
        if contribution_round != current_round:
            return f"contribution for round {contribution_round}, current round is {current_round}", None, None, None
        if self._round != current_round:
            if self._contributions:
                self.log_warning(fl_ctx, f"round changed to {current_round} without reset: dropping old contributions")
            self._clear_round()
            self._round = current_round
        if site in self._contributions:
            return f"duplicate contribution in round {current_round}", None, None, None

        try:
            weights, meta = read_weights_shareable(shareable)
        except (ValueError, TypeError) as e:
            return f"unreadable weights ({e})", None, None, None
        if not weights:
            return "no weights", None, None, None
        reason = self._check_arrays(weights, fl_ctx)
        if reason:
            return reason, None, None, None

        for key, name in ((MetaKey.NUM_STEPS_CURRENT_ROUND, "steps"), (N_SAMPLES_KEY, "samples")):
            value = meta.get(key)
            if (value is not None or self.weigh_by == name) and not _is_positive_number(value):
                return f"meta {key} must be a positive number, got {value!r}", None, None, None
        by_meta = {"steps": meta.get(MetaKey.NUM_STEPS_CURRENT_ROUND), "samples": meta.get(N_SAMPLES_KEY)}
        weight = by_meta.get(self.weigh_by, 1.0)
        return None, weights, float(weight), meta

    def _check_arrays(self, weights: dict[str, np.ndarray], fl_ctx: FLContext) -> str | None:
        for key, arr in weights.items():
            if not np.issubdtype(arr.dtype, np.number):
                return f"{key!r} is not a numeric array (dtype {arr.dtype})"
            if not np.all(np.isfinite(arr)):
                return f"{key!r} has non-finite values"
        if self._contributions:
            ref_site, (ref, _) = next(iter(self._contributions.items()))
            missing = [k for k in ref if k not in weights]
            extra = [k for k in weights if k not in ref]
            if missing or extra:
                return f"keys differ from {ref_site}'s (missing {missing[:3]}, unexpected {extra[:3]})"
            for key, arr in weights.items():
                if arr.shape != ref[key].shape:
                    return f"shape of {key!r} is {arr.shape}, {ref_site} sent {ref[key].shape}"
        global_weights = self._global_weights(fl_ctx)
        if global_weights is not None:
            unknown = [k for k in weights if k not in global_weights]
            if unknown:
                return f"unknown keys (not in the global model): {unknown[:3]}"
            for key, arr in weights.items():
                g_shape = tuple(np.shape(global_weights[key]))
                if arr.shape != g_shape:
                    return f"shape of {key!r} is {arr.shape}, global model has {g_shape}"
        return None

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
        with self._lock:
            sites = sorted(self._contributions)  # by name, not arrival: the same inputs give the same bits
            if not sites:
                self.log_error(fl_ctx, f"round {self._round}: no accepted contributions to aggregate")
                return DXO(data_kind=DataKind.WEIGHTS, data={}).to_shareable()
            states = [self._contributions[s][0] for s in sites]
            raw = np.array([self._contributions[s][1] for s in sites], dtype=np.float64)
            result = aggregation.aggregate(
                states,
                raw,
                strategy=self.strategy,
                rank=self.rank,
                state=self.ef_state if self.strategy == "fra-ef" else None,
                global_state=self._global_weights(fl_ctx),
                # a frozen A sent back as float16 differs from the global one by rounding (< 2**-11 relative)
                ffa_tol=1e-3 if self._reduced_precision else 1e-6,
            )
            self.last_round_weights = {s: float(w) for s, w in zip(sites, raw / raw.sum())}
            self.last_round_metrics = dict(self._round_metrics)
        summary = ", ".join(f"{s}={w:.3f}" for s, w in self.last_round_weights.items())
        msg = f"round {self._round}: {self.strategy} of {len(sites)} sites, weights by {self.weigh_by}: {summary}"
        if self.strategy == "fra-ef" and self.ef_state.residual_norms:
            msg += f"; max EF residual norm {max(self.ef_state.residual_norms.values()):.3g}"
        self.log_info(fl_ctx, msg)
        meta = {"fedesm_strategy": self.strategy, "aggregated_sites": sites, AppConstants.CURRENT_ROUND: self._round}
        return DXO(data_kind=DataKind.WEIGHTS, data=result, meta=meta).to_shareable()

    def reset(self, fl_ctx: FLContext):
        """Forget this round's contributions; the fra-ef residual is kept on purpose."""
        with self._lock:
            self._clear_round()

    def _clear_round(self) -> None:
        self._contributions = {}
        self._round_metrics = {}
        self._round = None
        self._reduced_precision = False
