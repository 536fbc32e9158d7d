"""AdaptersOnlyFilter: the site's own guarantee that only the expected adapters, head and numbers leave it.

A task-result filter of the site's privacy policy (``local/privacy.json``, written by
`fedesm.launch.policy`), so it applies to every job whatever its configs say. It lets a result
through only when it is exactly what `fedesm.flare.executor` sends:

* a ``DXO(WEIGHTS)`` whose tensors are LoRA A/B factors and head parameters of the model the job
  declares (its ``model.arch``, ``lora`` and ``model.num_labels`` blocks, the same the site's
  executor builds), each with that model's shape and the job's ``federation.transfer_dtype``, no
  more LoRA rank than the site allows (``max_lora_rank``), and in its meta only the declared
  numbers: the transfer dtype, sample and step counts, this site's name, and the round's metrics
  (finite-size, numbers only; when the job trains with DP-SGD, only the metrics of the closed list in
  `fedesm.evaluation.release`: nothing computed on the secret batches, no seconds or throughput);
* a ``DXO(METRICS)`` of numbers (a validation; under DP-SGD from the same closed list);
* an error reply with no data.

Anything else (a backbone weight, an unexpected name or shape, another dtype, arrays or text in the
meta, extra keys beside the DXO, bulky headers) is refused: the result is replaced by a reply with
no data and NVFLARE's ``TASK_RESULT_FILTER_ERROR``, whose ``fedesm_withheld`` header carries the
reason, logged here and on the server (`fedesm.flare.metrics_recorder`). ScatterAndGather then goes
on without this site if ``min_clients`` allows, as for any failed site.

NVFLARE 2.9 applies the scope's result filters before the job's own; a job can only add filters
named in the site's class allow-list, which holds none that change data (a test checks), so what
this filter lets through is what leaves. `nvflare simulator` 2.9 gives its simulated clients no
privacy scope but applies the workspace's to what its server receives (direction "in"): there the
same checks run on arrival, before the workflow and the aggregator see the result.
"""

from __future__ import annotations

import json
import numbers
import re
from dataclasses import dataclass, replace
from typing import Any, Optional

import numpy as np

from nvflare.apis.dxo import DataKind, MetaKey, from_shareable
from nvflare.apis.filter import Filter
from nvflare.apis.fl_constant import FilterKey, FLContextKey, ReturnCode, ServerCommandKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import ReservedHeaderKey, Shareable
from nvflare.app_common.app_constant import AppConstants

from fedesm.evaluation.release import releasable_under_dp
from fedesm.flare.payload import (BACKBONE_FIELDS, BACKBONE_KEY, METRICS_KEY, N_SAMPLES_KEY, RANK_KEY, SECURE_STEP_KEY,
                                  SITE_KEY,
                                  TRANSFER_DTYPE_KEY, WITHHELD_KEY,
                                  withheld_reply)
from fedesm.launch.policy import MAX_LORA_RANK
from fedesm.keys import CLASSIFIER_NAME, fits_within_rank, lora_pairs, split_lora_key
from fedesm.settings import JobSettings

MAX_TEXT = 256  # longest string a header may carry (site names, task ids, dtype names)
MAX_METRICS = 512  # numbers one result may carry as metrics
DXO_KEY = "DXO"  # where a DXO sits in a Shareable (nvflare.apis.dxo)
_METRIC_NAME = re.compile(r"^[A-Za-z0-9_.\-/]{1,64}$")
# headers a result may carry when it reaches the filter: NVFLARE's own, the round, and why nothing was sent
_HEADERS = {v for k, v in vars(ReservedHeaderKey).items() if not k.startswith("_") and isinstance(v, str)} | {
    AppConstants.CURRENT_ROUND, AppConstants.NUM_ROUNDS, WITHHELD_KEY}
# set by NVFLARE where a result is received (and where `nvflare simulator` applies the scope: on the server)
_RECEIPT_HEADERS = {ReservedHeaderKey.PEER_PROPS, ReservedHeaderKey.PEER_CTX, ServerCommandKey.FL_CLIENT}
# NVFLARE's bookkeeping that a replacement reply keeps, so the workflow still matches it to its task
_KEPT_HEADERS = {ReservedHeaderKey.TASK_NAME, ReservedHeaderKey.TASK_ID, ReservedHeaderKey.MSG_ROOT_ID,
                 ReservedHeaderKey.WORKFLOW, ReservedHeaderKey.AUDIT_EVENT_ID, ReservedHeaderKey.REPLY_IS_LATE,
                 ReservedHeaderKey.COOKIE_JAR}
_WEIGHT_META = {TRANSFER_DTYPE_KEY, N_SAMPLES_KEY, MetaKey.NUM_STEPS_CURRENT_ROUND, METRICS_KEY, SITE_KEY,
                BACKBONE_KEY}


def is_exchanged_name(name: str) -> bool:
    """A LoRA factor (`...lora_A.weight`) or a head parameter (`...classifier.weight` / `.bias`)."""
    if split_lora_key(name):
        return True
    parts = name.split(".")
    return len(parts) >= 2 and parts[-1] in ("weight", "bias") and CLASSIFIER_NAME in parts[:-1]


@dataclass(frozen=True)
class ExpectedResult:
    """What a site's result may hold: each tensor's name and shape, their dtype, the site's name."""

    shapes: dict
    dtype: str
    site: Optional[str] = None
    dp: bool = False  # the job trains with DP-SGD: only the metrics of `fedesm.evaluation.release` leave
    secure: bool = False  # secure aggregation: a signed key and masked words leave, never the factors themselves

    @classmethod
    def for_job(cls, settings: JobSettings, site: Optional[str] = None,
                max_lora_rank: int = MAX_LORA_RANK) -> "ExpectedResult":
        """From the job's declared model (names and shapes on the meta device: no weights needed)."""
        from fedesm.errors import FedesmError
        from fedesm.model.adapters import exchanged_shapes
        from fedesm.architectures import get_architecture

        if settings.lora.r > max_lora_rank:
            raise FedesmError(f"the job's lora.r {settings.lora.r} is above this site's max_lora_rank {max_lora_rank}")
        shapes = exchanged_shapes(get_architecture(settings.model.arch), settings.lora, settings.model.num_labels)
        return cls(shapes=shapes, dtype=settings.federation.transfer_dtype, site=site,
                   dp=not settings.training.dp_noise_multiplier <= 0,  # nan counts as DP: the stricter list
                   secure=settings.federation.secure_aggregation)

    def words_limit(self) -> int:
        """The most masked words one secure message of this job can hold: the check word, a d_out x d_in
        block per LoRA pair (a sketch is never wider than the matrix) and every exchanged tensor once."""
        pairs = lora_pairs(list(self.shapes))
        full = sum(int(self.shapes[b][0]) * int(self.shapes[a][1]) for a, b in pairs.values())
        return 1 + full + sum(int(np.prod(s)) for s in self.shapes.values())  # nan counts as DP: the stricter list


def _number(value: Any) -> bool:
    return isinstance(value, (bool, numbers.Number, np.number)) and not isinstance(value, complex)


def _scalar(value: Any) -> bool:
    return value is None or _number(value) or (isinstance(value, str) and len(value) <= MAX_TEXT)


def _count(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 0


def _header_problem(key: Any, value: Any, received: bool) -> Optional[str]:
    if key in _RECEIPT_HEADERS:
        return None if received else f"header {key!r}, which only NVFLARE sets, on receipt"
    if key not in _HEADERS:
        return f"an unexpected header {str(key)[:60]!r}"
    if key == ReservedHeaderKey.COOKIE_JAR:
        ok = isinstance(value, dict) and len(value) <= 16 and all(_scalar(v) for v in value.values())
        return None if ok else "a cookie jar beyond a few scalars"
    return None if _scalar(value) else f"header {key!r} holding {type(value).__name__}"


def _headers_problem(shareable: Shareable, received: bool = False) -> Optional[str]:
    headers = shareable.get(ReservedHeaderKey.HEADERS) or {}
    if not isinstance(headers, dict):
        return "headers that are not a mapping"
    for key, value in headers.items():
        problem = _header_problem(key, value, received)
        if problem:
            return problem
    return None


def _metrics_problem(metrics: Any, where: str, dp: bool = False) -> Optional[str]:
    if not isinstance(metrics, dict):
        return f"{where} that are not a mapping"
    if len(metrics) > MAX_METRICS:
        return f"{len(metrics)} {where} (at most {MAX_METRICS})"
    for k, v in metrics.items():
        if not (isinstance(k, str) and _METRIC_NAME.match(k)):
            return f"a {where} name {str(k)[:60]!r}"
        if not _number(v):
            return f"{where} {k!r} holding {type(v).__name__}, not a number"
        if dp and not releasable_under_dp(k):
            return f"{where} {k!r} of a DP-SGD job, which could reveal its secret batches (not on the closed list)"
    return None


def _weights_problem(data: Any, meta: dict, expected: Optional[ExpectedResult]) -> Optional[str]:
    if not isinstance(data, dict) or not data:
        return "a weights result without tensors"
    others = sorted(str(k) for k in data if not is_exchanged_name(str(k)))
    if others:
        return f"{len(others)} tensor(s) that are neither LoRA factors nor the head, e.g. {others[0]!r}"
    bad = [k for k, v in data.items() if not (isinstance(v, np.ndarray) and np.issubdtype(v.dtype, np.number))]
    if bad:
        return f"non-numeric values for {bad[:3]}"
    problem = _weights_meta_problem(meta, expected)
    if problem or expected is None:
        return problem
    sent_as = meta.get(TRANSFER_DTYPE_KEY, "float32")
    if sent_as != expected.dtype:
        return f"meta {TRANSFER_DTYPE_KEY} {str(sent_as)[:20]!r}, the job sends {expected.dtype}"
    for name, arr in data.items():
        if name not in expected.shapes:
            return f"tensor {name!r}, not one of the {len(expected.shapes)} of the job's model"
        if not fits_within_rank(name, arr.shape, expected.shapes[name]):  # a site may train a smaller rank
            return f"tensor {name!r} of shape {tuple(arr.shape)}, the job's model has {tuple(expected.shapes[name])}"
        if arr.dtype != np.dtype(expected.dtype):
            return f"tensor {name!r} of dtype {arr.dtype}, the job sends {expected.dtype}"
    return None


def _weights_meta_problem(meta: dict, expected: Optional[ExpectedResult]) -> Optional[str]:
    """The meta of a train result: declared names only, counts, the backbone's identity, metrics, the site."""
    unknown = sorted(set(meta) - _WEIGHT_META)
    if unknown:
        return f"undeclared meta {unknown[:3]} (only {', '.join(sorted(_WEIGHT_META))})"
    for key in (N_SAMPLES_KEY, MetaKey.NUM_STEPS_CURRENT_ROUND):
        if key in meta and not _count(meta[key]):
            return f"meta {key} that is not a count: {str(meta[key])[:60]!r}"
    if BACKBONE_KEY in meta:
        b = meta[BACKBONE_KEY]
        if not (isinstance(b, dict) and set(b) <= set(BACKBONE_FIELDS)
                and all(isinstance(v, (str, int)) and not isinstance(v, bool) and len(str(v)) <= 120
                        for v in b.values())):
            return f"meta {BACKBONE_KEY} that is not the backbone's arch, source name and digest"
    if METRICS_KEY in meta:
        problem = _metrics_problem(meta[METRICS_KEY], "metrics", expected is not None and expected.dp)
        if problem:
            return problem
    if expected is not None and expected.site is not None and SITE_KEY in meta and meta[SITE_KEY] != expected.site:
        return f"meta {SITE_KEY} {str(meta[SITE_KEY])[:60]!r}, this site is {expected.site!r}"
    return None


def _secure_problem(data: Any, meta: dict, expected: Optional[ExpectedResult]) -> Optional[str]:
    """A secure-aggregation message: the round's signed key (with the train task's metrics) or masked words."""
    from fedesm.secure.wire import CONTEXT, KEY_LIMITS, WORDS

    if expected is not None and not expected.secure:
        return "a secure-aggregation message in a job that does not aggregate securely"
    step = meta.get(SECURE_STEP_KEY)
    if not isinstance(data, dict) or not all(isinstance(v, np.ndarray) and v.ndim == 1 for v in data.values()):
        return "a secure-aggregation message that is not flat arrays"
    if step == "keys":
        if set(data) != set(KEY_LIMITS):
            return f"a key message holding {sorted(map(str, data))[:5]}"
        for name, arr in data.items():
            if arr.dtype != np.uint8 or arr.size > KEY_LIMITS[name]:
                return f"a key message whose {name} is {arr.size} {arr.dtype} (at most {KEY_LIMITS[name]} bytes)"
        rank = meta.get(RANK_KEY)
        if not _count(rank):
            return f"meta {RANK_KEY} that is not a count"
        rest = {k: v for k, v in meta.items() if k not in (SECURE_STEP_KEY, RANK_KEY)}
        return _weights_meta_problem(rest, expected)
    if step not in ("pass1", "pass2", "sum"):
        return f"a secure-aggregation step {str(step)[:20]!r}"
    if set(data) != {WORDS, CONTEXT} or data[WORDS].dtype != np.uint64 or data[CONTEXT].dtype != np.uint8:
        return "a masked message that is not uint64 words with its context"
    if data[CONTEXT].size > KEY_LIMITS["context"]:
        return f"a masked message with a {data[CONTEXT].size}-byte context"
    if set(meta) - {SECURE_STEP_KEY, SITE_KEY}:
        return f"undeclared meta {sorted(set(meta) - {SECURE_STEP_KEY, SITE_KEY})[:3]}"
    if expected is not None and data[WORDS].size > expected.words_limit():
        return f"{data[WORDS].size:,} masked words, more than this job's model can need ({expected.words_limit():,})"
    if expected is not None and expected.site is not None and meta.get(SITE_KEY, expected.site) != expected.site:
        return f"meta {SITE_KEY} {str(meta[SITE_KEY])[:60]!r}, this site is {expected.site!r}"
    return None


def result_problem(shareable: Shareable, expected: Optional[ExpectedResult] = None,
                   received: bool = False) -> Optional[str]:
    """Why `shareable` may not leave the site, or None when it may. Without `expected`, names are checked by
    rule only (LoRA factor or head), not against the job's model. `received`: checked where it arrived
    (the headers NVFLARE adds on receipt are then expected)."""
    problem = _headers_problem(shareable, received)
    if problem:
        return problem
    extra = sorted(str(k) for k in shareable if k not in (ReservedHeaderKey.HEADERS, DXO_KEY))
    if extra:
        return f"content beside the DXO: {extra[:3]}"
    if shareable.get_return_code(ReturnCode.OK) != ReturnCode.OK:
        return "an error reply with content" if DXO_KEY in shareable else None
    try:
        dxo = from_shareable(shareable)
    except Exception:  # noqa: BLE001 - not a DXO at all
        return "a task result that is not a DXO"
    meta = dxo.meta or {}
    if not isinstance(meta, dict):
        return "DXO meta that is not a mapping"
    if dxo.data_kind == DataKind.METRICS:
        unknown = sorted(set(meta) - _WEIGHT_META)
        if unknown:
            return f"undeclared meta {unknown[:3]}"
        return _metrics_problem(dxo.data or {}, "metrics", expected is not None and expected.dp)
    if dxo.data_kind == DataKind.COLLECTION and SECURE_STEP_KEY in meta:
        return _secure_problem(dxo.data, meta, expected)
    if dxo.data_kind in (DataKind.WEIGHTS, DataKind.WEIGHT_DIFF):
        if expected is not None and expected.secure:
            return "the LoRA factors in the clear, in a job that aggregates securely (only masked sums leave)"
        return _weights_problem(dxo.data, meta, expected)
    return f"a DXO of kind {getattr(dxo.data_kind, 'value', dxo.data_kind)}"


def job_settings_of(fl_ctx: FLContext) -> JobSettings:
    """The settings blocks of the running job's client config at this site (what its executor is built from)."""
    from fedesm.errors import FedesmError

    engine, job = fl_ctx.get_engine(), fl_ctx.get_job_id()
    if engine is None or not job:
        raise FedesmError("no running job to read the declared model of")
    path = engine.get_workspace().get_client_app_config_file_path(job)
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise FedesmError(f"cannot read the job's client config {path}: {str(e).splitlines()[0]}") from None
    blocks = {k: config[k] for k in JobSettings.BLOCKS if isinstance(config, dict) and k in config}
    if not blocks:
        raise FedesmError(f"{path} declares no fedesm model (no {', '.join(JobSettings.BLOCKS)} blocks)")
    return JobSettings.from_dict(blocks, where=str(path))


class AdaptersOnlyFilter(Filter):
    def __init__(self, max_lora_rank: int = MAX_LORA_RANK):
        """Only the job's declared LoRA factors and head (names, shapes, dtype), counts and metrics leave.

        Args:
            max_lora_rank: the largest LoRA rank this site sends factors of (a job declaring more is refused).
        """
        super().__init__()
        if isinstance(max_lora_rank, bool) or not isinstance(max_lora_rank, int) or max_lora_rank < 1:
            raise ValueError(f"max_lora_rank must be a positive integer, got {max_lora_rank!r}")
        self.max_lora_rank = max_lora_rank
        self._expected: dict[str, Any] = {}  # job id -> ExpectedResult, or the reason there is none

    def expected(self, fl_ctx: FLContext, received: bool = False) -> ExpectedResult:
        """What this job may send from this site (the model built once per job); the site is this one, or the
        sender where the result is checked on arrival. Raises FedesmError when it cannot be known."""
        from fedesm.errors import FedesmError

        job = fl_ctx.get_job_id()
        if job not in self._expected:
            try:
                self._expected[job] = ExpectedResult.for_job(job_settings_of(fl_ctx), None, self.max_lora_rank)
            except FedesmError as e:
                self._expected[job] = str(e)
        found = self._expected[job]
        if isinstance(found, str):
            raise FedesmError(found)
        peer = fl_ctx.get_peer_context() if received else None
        site = peer.get_identity_name() if peer is not None else fl_ctx.get_identity_name()
        return replace(found, site=site or None)

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        from fedesm.errors import FedesmError

        received = fl_ctx.get_prop(FLContextKey.FILTER_DIRECTION) == FilterKey.IN
        if shareable.get_return_code(ReturnCode.OK) != ReturnCode.OK:
            problem = result_problem(shareable, received=received)  # an error reply: no data, whatever the job
        else:
            try:
                problem = result_problem(shareable, self.expected(fl_ctx, received), received)
            except FedesmError as e:
                problem = str(e)
        if not problem:
            return shareable
        msg = f"site privacy policy: refused to send {problem}; only the job's LoRA factors, head and metrics leave"
        self.log_error(fl_ctx, msg, fire_event=False)
        return _replacement(shareable, msg, received)


def _replacement(shareable: Shareable, reason: str, received: bool) -> Shareable:
    """The no-data reply sent instead: the reason, the round, and NVFLARE's own bookkeeping headers."""
    headers = shareable.get(ReservedHeaderKey.HEADERS)
    headers = headers if isinstance(headers, dict) else {}
    current_round = headers.get(AppConstants.CURRENT_ROUND)
    if not isinstance(current_round, int) or isinstance(current_round, bool):
        current_round = None
    reply = withheld_reply(reason, rc=ReturnCode.TASK_RESULT_FILTER_ERROR, current_round=current_round)
    for key, value in headers.items():
        if (key in _KEPT_HEADERS or (received and key in _RECEIPT_HEADERS)) and not _header_problem(key, value,
                                                                                                   received):
            reply.set_header(key, value)
    return reply
