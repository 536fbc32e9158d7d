"""Resume after a crash, server side: the persistor, aggregator, metrics recorder and workflow as NVFLARE
builds them (real FLContext, Shareables, Workspace), driven round by round without the network.

A run interrupted after 2 of 4 rounds and resumed from its round_002 must end exactly where the
uninterrupted run ends (same global adapters, same fra-ef residual, same table), a crash in the middle
of writing a round must leave the previous one whole, and a round on S3 resumes like a local one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from nvflare.apis.dxo import from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.model import make_model_learnable
from nvflare.app_common.app_constant import AppConstants

from fedesm import results
from fedesm.cli import main
from fedesm.errors import FedesmError
from fedesm.resume import fetch_resume_point, read_resume_point
from fedesm.settings import FederationSettings
from fedesm.tables import read_table
from tests.s3_server import s3, s3_server  # noqa: F401 (fixtures)
from tests.server_parts import Engine, contribution

BLOCKS = {"model": {"arch": "esm2_t2_tiny"}, "lora": {"r": 4}, "training": {"rounds": 4, "steps_per_round": 5}}
SITES = ("site-1", "site-2", "site-3")


class Job:
    """One server-side run: the components of a fedesm job's server config, sharing one engine."""

    def __init__(self, root: Path, job_id: str, strategy="fra-ef", submitter=None, **federation):
        from fedesm.flare.aggregator import FraLoraAggregator
        from fedesm.flare.metrics_recorder import MetricsRecorder
        from fedesm.flare.persistor import LoraPersistor

        if submitter is not None:  # what NVFLARE writes into the server's run folder from the admin's session
            (Path(root) / job_id).mkdir(parents=True, exist_ok=True)
            name, org = submitter
            (Path(root) / job_id / "meta.json").write_text(json.dumps(
                {"name": job_id, "job_id": job_id, "submitter_name": name, "submitter_org": org}))

        fed = {"strategy": strategy, "min_clients": 2, "weigh_by": "uniform", **federation}
        self.recorder = MetricsRecorder()
        self.aggregator = FraLoraAggregator(lora=BLOCKS["lora"], federation=fed)
        self.persistor = LoraPersistor(**BLOCKS, federation=fed)
        self.engine = Engine(root, metrics_recorder=self.recorder, aggregator=self.aggregator,
                             persistor=self.persistor)
        self.job_id = job_id
        fl_ctx = self.context()
        self.persistor.handle_event(EventType.START_RUN, fl_ctx)
        self.recorder.initialize(fl_ctx)
        self.out = results.output_dir(Path(root) / job_id)
        self.weights = self.persistor.load_model(fl_ctx)["weights"]

    def context(self, round_=None) -> FLContext:
        fl_ctx = FLContext()
        fl_ctx.set_prop(ReservedKey.ENGINE, self.engine, private=True, sticky=False)
        fl_ctx.set_prop(ReservedKey.RUN_NUM, self.job_id, private=True, sticky=False)
        if round_ is not None:
            fl_ctx.set_prop(AppConstants.CURRENT_ROUND, round_, private=True, sticky=True)
            fl_ctx.set_prop(AppConstants.GLOBAL_MODEL, make_model_learnable(self.weights, {}), private=True,
                            sticky=True)
        return fl_ctx

    def round(self, n: int) -> None:
        """Round n (0-based) as ScatterAndGather runs it: metrics stream in, contributions, aggregate, persist."""
        fl_ctx = self.context(n)
        for i, site in enumerate(SITES):
            self.recorder.record(n, site, {"global_auprc": 0.1 * n + 0.01 * i})  # the global model after n
            local = site_update(self.weights, n, i)
            self.recorder.record(n + 1, site, {"auprc": 0.1 * n + 0.05, "train_loss": 1.0 / (n + 1)})
            assert self.aggregator.accept(contribution(local, site, round_=n), fl_ctx)
        self.weights = from_shareable(self.aggregator.aggregate(fl_ctx)).data
        self.persistor.save_model(make_model_learnable(self.weights, {}), fl_ctx)
        self.aggregator.reset(fl_ctx)
        self.recorder.record(n + 1, "server", {"round_seconds": 10.0 + n})


def site_update(weights, n, i):
    """A deterministic local update of the global model (what site i would send in round n)."""
    rng = np.random.default_rng(1000 * n + i)
    return {k: (v + 0.05 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in weights.items()}


@pytest.fixture
def crashed(tmp_path):
    """A 4-round run that got through 2 rounds (its process then died: nothing else happens to it)."""
    job = Job(tmp_path / "server", "job-a")
    for n in range(2):
        job.round(n)
    return job


def test_a_resumed_run_ends_exactly_where_the_uninterrupted_one_does(tmp_path, crashed):
    whole = Job(tmp_path / "server", "job-whole")
    for n in range(4):
        whole.round(n)
    resumed = Job(tmp_path / "server", "job-b", resume_from=str(crashed.out / "rounds" / "round_002"))
    assert resumed.persistor.resumed_rounds == 2
    for k, v in resumed.weights.items():
        np.testing.assert_array_equal(v, crashed.weights[k])
    # the fra-ef residual came back with it, to the bit
    ef_old, ef_new = crashed.aggregator.ef_state, resumed.aggregator.ef_state
    assert ef_new.rounds == 2 and set(ef_new.residuals) == set(ef_old.residuals) and ef_old.residuals
    for pair, (a, b) in ef_old.residuals.items():
        np.testing.assert_array_equal(ef_new.residuals[pair][0], a)
        np.testing.assert_array_equal(ef_new.residuals[pair][1], b)
    for n in (2, 3):
        resumed.round(n)
    for k, v in whole.weights.items():
        np.testing.assert_allclose(resumed.weights[k], v, rtol=0, atol=1e-6)
    # the table continues the old one: rounds 0-4, each (round, site) once, the same values
    assert resumed.recorder.table() == whole.recorder.table()
    rows = read_table(resumed.out / results.METRICS)
    assert sorted({r["round"] for r in rows}) == [0, 1, 2, 3, 4]
    assert len({(r["round"], r["site"]) for r in rows}) == len(rows)
    # rounds 0-2 were copied from the old run, 3-4 written here; best/ is the best round of all four
    assert [results.round_number(d) for d in results.round_dirs(resumed.out)] == [0, 1, 2, 3, 4]
    card = json.loads((resumed.out / results.BEST / "fedesm_model.json").read_text())
    assert card["extra"]["best_round"] == whole.recorder.best_round("global_auprc")[0]
    assert json.loads((resumed.out / "last" / "fedesm_model.json").read_text())["extra"]["rounds"] == 4


def test_resume_from_last_and_an_old_round(tmp_path, crashed):
    from_last = Job(tmp_path / "server", "job-last", resume_from=str(crashed.out / results.LAST))
    assert from_last.persistor.resumed_rounds == 2
    back = Job(tmp_path / "server", "job-back", resume_from=str(crashed.out / "rounds" / "round_001"))
    assert back.persistor.resumed_rounds == 1
    assert {r["round"] for r in back.recorder.table()} == {0, 1}  # rows of round 2 belong to a later model
    assert [results.round_number(d) for d in results.round_dirs(back.out)] == [0, 1]


def test_a_round_folder_alone_still_resumes(tmp_path, crashed):
    """Copied out of its run (say to another disk): its own table snapshot and state suffice."""
    import shutil

    alone = tmp_path / "copy" / "round_002"
    shutil.copytree(crashed.out / "rounds" / "round_002", alone)
    point = read_resume_point(alone)
    assert point.rounds_done == 2 and point.earlier_rounds == {} and point.residuals
    assert {r["round"] for r in point.rows} == {0, 1, 2}
    job = Job(tmp_path / "server", "job-c", resume_from=str(alone))
    assert [results.round_number(d) for d in results.round_dirs(job.out)] == [2]


def test_the_workflow_continues_at_the_next_round(tmp_path, crashed):
    from nvflare.app_common.shareablegenerators.full_model_shareable_generator import FullModelShareableGenerator

    from fedesm.flare.workflows import CyclicController, ScatterAndGather

    for flow in (ScatterAndGather(min_clients=2, num_rounds=4, persistor_id="persistor"),
                 CyclicController(num_rounds=4, persistor_id="persistor")):
        job = Job(tmp_path / "server", f"job-{type(flow).__name__}",
                  resume_from=str(crashed.out / "rounds" / "round_002"))
        job.engine.components["shareable_generator"] = FullModelShareableGenerator()
        job.engine.get_clients = lambda: ["site-1", "site-2"]
        flow._engine = job.engine
        flow.start_controller(job.context())
        assert flow._current_round == 2  # runs rounds 2, 3 (0-based): the job's rounds 3 and 4
        assert getattr(flow, "_end_round", 4) == 4 and flow._num_rounds == 4


@pytest.mark.parametrize("change, message", [
    ({"lora": {"r": 8}}, "has shape"),
    ({"training": {"rounds": 2, "steps_per_round": 5}}, "nothing left to run"),
])
def test_a_saved_round_that_does_not_fit_the_job_stops_it_with_one_line(tmp_path, crashed, change, message):
    from fedesm.flare.persistor import LoraPersistor

    blocks = {**BLOCKS, **change}
    persistor = LoraPersistor(**blocks, federation={"resume_from": str(crashed.out / "rounds" / "round_002")})
    engine = Engine(tmp_path / "server")
    fl_ctx = FLContext()
    fl_ctx.set_prop(ReservedKey.ENGINE, engine, private=True, sticky=False)
    assert persistor.load_model(fl_ctx).is_empty()
    (panic,) = [data for event, data in engine.events if event == EventType.FATAL_SYSTEM_ERROR]
    assert message in panic and "\n" not in panic


def test_what_is_not_a_saved_round_is_refused(tmp_path):
    with pytest.raises(FedesmError, match="no such folder on the server"):
        fetch_resume_point(str(tmp_path / "nowhere"), tmp_path / "cache")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FedesmError, match="not a saved round"):
        read_resume_point(tmp_path / "empty")
    assert FederationSettings(resume_from="  ").resume_from is None  # blank = a fresh run
    assert FederationSettings(resume_from=" /ws/j/fedesm/last ").resume_from == "/ws/j/fedesm/last"
    with pytest.raises(FedesmError, match="federation.resume_from: .*malformed S3 URI"):
        FederationSettings(resume_from="s3:///rounds/round_002")


def test_a_crash_while_a_round_is_written_leaves_the_previous_round_whole(tmp_path, crashed):
    """The server process dies (SIGKILL) half-way through writing round_003: round_002 and last/ are intact."""
    script = textwrap.dedent(f"""
        import os, signal
        import numpy as np
        from nvflare.apis.fl_context import FLContext
        from fedesm import resume
        from fedesm.flare.persistor import LoraPersistor
        from pathlib import Path
        p = LoraPersistor(**{BLOCKS!r})
        p.output_dir = Path({str(crashed.out)!r})
        real = resume.write_resume_files
        def dying(folder, *a, **k):
            (Path(folder) / "half-written").write_text("x")
            os.kill(os.getpid(), signal.SIGKILL)
        resume.write_resume_files = dying
        weights = {{k: np.asarray(v) for k, v in {{}}.items()}}
        from safetensors.numpy import load_file
        w = load_file(str(p.output_dir / "last" / "adapter_model.safetensors"))
        p._save({{k: v + 1 for k, v in w.items()}}, 3, FLContext())
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=dict(os.environ))
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert [results.round_number(d) for d in results.round_dirs(crashed.out)] == [0, 1, 2]
    leftovers = [p.name for p in (crashed.out / "rounds").iterdir() if p.name.startswith(".round_003")]
    assert leftovers  # the half-written folder sits under a temporary name, never as round_003
    for folder in (crashed.out / "rounds" / "round_002", crashed.out / results.LAST):
        point = read_resume_point(folder)
        assert point.rounds_done == 2
        for k, v in crashed.weights.items():
            np.testing.assert_array_equal(point.weights[k], v)
    resumed = Job(tmp_path / "server", "job-after-crash", resume_from=str(crashed.out / "rounds" / "round_002"))
    assert resumed.persistor.resumed_rounds == 2


def test_job_export_resume_from_flag(tmp_path, capsys):
    from fedesm.launch.jobs import CLIENT_CONFIG, SERVER_CONFIG

    where = "/srv/fl/ws/4f1c/fedesm/rounds/round_002"
    assert main(["job", "export", "esm2_fra_lora", "--out", str(tmp_path), "--resume-from", where,
                 "--set", "training.rounds=40"]) == 0
    assert "resumes from /srv/fl/ws/4f1c/fedesm/rounds/round_002" in capsys.readouterr().out
    for cfg in (SERVER_CONFIG, CLIENT_CONFIG):
        data = json.loads((tmp_path / "esm2_fra_lora" / cfg).read_text())
        assert data["federation"]["resume_from"] == where and data["training"]["rounds"] == 40
    server = json.loads((tmp_path / "esm2_fra_lora" / SERVER_CONFIG).read_text())
    assert server["workflows"][0]["path"] == "fedesm.flare.workflows.ScatterAndGather"
    assert main(["job", "export", "esm2_fra_lora", "--out", str(tmp_path / "x"), "--resume-from", "s3://"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[0].startswith("fedesm: error: federation.resume_from")
    assert not (tmp_path / "x").exists()



def test_a_round_on_s3_resumes_with_its_run(tmp_path, crashed, s3):
    import boto3

    from fedesm.storage import upload

    boto3.client("s3", endpoint_url=s3.endpoint_url).create_bucket(Bucket="fl-runs")
    from fedesm.storage import AccessPolicy

    upload(crashed.out, "s3://fl-runs/job-a/fedesm/", policy=AccessPolicy([crashed.out, "s3://fl-runs/job-a"], "test"))
    local = fetch_resume_point("s3://fl-runs/job-a/fedesm/rounds/round_002", tmp_path / "cache")
    point = read_resume_point(local)
    assert point.rounds_done == 2 and sorted(point.earlier_rounds) == [0, 1]
    assert {r["round"] for r in point.rows} == {0, 1, 2} and point.manifest == {}
    job = Job(tmp_path / "server", "job-s3", resume_from="s3://fl-runs/job-a/fedesm/rounds/round_002")
    assert job.persistor.resumed_rounds == 2
    assert (tmp_path / "server" / "local" / "fedesm_cache" / "fl-runs").is_dir()  # the server's cache, not the run


# ------------------------------------------------------------- a resume point is checked like a contribution


def _edit_state(folder: Path, **changes) -> None:
    path = folder / "fedesm_resume.json"
    state = json.loads(path.read_text())
    state.update(changes)
    path.write_text(json.dumps(state))


def _edit_adapters(folder: Path, change) -> None:
    from safetensors.numpy import load_file, save_file

    path = folder / "adapter_model.safetensors"
    tensors = load_file(str(path))
    save_file({k: change(k, v) for k, v in tensors.items()}, str(path))


def _first_a(key, value, new):
    return new(value) if ".lora_A." in key else value


@pytest.mark.parametrize("damage, message", [
    (lambda f: _edit_adapters(f, lambda k, v: _first_a(k, v, lambda a: np.full_like(a, np.nan))),
     "has non-finite values"),
    (lambda f: _edit_adapters(f, lambda k, v: _first_a(k, v, lambda a: np.round(a * 100).astype(np.int32))),
     "is not a float tensor (dtype int32)"),
    (lambda f: _edit_state(f, rounds_done=-3), "rounds_done -3 is not a number of rounds"),
    (lambda f: _edit_state(f, rounds_done="2"), "rounds_done '2' is not a number of rounds"),
    (lambda f: _edit_state(f, strategy="fedit"), "strategy 'fedit' is not the one of the job definition"),
    (lambda f: _edit_state(f, strategy="median"), "strategy 'median' is not one of"),
    (lambda f: _edit_state(f, job={"training": {"lr": 1}}), "records no job definition that matches its hash"),
    (lambda f: _edit_state(f, job=None, job_hash=None), "records no job definition that matches its hash"),
    (lambda f: (f / "metrics.jsonl").write_text('{"round": 0, "site": "site-1"}\n{"round": 1, "si\n'),
     "metrics.jsonl is not a table of JSON rows (JSONDecodeError"),
    (lambda f: (f / "metrics.jsonl").write_text('[1, 2]\n'), "metrics.jsonl is not a table of JSON rows"),
    (lambda f: _edit_state(f, owner="root"), "its owner 'root' is not a submitter's name and organisation"),
    (lambda f: _edit_state(f, owner={"org": "hub"}), "is not a submitter's name and organisation"),
])
def test_a_damaged_resume_point_is_refused_in_one_line(tmp_path, crashed, damage, message):
    import shutil

    folder = tmp_path / "copy" / "round_002"  # alone, so its own metrics.jsonl is the table read
    shutil.copytree(crashed.out / "rounds" / "round_002", folder)
    damage(folder)
    with pytest.raises(FedesmError) as e:
        read_resume_point(folder)
    assert message in str(e.value) and "\n" not in str(e.value)
    job = Job(tmp_path / "server", "job-d", resume_from=str(folder))  # the server stops before any round
    (panic,) = [data for event, data in job.engine.events if event == EventType.FATAL_SYSTEM_ERROR]
    assert message in panic and job.persistor.resumed_rounds is None


def test_a_malformed_table_in_the_old_run_is_refused_in_one_line(tmp_path, crashed):
    (crashed.out / results.METRICS).write_text("not json\n")
    with pytest.raises(FedesmError, match="metrics.jsonl is not a table of JSON rows"):
        read_resume_point(crashed.out / "rounds" / "round_002")


@pytest.mark.parametrize("strategy, federation, training, differs", [
    ("fra", {}, {}, "federation.strategy"),  # another strategy
    ("fra-ef", {"server_lr": 1.5}, {}, "federation.server_lr"),  # another job's folder
    ("fra-ef", {}, {"lr": 5e-3}, "training.lr"),
])
def test_a_round_of_another_job_definition_is_refused(tmp_path, crashed, strategy, federation, training, differs):
    from fedesm.flare.persistor import LoraPersistor

    folder = str(crashed.out / "rounds" / "round_002")
    fed = {"strategy": strategy, "min_clients": 2, "weigh_by": "uniform", "resume_from": folder, **federation}
    persistor = LoraPersistor(**{**BLOCKS, "training": {**BLOCKS["training"], **training}}, federation=fed)
    engine = Engine(tmp_path / "server")
    fl_ctx = FLContext()
    fl_ctx.set_prop(ReservedKey.ENGINE, engine, private=True, sticky=False)
    assert persistor.load_model(fl_ctx).is_empty()
    (panic,) = [data for event, data in engine.events if event == EventType.FATAL_SYSTEM_ERROR]
    assert f"saved by another job definition (differs in {differs}" in panic and "\n" not in panic
    # what a resumed job may change (rounds, where it runs, how long it waits) is not a different job
    same = LoraPersistor(**{**BLOCKS, "training": {**BLOCKS["training"], "rounds": 9, "device": "cpu"}},
                         federation={"strategy": "fra-ef", "min_clients": 3, "weigh_by": "uniform",
                                     "resume_from": folder, "train_timeout": 60, "max_update_ratio": 50})
    assert not same.load_model(fl_ctx).is_empty() and same.resumed_rounds == 2


def test_only_the_submitter_of_a_run_may_resume_it(tmp_path):
    """A job names the folder it resumes from; the owner recorded with every round (NVFLARE's authenticated
    submitter of the job that saved it) must be this job's submitter, or nothing of the folder is used."""
    alice, bob = ("alice@a.example", "a"), ("bob@b.example", "b")
    first = Job(tmp_path / "server", "job-a", submitter=alice)
    for n in range(2):
        first.round(n)
    folder = str(first.out / "rounds" / "round_002")
    assert read_resume_point(folder).owner == {"name": "alice@a.example", "org": "a"}
    for job_id, who, by in [("job-b", bob, "bob@b.example (b)"), ("job-s", None, "no recorded submitter")]:
        job = Job(tmp_path / "server", job_id, submitter=who, resume_from=folder)
        (panic,) = [data for event, data in job.engine.events if event == EventType.FATAL_SYSTEM_ERROR]
        assert (f"saved by a job of alice@a.example (a), and this job was submitted by {by}" in panic
                and "only the submitter of a run may resume it" in panic and "\n" not in panic)
        assert job.persistor.resumed_rounds is None and not (job.out / "rounds" / "round_001").exists()
    again = Job(tmp_path / "server", "job-c", submitter=alice, resume_from=folder)
    assert again.persistor.resumed_rounds == 2 and not [e for e, _ in again.engine.events
                                                        if e == EventType.FATAL_SYSTEM_ERROR]
    assert read_resume_point(again.out / "last").owner == {"name": "alice@a.example", "org": "a"}


def test_the_owner_is_what_nvflare_wrote_or_none(tmp_path):
    from fedesm.resume import run_owner

    assert run_owner(tmp_path / "absent") is None
    (tmp_path / "meta.json").write_text("{not json")
    assert run_owner(tmp_path) is None
    (tmp_path / "meta.json").write_text(json.dumps({"name": "sim", "submitter_name": ""}))
    assert run_owner(tmp_path) is None  # the simulator's meta names no submitter
    (tmp_path / "meta.json").write_text(json.dumps({"submitter_name": "x@y", "submitter_org": 5}))
    assert run_owner(tmp_path) == {"name": "x@y", "org": ""}
