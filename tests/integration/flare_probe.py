"""A test-only NVFLARE filter that records the weights a task carries, for checking what really travels.

Placed in a job's app/custom by the simulator tests and configured as a client task-data filter (what a
site receives) and a server task-result filter (what the server receives). Each pass writes
`<folder>/<chain>_<site>_round<NNN>.npz` with the DXO's weights and its meta (as JSON)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from nvflare.apis.dxo import from_shareable
from nvflare.apis.filter import Filter
from nvflare.apis.fl_constant import ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.app_constant import AppConstants


class RecordWeights(Filter):
    def __init__(self, folder: str, chain: str):
        super().__init__()
        self.folder = Path(folder)
        self.chain = chain

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        try:
            dxo = from_shareable(shareable)
        except Exception:
            return shareable
        if not isinstance(dxo.data, dict) or not dxo.data:
            return shareable
        site = shareable.get_peer_prop(ReservedKey.IDENTITY_NAME, None) if self.chain == "received" else None
        site = site or fl_ctx.get_identity_name()
        rnd = shareable.get_header(AppConstants.CURRENT_ROUND)
        if rnd is None:
            rnd = shareable.get_cookie(AppConstants.CONTRIBUTION_ROUND)
        self.folder.mkdir(parents=True, exist_ok=True)
        meta = {k: v for k, v in (dxo.meta or {}).items() if isinstance(v, (int, float, str, bool))}
        np.savez(self.folder / f"{self.chain}_{site}_round{int(rnd):03d}.npz", __meta__=json.dumps(meta),
                 **{k: np.asarray(v) for k, v in dxo.data.items()})
        return shareable


def add_probes(job_dir: Path, folder: Path) -> None:
    """Copy this module into the job's app/custom and record what sites receive and what the server receives."""
    import shutil

    custom = Path(job_dir) / "app" / "custom"
    custom.mkdir(parents=True, exist_ok=True)
    shutil.copy(__file__, custom / "flare_probe.py")
    for cfg, key, chain in (("config_fed_client.json", "task_data_filters", "sent_to"),
                            ("config_fed_server.json", "task_result_filters", "received")):
        path = Path(job_dir) / "app" / "config" / cfg
        data = json.loads(path.read_text())
        data[key] = [{"tasks": ["train"], "filters": [
            {"path": "flare_probe.RecordWeights", "args": {"folder": str(folder), "chain": chain}}]}]
        path.write_text(json.dumps(data, indent=2))


def load(path: Path) -> tuple[dict, dict]:
    with np.load(path) as z:
        meta = json.loads(str(z["__meta__"]))
        return {k: z[k] for k in z.files if k != "__meta__"}, meta
