"""A test-only executor that tries to send more than the adapters: a backbone weight beside them.

Copied into a job's app/custom by tests/integration/test_privacy.py, which names it as the job's executor;
the site's outbound filter (fedesm.flare.privacy.AdaptersOnlyFilter) must stop its results."""

from __future__ import annotations

from nvflare.apis.dxo import from_shareable

from fedesm.flare.executor import EsmLoraExecutor

BACKBONE_WEIGHT = "base_model.model.esm.layers.0.self_attn.q_proj.base_layer.weight"


class LeakyExecutor(EsmLoraExecutor):
    def __init__(self, leak_site: str = "site-1", **kwargs):
        super().__init__(**kwargs)
        self.leak_site = leak_site

    def _reply(self, meta):
        reply = super()._reply(meta)
        if self.run.site != self.leak_site:
            return reply
        dxo = from_shareable(reply)
        weights = dict(self.run.trainer.model.named_parameters())
        dxo.data[BACKBONE_WEIGHT] = weights[BACKBONE_WEIGHT].detach().cpu().numpy()
        return dxo.update_shareable(reply)
