"""What travels: torch state dicts <-> dicts of numpy arrays <-> NVFLARE WEIGHTS Shareables, and the meta keys.

Weights travel as a ``DXO(WEIGHTS)`` whose data is ``{name: np.ndarray}``. Floating arrays are
sent as float32 by default; ``transfer_dtype="float16"`` halves the payload, and the receiver
decodes it back to float32 (the meta key ``TRANSFER_DTYPE_KEY`` says how it was sent).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.shareable import Shareable, make_reply
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.decomposers import numpy_decomposers
from nvflare.fuel.utils import fobs

from fedesm.secure.wire import SECURE_TASKS  # noqa: F401 - the passes' task names, with the other wire names here
from fedesm.settings import TRANSFER_DTYPES

# DXO meta keys of a site's contribution, shared by the executor (writer) and the aggregator (reader).
TRANSFER_DTYPE_KEY = "fedesm_transfer_dtype"  # how floats were sent (float32 | float16)
METRICS_KEY = "metrics"  # the site's metrics for this round
# The training count the site's operator declares in its site config (declared_samples), sent only when declared;
# the server weighs by it only under federation.weigh_by: declared, fixed for the job and capped.
N_SAMPLES_KEY = "n_samples"
SITE_KEY = "site"
BACKBONE_KEY = "fedesm_backbone"  # which backbone the site trained on: arch, source (no local path), sha256
BACKBONE_FIELDS = ("arch", "source", "sha256", "seed")
# Secure aggregation (federation.secure_aggregation): the step a DXO(COLLECTION) belongs to (keys: a site's signed
# key instead of its factors; pass1 / pass2 / sum: masked words) and the site's LoRA rank (public: the sketch's
# width depends on the sites' summed rank). The tasks the server sends for the masked passes:
SECURE_STEP_KEY = "fedesm_secure"
RANK_KEY = "fedesm_lora_rank"
SECURE_STEPS = ("keys", "pass1", "pass2", "sum")
# A reply header: why a site sends nothing for a task (its privacy policy refused the job, its epsilon budget is
# spent, its outbound filter stopped the result). The reply carries no data and a non-OK return code, so NVFLARE's
# ScatterAndGather goes on without the site when min_clients still allows it (its dynamic ignore_result_error).
WITHHELD_KEY = "fedesm_withheld"
MAX_REASON = 500  # characters of a withheld reason that travel


def to_numpy_dict(state_dict: dict[str, Any], dtype: Any = None) -> dict[str, np.ndarray]:
    """Detach torch tensors (or copy arrays) to numpy; bfloat16 becomes float32 (numpy has none).

    ``dtype`` casts floating arrays only (integer buffers keep their type).
    """
    out = {}
    for name, value in state_dict.items():
        if hasattr(value, "detach"):
            value = value.detach().cpu()
            if str(value.dtype) == "torch.bfloat16":
                value = value.float()
            arr = value.numpy().copy()
        else:
            arr = np.array(value)
        if dtype is not None and np.issubdtype(arr.dtype, np.floating):
            arr = arr.astype(dtype)
        out[name] = arr
    return out


def to_torch_dict(numpy_dict: dict[str, Any]) -> dict[str, Any]:
    """Numpy arrays to (owned, writable) torch tensors, e.g. for ``set_peft_model_state_dict``."""
    import torch

    return {name: torch.tensor(np.asarray(value)) for name, value in numpy_dict.items()}


def _encode(weights: dict[str, Any], transfer_dtype: str) -> dict[str, np.ndarray]:
    if transfer_dtype not in TRANSFER_DTYPES:
        raise ValueError(f"transfer_dtype must be one of {TRANSFER_DTYPES}, got {transfer_dtype!r}")
    return to_numpy_dict(weights, dtype=np.dtype(transfer_dtype))


def make_weights_shareable(
    weights: dict[str, Any], meta: dict | None = None, transfer_dtype: str = "float32"
) -> Shareable:
    """A ``DXO(WEIGHTS)`` Shareable of numpy arrays; torch tensors are converted."""
    meta = dict(meta or {})
    meta[TRANSFER_DTYPE_KEY] = transfer_dtype
    return DXO(data_kind=DataKind.WEIGHTS, data=_encode(weights, transfer_dtype), meta=meta).to_shareable()


def read_weights_shareable(shareable: Shareable) -> tuple[dict[str, np.ndarray], dict]:
    """``(weights, meta)`` from a ``DXO(WEIGHTS)`` Shareable; reduced-precision floats become float32."""
    dxo = from_shareable(shareable)
    if dxo.data_kind != DataKind.WEIGHTS:
        raise ValueError(f"expected a DXO of kind {DataKind.WEIGHTS.value}, got {dxo.data_kind}")
    meta = dict(dxo.meta or {})
    sent_as = meta.get(TRANSFER_DTYPE_KEY, "float32")
    weights = {}
    for name, value in dxo.data.items():
        arr = np.asarray(value)
        if sent_as != "float32" and np.issubdtype(arr.dtype, np.floating):
            arr = arr.astype(np.float32)
        weights[name] = arr
    return weights, meta


def withheld_reply(reason: str, rc: str = ReturnCode.EMPTY_RESULT, current_round=None) -> Shareable:
    """A reply with no data that tells the server, in one line, why this site sends nothing."""
    reply = make_reply(rc)
    reply.set_header(WITHHELD_KEY, " ".join(str(reason).split())[:MAX_REASON])
    if current_round is not None:
        reply.set_header(AppConstants.CURRENT_ROUND, current_round)
    return reply


def withheld_reason(shareable: Shareable) -> str | None:
    """The reason a site gave for sending nothing, or None (an ordinary result or error)."""
    reason = shareable.get_header(WITHHELD_KEY)
    return " ".join(str(reason).split())[:MAX_REASON] if reason else None


def shareable_nbytes(shareable: Shareable) -> int:
    """Size in bytes of the Shareable as NVFLARE serialises it (FOBS) for sending."""
    numpy_decomposers.register()
    return len(fobs.dumps(shareable))
