"""The server's per-round metrics streamed to MLflow too: NVFLARE's own MLflowReceiver, set from the job's settings.

Sites stream every metric once (`AnalyticsSender`, tag = metric name, step = round, as the executor
writes them); NVFLARE fans the events out to every receiver on the server, so TensorBoard, the metrics
table and MLflow see the same numbers at the same steps. This component only turns the job's
`federation` block into MLflowReceiver's arguments: the tracking URI (`federation.mlflow_tracking_uri`,
else the server's MLFLOW_TRACKING_URI, else NVFLARE's default, a SQLite file in the job's result
folder), the experiment name, and run tags naming the job's strategy and rank. `fedesm.launch.jobs`
adds it to a job's server config when `federation.mlflow` is on.
"""

from __future__ import annotations

import os
from typing import Optional

from nvflare.app_opt.tracking.mlflow.mlflow_receiver import MLflowReceiver

from fedesm.settings import FederationSettings, LoraSettings, ModelSettings

TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"


class FedesmMLflowReceiver(MLflowReceiver):
    def __init__(self, model: Optional[dict] = None, lora: Optional[dict] = None, federation: Optional[dict] = None,
                 events: Optional[list] = None, buffer_flush_time: float = 1):
        """MLflow tracking of the streamed site metrics, configured by the job's settings blocks.

        Args:
            model, lora, federation: the job's settings blocks; federation.mlflow_tracking_uri and
                mlflow_experiment say where, model.arch / lora.r / federation.strategy become run tags.
            events: the streamed events to log (default: the sites' `fed.analytix_log_stats`).
            buffer_flush_time: seconds between batched deliveries to the tracking server.
        """
        m = ModelSettings.from_dict(model, where="FedesmMLflowReceiver")
        lo = LoraSettings.from_dict(lora, where="FedesmMLflowReceiver")
        f = FederationSettings.from_dict(federation, where="FedesmMLflowReceiver")
        uri = f.mlflow_tracking_uri or os.environ.get(TRACKING_URI_ENV) or None
        tags = {"fedesm.arch": m.arch, "fedesm.lora_r": str(lo.r), "fedesm.strategy": f.strategy}
        super().__init__(tracking_uri=uri, events=events, buffer_flush_time=buffer_flush_time,
                         kw_args={"experiment_name": f.mlflow_experiment, "run_name": "fedesm",
                                  "experiment_tags": {"fedesm": "federated LoRA fine-tuning of ESM-2"},
                                  "run_tags": tags})
        self.federation = f
