"""Server-side NVFLARE parts the tests build by hand: a site's contribution Shareable, the round's FLContext
and a small engine (components by id, a workspace, events), shared by the aggregator, persistor and resume tests."""

from pathlib import Path

from nvflare.apis.dxo import MetaKey
from nvflare.apis.fl_constant import ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.model import make_model_learnable
from nvflare.app_common.app_constant import AppConstants

from fedesm.flare.payload import make_weights_shareable


def contribution(weights, site, round_=3, steps=10, n_samples=100, metrics=None, **kw):
    meta = {}
    if steps is not None:
        meta[MetaKey.NUM_STEPS_CURRENT_ROUND] = steps
    if n_samples is not None:
        meta["n_samples"] = n_samples
    if metrics is not None:
        meta["metrics"] = metrics
    s = make_weights_shareable(weights, meta, **kw)
    s.set_peer_props({ReservedKey.IDENTITY_NAME: site})
    s.add_cookie(AppConstants.CONTRIBUTION_ROUND, round_)
    return s


def context(round_=3, global_weights=None):
    fl_ctx = FLContext()
    fl_ctx.set_prop(AppConstants.CURRENT_ROUND, round_, private=True, sticky=True)
    if global_weights is not None:
        fl_ctx.set_prop(AppConstants.GLOBAL_MODEL, make_model_learnable(global_weights, {}), private=True, sticky=True)
    return fl_ctx


class Engine:
    """What the server components ask an engine for here: components by id, a workspace, and events
    (kept, so a test sees a system panic)."""

    def __init__(self, root=None, **components):
        from nvflare.apis.workspace import Workspace

        self.components = components
        if root is not None:
            for sub in ("startup", "local"):  # what a server's workspace (its kit) has
                (Path(root) / sub).mkdir(parents=True, exist_ok=True)
        self.workspace = Workspace(str(root)) if root is not None else None
        self.events = []

    def get_component(self, cid):
        return self.components.get(cid)

    def get_workspace(self):
        return self.workspace

    def fire_event(self, event_type, fl_ctx):
        from nvflare.apis.fl_constant import FLContextKey

        self.events.append((event_type, fl_ctx.get_prop(FLContextKey.EVENT_DATA)))


def engine_context(engine, round_=3, global_weights=None):
    fl_ctx = context(round_, global_weights)
    fl_ctx.set_prop(ReservedKey.ENGINE, engine, private=True, sticky=False)
    return fl_ctx
