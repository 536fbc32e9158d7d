"""AdaptersOnlyFilter: the site's own guarantee that only LoRA factors, the head and numbers leave it.

A task-result filter of the site's privacy policy (``local/privacy.json``, written by
`fedesm.launch.policy`), so it applies to every job whatever its configs say. It lets a result
through only when it is what `fedesm.flare.executor` sends: a ``DXO(WEIGHTS)`` whose tensors are
all LoRA A/B factors or head parameters (PEFT names, `fedesm.model.keys`), or a ``DXO(METRICS)`` of
scalars; the DXO meta may hold scalars, short strings and one level of scalar dicts (the per-round
metrics). Anything else (other tensor names, a backbone weight, arrays in the metrics, a result
that is no DXO) marks the job unsafe at this site (NVFLARE's ``UnsafeJobError``): the result is
not sent and the job stops taking tasks here. Error replies pass: they carry no data.
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np

from nvflare.apis.dxo import DataKind, from_shareable
from nvflare.apis.filter import Filter
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.fl_exception import UnsafeJobError
from nvflare.apis.shareable import Shareable

from fedesm.model.keys import CLASSIFIER_NAME, split_lora_key

MAX_TEXT = 256  # longest string a result's meta may carry (site names, dtype names)


def is_exchanged_name(name: str) -> bool:
    """A LoRA factor (`...lora_A.weight`) or a head parameter (`...classifier.weight` / `.bias`)."""
    if split_lora_key(name):
        return True
    parts = name.split(".")
    return len(parts) >= 2 and parts[-1] in ("weight", "bias") and CLASSIFIER_NAME in parts[:-1]


def _scalar(value: Any) -> bool:
    if value is None or isinstance(value, (bool, numbers.Number, np.number)):
        return True
    return isinstance(value, str) and len(value) <= MAX_TEXT


def _meta_ok(meta: dict) -> bool:
    return all(isinstance(k, str) and (_scalar(v) or (isinstance(v, dict) and all(_scalar(x) for x in v.values())))
               for k, v in (meta or {}).items())


def result_problem(shareable: Shareable) -> str | None:
    """Why `shareable` may not leave the site, or None when it may."""
    if shareable.get_return_code(ReturnCode.OK) != ReturnCode.OK:
        return None
    try:
        dxo = from_shareable(shareable)
    except Exception:  # noqa: BLE001 - not a DXO at all
        return "a task result that is not a DXO"
    if not _meta_ok(dxo.meta):
        return "DXO meta beyond scalars and one level of scalar dicts"
    if dxo.data_kind == DataKind.METRICS:
        bad = [k for k, v in (dxo.data or {}).items() if not _scalar(v)]
        return f"non-scalar metrics {bad[:3]}" if bad else None
    if dxo.data_kind in (DataKind.WEIGHTS, DataKind.WEIGHT_DIFF):
        data = dxo.data or {}
        others = sorted(k for k in data if not is_exchanged_name(str(k)))
        if others:
            return f"{len(others)} tensor(s) that are neither LoRA factors nor the head, e.g. {others[0]!r}"
        bad = [k for k, v in data.items() if not (isinstance(v, np.ndarray) and np.issubdtype(v.dtype, np.number))]
        return f"non-numeric values for {bad[:3]}" if bad else None
    return f"a DXO of kind {getattr(dxo.data_kind, 'value', dxo.data_kind)}"


class AdaptersOnlyFilter(Filter):
    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        problem = result_problem(shareable)
        if problem:
            msg = f"site privacy policy: refusing to send {problem}; only LoRA factors, the head and metrics leave"
            self.log_error(fl_ctx, msg, fire_event=False)
            raise UnsafeJobError(msg)
        return shareable
