"""The saved round holds the whole table of that round, server row included, in NVFLARE's own event order.

NVFLARE's ScatterAndGather saves the round's model (`persistor.save`) before it fires ROUND_DONE; the
persistor copies the metrics table into the round folder (a resume point) at that save. A process killed
between the save and ROUND_DONE must leave a round folder, and a live table, that already hold the
server's row of that round. Here the recorder and persistor are driven by hand in that order (real
FLContext, Workspace), and the process "dies" right after the save: nothing after it runs.
"""

from __future__ import annotations

import inspect
from pathlib import Path

from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.model import make_model_learnable
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType

from fedesm import results
from fedesm.resume import read_resume_point
from fedesm.tables import SERVER_ROW, read_table
from tests.server_parts import Engine

BLOCKS = {"model": {"arch": "esm2_t2_tiny"}, "lora": {"r": 4}, "training": {"rounds": 4, "steps_per_round": 5}}


def server(root: Path):
    from fedesm.flare.metrics_recorder import MetricsRecorder
    from fedesm.flare.persistor import LoraPersistor

    recorder, persistor = MetricsRecorder(), LoraPersistor(**BLOCKS)
    engine = Engine(root, metrics_recorder=recorder, persistor=persistor)
    fl_ctx = FLContext()
    fl_ctx.set_prop(ReservedKey.ENGINE, engine, private=True, sticky=False)
    fl_ctx.set_prop(ReservedKey.RUN_NUM, "job-a", private=True, sticky=False)
    persistor.handle_event(EventType.START_RUN, fl_ctx)
    recorder.initialize(fl_ctx)
    weights = persistor.load_model(fl_ctx)["weights"]
    return recorder, persistor, fl_ctx, weights, results.output_dir(Path(root) / "job-a")


def run_round_until_saved(recorder, persistor, fl_ctx, weights, n: int) -> None:
    """Round n (0-based) in ScatterAndGather.control_flow's order, up to and including the model's save."""
    fl_ctx.set_prop(AppConstants.CURRENT_ROUND, n, private=True, sticky=True)
    recorder.handle_event(AppEventType.ROUND_STARTED, fl_ctx)
    for site in ("site-1", "site-2"):
        recorder.record(n + 1, site, {"f1": 0.1 * n + 0.2})
    recorder.handle_event(AppEventType.BEFORE_AGGREGATION, fl_ctx)
    recorder.handle_event(AppEventType.AFTER_SHAREABLE_TO_LEARNABLE, fl_ctx)
    recorder.handle_event(AppEventType.BEFORE_LEARNABLE_PERSIST, fl_ctx)
    persistor.save_model(make_model_learnable(weights, {}), fl_ctx)
    recorder.handle_event(AppEventType.AFTER_LEARNABLE_PERSIST, fl_ctx)


def test_nvflare_saves_the_round_before_round_done():
    """The order this module's fix rests on: if NVFLARE changes it, this says so first."""
    from nvflare.app_common.workflows.scatter_and_gather import ScatterAndGather

    src = inspect.getsource(ScatterAndGather.control_flow)
    assert src.index("BEFORE_LEARNABLE_PERSIST") < src.index("self.persistor.save(") < src.index("ROUND_DONE")


def test_a_round_saved_and_then_killed_holds_its_server_row(tmp_path):
    recorder, persistor, fl_ctx, weights, out = server(tmp_path / "server")
    for n in range(2):
        run_round_until_saved(recorder, persistor, fl_ctx, weights, n)
        if n == 0:
            recorder.handle_event(AppEventType.ROUND_DONE, fl_ctx)
    # killed here: round 2's model is saved, its ROUND_DONE never fires
    for table in (out / "rounds" / "round_002" / results.METRICS, out / results.METRICS):
        keys = {(r["round"], r["site"]) for r in read_table(table)}
        assert {(1, SERVER_ROW), (2, SERVER_ROW), (2, "site-1"), (2, "site-2")} <= keys, table
    point = read_resume_point(out / "rounds" / "round_002")
    server_rows = {r["round"]: r for r in point.rows if r["site"] == SERVER_ROW}
    assert sorted(server_rows) == [1, 2] and all(r["round_seconds"] >= 0 for r in server_rows.values())


def test_round_done_does_not_record_the_round_twice(tmp_path):
    recorder, persistor, fl_ctx, weights, out = server(tmp_path / "server")
    run_round_until_saved(recorder, persistor, fl_ctx, weights, 0)
    before = recorder.rows[(1, SERVER_ROW)]["round_seconds"]
    recorder.handle_event(AppEventType.ROUND_DONE, fl_ctx)
    assert recorder.rows[(1, SERVER_ROW)]["round_seconds"] == before


def test_a_round_that_is_not_persisted_gets_its_row_at_round_done(tmp_path):
    """persist_every_n_rounds > 1: no save, no BEFORE_LEARNABLE_PERSIST; ROUND_DONE still writes the row."""
    recorder, persistor, fl_ctx, weights, out = server(tmp_path / "server")
    fl_ctx.set_prop(AppConstants.CURRENT_ROUND, 0, private=True, sticky=True)
    recorder.handle_event(AppEventType.ROUND_STARTED, fl_ctx)
    assert (1, SERVER_ROW) not in recorder.rows
    recorder.handle_event(AppEventType.ROUND_DONE, fl_ctx)
    assert {(r["round"], r["site"]) for r in read_table(out / results.METRICS)} >= {(1, SERVER_ROW)}
