"""Hands the persistor's latest global adapters to NVFLARE's (global / cross-site) model evaluation."""

from __future__ import annotations

from typing import List

from nvflare.apis.dxo import DXO, DataKind
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.model_locator import ModelLocator

GLOBAL_MODEL_NAME = "global_model"


class LoraModelLocator(ModelLocator):
    def __init__(self, persistor_id: str = "persistor"):
        """Serves the final global adapters + head (as kept by `LoraPersistor`) under the name 'global_model'."""
        super().__init__()
        self.persistor_id = persistor_id

    def get_model_names(self, fl_ctx: FLContext) -> List[str]:
        return [GLOBAL_MODEL_NAME]

    def locate_model(self, model_name: str, fl_ctx: FLContext) -> DXO:
        persistor = fl_ctx.get_engine().get_component(self.persistor_id)
        weights = getattr(persistor, "last_weights", None)
        if model_name != GLOBAL_MODEL_NAME or not weights:
            self.log_error(fl_ctx, f"no model named {model_name!r} (persistor {self.persistor_id!r} holds none)")
            return None
        return DXO(data_kind=DataKind.WEIGHTS, data=dict(weights))
