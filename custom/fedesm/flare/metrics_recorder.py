"""One tidy per-round, per-site metrics table on the server, fed by NVFLARE's metrics streaming.

Sites stream scalars (tag = metric name, step = round) through `AnalyticsSender` and
`ConvertToFedEvent`; NVFLARE's `TBAnalyticsReceiver` turns them into TensorBoard events and this
receiver gathers them into rows `(round, site, metric...)`, written as `<run dir>/fedesm/metrics.jsonl`
and `.csv` after every update. Semantics of a row (round n, site s):
  global_*  the global model after n aggregation rounds, evaluated on s's validation split
  the rest  s's local model after its n-th round of local training (accuracy, f1, train_loss, ...)
  sent_*    what the site sent the server that round (tensors, parameters, serialized bytes)
  withheld  why the site sent nothing that round (its privacy policy, its epsilon budget, its outbound
            filter: the reply's `fedesm_withheld` header), also logged here as a warning
The server's own rows (site "server") hold each round's wall time (until its model is saved). `payload_manifest.json` lists
the names of the tensors each site sent: adapters and head only. The aggregator adds what it judged
of each site's update (`update_norm`, `update_norm_ratio`, and `rejected` with the reason), and a
resumed job starts from the old run's rows (`seed`), so its table continues the old one.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

from nvflare.apis.analytix import AnalyticsData, AnalyticsDataType
from nvflare.apis.dxo import from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import FLContextKey, ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType
from nvflare.app_common.widgets.streaming import AnalyticsReceiver

from fedesm import results
from fedesm.fileio import atomic_write_text
from fedesm.tables import SERVER_ROW, write_table


class MetricsRecorder(AnalyticsReceiver):
    def __init__(self, events: Optional[list] = None):
        super().__init__(events=events or ["fed.analytix_log_stats"])
        self.rows: dict[tuple[int, str], dict] = {}
        self.out_dir: Optional[Path] = None
        self._round_started: dict[int, float] = {}
        self.manifest: dict[str, dict] = {}  # site -> names and count of the tensors it sent (first round)
        self.backbones: dict[str, dict] = {}  # site -> the backbone it says it trained on (arch, source, sha256)

    def initialize(self, fl_ctx: FLContext):
        run_dir = fl_ctx.get_engine().get_workspace().get_run_dir(fl_ctx.get_job_id())
        self.out_dir = results.output_dir(run_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)

    def handle_event(self, event_type: str, fl_ctx: FLContext):
        if event_type == AppEventType.BEFORE_CONTRIBUTION_ACCEPT:
            self._record_payload(fl_ctx)
        elif event_type == EventType.BEFORE_PROCESS_SUBMISSION:
            self._record_withheld(fl_ctx)
        elif event_type == AppEventType.ROUND_STARTED:
            self._round_started[fl_ctx.get_prop(AppConstants.CURRENT_ROUND)] = time.perf_counter()
        elif event_type in (AppEventType.BEFORE_LEARNABLE_PERSIST, AppEventType.ROUND_DONE):
            # NVFLARE saves the round's model (and with it, the persistor's copy of this table) before it fires
            # ROUND_DONE: the server row goes in just before the save, so every saved round holds it
            self._record_round_time(fl_ctx.get_prop(AppConstants.CURRENT_ROUND))
        super().handle_event(event_type, fl_ctx)

    def _record_round_time(self, r) -> None:
        """The server row of the round that ends: its wall time from ROUND_STARTED (once per round)."""
        if r in self._round_started:
            with self._save_lock:
                self._set(r + 1, SERVER_ROW, "round_seconds", time.perf_counter() - self._round_started.pop(r))
                self._write()

    def save(self, fl_ctx: FLContext, shareable: Shareable, record_origin: str):
        data = AnalyticsData.from_dxo(from_shareable(shareable))
        if data is None or data.data_type != AnalyticsDataType.SCALAR or data.step is None:
            return
        self._set(int(data.step), record_origin, data.tag, float(data.value))
        self._write()

    def finalize(self, fl_ctx: FLContext):
        self._write()
        best = self.best_round("global_auprc")
        if best:
            self.log_info(fl_ctx, f"metrics table: {self.out_dir / results.METRICS}; best global model after "
                                  f"round {best[0]} (mean validation AUPRC {best[1]:.4f})")

    def _record_payload(self, fl_ctx: FLContext) -> None:
        """What a site sent this round: tensor names, parameter count and serialized bytes."""
        from nvflare.apis.fl_constant import ReservedKey

        from fedesm.flare.payload import read_weights_shareable, shareable_nbytes

        result = fl_ctx.get_prop(AppConstants.TRAINING_RESULT)
        r = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
        if result is None or r is None:
            return
        site = result.get_peer_prop(ReservedKey.IDENTITY_NAME, None) or "unknown"
        from fedesm.flare.payload import BACKBONE_FIELDS, BACKBONE_KEY, SECURE_STEP_KEY

        try:
            weights, meta = read_weights_shareable(result)
        except Exception:
            try:  # secure aggregation: the site's signed key instead of its tensors (no factor reaches the server)
                dxo = from_shareable(result)
                meta = dict(dxo.meta or {}) if (dxo.meta or {}).get(SECURE_STEP_KEY) == "keys" else None
            except Exception:
                meta = None
            if meta is None:
                return
            weights = {}

        claimed = meta.get(BACKBONE_KEY)
        if isinstance(claimed, dict):  # a claim: only recorded (in the model card), never acted on
            self.backbones[site] = {k: str(v)[:120] for k, v in claimed.items() if k in BACKBONE_FIELDS}
        n_params = int(sum(v.size for v in weights.values()))
        with self._save_lock:
            self._set(r + 1, site, "sent_tensors", len(weights))
            self._set(r + 1, site, "sent_parameters", n_params)
            self._set(r + 1, site, "sent_bytes", shareable_nbytes(result))
            self.manifest.setdefault(site, {"tensors": sorted(weights), "parameters": n_params,
                                            **({"secure_aggregation": True} if not weights else {})})
            self._write()

    # --------------------------------------------------------------------------------- other components

    def seed(self, rows: list[dict], manifest: Optional[dict] = None) -> None:
        """Start from an earlier run's rows (a resumed job): same (round, site) keys, later values merge in."""
        with self._save_lock:
            for row in rows:
                if isinstance(row.get("round"), int) and isinstance(row.get("site"), str):
                    self.rows[(row["round"], row["site"])] = dict(row)
            for site, info in (manifest or {}).items():
                self.manifest.setdefault(site, info)
            self._write()

    def snapshot(self) -> list[dict]:
        """The table as it stands, for another thread (metrics keep streaming in while the server saves a round)."""
        with self._save_lock:
            return [dict(r) for r in self.table()]

    def record(self, round_num: int, site: str, values: dict) -> None:
        """Put values from another server component into row (round, site) (e.g. the aggregator's verdict)."""
        with self._save_lock:
            for key, value in values.items():
                self._set(round_num, site, key, value)
            self._write()

    def _record_withheld(self, fl_ctx: FLContext) -> None:
        """A site that sends nothing says why (`fedesm.flare.payload.WITHHELD_KEY`): log it, and put it in the
        site's row for the round it skipped."""
        from fedesm.flare.payload import withheld_reason

        result = fl_ctx.get_prop(FLContextKey.TASK_RESULT)
        if not isinstance(result, Shareable):
            return
        reason = withheld_reason(result)
        if not reason:
            return
        peer = fl_ctx.get_peer_context()
        site = result.get_peer_prop(ReservedKey.IDENTITY_NAME, None) or (
            peer.get_identity_name() if peer is not None else None) or "unknown"
        r = result.get_header(AppConstants.CURRENT_ROUND)
        task = result.get_header(ReservedKey.TASK_NAME) or "?"
        when = f"round {r}" if isinstance(r, int) else "no round"
        self.log_warning(fl_ctx, f"{site} sent nothing for task {task} ({when}; {result.get_return_code()}): {reason}")
        if isinstance(r, int) and not isinstance(r, bool):
            with self._save_lock:
                self._set(r + 1, site, "withheld", reason)
                self._write()

    # ---------------------------------------------------------------------------------

    def _set(self, round_num: int, site: str, key: str, value) -> None:
        row = self.rows.setdefault((round_num, site), {"round": round_num, "site": site})
        row[key] = value

    def table(self) -> list[dict]:
        return [self.rows[k] for k in sorted(self.rows)]

    def mean_at(self, round_num: int, metric: str) -> Optional[float]:
        """Mean over sites of `metric` in one round; None when no site reported it."""
        values = [row[metric] for (r, site), row in self.rows.items()
                  if r == round_num and site != SERVER_ROW and metric in row]
        return sum(values) / len(values) if values else None

    def best_round(self, metric: str = "global_auprc") -> Optional[tuple[int, float]]:
        """(round, mean over sites) of the round whose global model scored best; None before any."""
        by_round: dict[int, list[float]] = {}
        for (r, site), row in self.rows.items():
            if site != SERVER_ROW and metric in row:
                by_round.setdefault(r, []).append(row[metric])
        if not by_round:
            return None
        means = {r: sum(v) / len(v) for r, v in by_round.items()}
        best = max(means, key=lambda r: (means[r], -r))
        return best, means[best]

    def _write(self) -> None:
        if self.out_dir is None:
            return
        write_table(self.out_dir / results.METRICS, self.table())
        if self.manifest:
            atomic_write_text(self.out_dir / results.PAYLOAD_MANIFEST, json.dumps(self.manifest, indent=1))
