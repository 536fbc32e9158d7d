"""A real provisioned network on loopback: server + 2 sites as separate processes, mutual TLS.

One network serves the whole module (NVFLARE start-up costs seconds). The happy path runs
every job in JOBS; the fault cases use a numpy ScatterAndGather job whose rounds are slow
enough (NPTrainer sleep_time) to kill a site in the middle of one.
"""

import json
import re
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from fedesm.launch.network import LocalNetwork

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
INITIAL = np.arange(1, 10, dtype=np.float32).reshape(3, 3)
HEART_BEAT_TIMEOUT = 20  # seconds: the server drops a killed site after this (NVFLARE default 600)


def write_numpy_job(dest: Path, name: str, num_rounds=2, min_clients=2, sleep_time=0) -> Path:
    """hello-numpy-sag: ScatterAndGather + NPTrainer (adds 1 per round) + NPModelPersistor.

    After R aggregated rounds the global model is INITIAL + R, whichever sites took part.
    """
    job = dest / name
    cfg = job / "app" / "config"
    cfg.mkdir(parents=True)
    meta = {"name": name, "resource_spec": {}, "min_clients": min_clients, "deploy_map": {"app": ["@ALL"]}}
    server = {
        "format_version": 2,
        # notice a dead site quickly: watch-list grace and the delay before checking
        "dead_client_grace_period": 2.0,
        "dead_client_check_lead_time": 1.0,
        "task_data_filters": [],
        "task_result_filters": [],
        "components": [
            {
                "id": "persistor",
                "path": "nvflare.app_common.np.np_model_persistor.NPModelPersistor",
                "args": {"model": INITIAL.tolist()},
            },
            {
                "id": "shareable_generator",
                "path": "nvflare.app_common.shareablegenerators.full_model_shareable_generator."
                "FullModelShareableGenerator",
                "args": {},
            },
            {
                "id": "aggregator",
                "path": "nvflare.app_common.aggregators.intime_accumulate_model_aggregator."
                "InTimeAccumulateWeightedAggregator",
                "args": {"expected_data_kind": "WEIGHTS"},
            },
        ],
        "workflows": [
            {
                "id": "scatter_and_gather",
                "path": "nvflare.app_common.workflows.scatter_and_gather.ScatterAndGather",
                "args": {
                    "min_clients": min_clients,
                    "num_rounds": num_rounds,
                    "wait_time_after_min_received": 1,
                    "aggregator_id": "aggregator",
                    "persistor_id": "persistor",
                    "shareable_generator_id": "shareable_generator",
                    "train_task_name": "train",
                    "train_timeout": 0,
                },
            }
        ],
    }
    client = {
        "format_version": 2,
        "executors": [
            {
                "tasks": ["train"],
                "executor": {
                    "path": "nvflare.app_common.np.np_trainer.NPTrainer",
                    "args": {"delta": 1, "sleep_time": sleep_time},
                },
            }
        ],
        "task_data_filters": [],
        "task_result_filters": [],
        "components": [],
    }
    (job / "meta.json").write_text(json.dumps(meta, indent=2))
    (cfg / "config_fed_server.json").write_text(json.dumps(server, indent=2))
    (cfg / "config_fed_client.json").write_text(json.dumps(client, indent=2))
    return job


def server_model(result: Path) -> np.ndarray:
    return np.load(result / "workspace" / "models" / "server.npy")


def aggregations(result: Path) -> dict[int, int]:
    """round -> number of site updates the server aggregated, from the downloaded server log."""
    log = (result / "workspace" / "log.txt").read_text()
    return {int(r): int(n) for n, r in re.findall(r"aggregating (\d+) update\(s\) at round (\d+)", log)}


def wait_for_text(path: Path, text: str, count: int = 1, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.is_file() and path.read_text(errors="replace").count(text) >= count:
            return
        time.sleep(0.2)
    raise AssertionError(f"{text!r} not seen {count}x in {path} within {timeout}s")


# ---- jobs for the happy path: (make job folder, check downloaded result) --------------------


def _numpy_job(tmp: Path, net: LocalNetwork) -> Path:
    return write_numpy_job(tmp, "hello-numpy-sag", num_rounds=2)


def _check_numpy_result(result: Path) -> None:
    np.testing.assert_array_equal(server_model(result), INITIAL + 2)
    assert aggregations(result) == {0: 2, 1: 2}


FEDESM_ROUNDS = 2


def prepare_fedesm_sites(tmp: Path, net: LocalNetwork) -> Path:
    """Synthetic data + a tiny checkpoint per site, named in each site's own kit (local/fedesm_site.yaml)."""
    from fedesm.data.split import split_records, write_split
    from fedesm.data.synth import synth_records
    from fedesm.site_config import write_site_config
    from fedesm.model.checkpoint import make_random_checkpoint

    records = synth_records(n=200, n_families=10, pos_rate=0.1, min_len=60, max_len=200, seed=2)
    write_split(split_records(records, "iid", 2, seed=2, site_val_frac=0.15), tmp / "data", overwrite=True)
    ckpt = make_random_checkpoint("esm2_t2_tiny", tmp / "models" / "esm2_t2_tiny.pt")
    for site in ("site-1", "site-2"):
        write_site_config(net.kit(site) / "local" / "fedesm_site.yaml", ckpt, tmp / "data")
    return ckpt


def _fedesm_job(tmp: Path, net: LocalNetwork, **overrides) -> Path:
    """The real esm2_fra_lora bundle with small settings, exported with fedesm in app/custom: this network
    keeps NVFLARE's default policy, whose class allow-list admits fedesm's components only in BYOC jobs
    (tests/integration/test_production.py runs the code-free bundle under fedesm's site policy)."""
    from fedesm.launch.jobs import export_job

    ckpt = prepare_fedesm_sites(tmp, net)
    settings = {"model.arch": "esm2_t2_tiny", "model.backbone": str(ckpt), "training.rounds": FEDESM_ROUNDS,
                "training.steps_per_round": 20, "lora.r": 4, "training.max_len": 200}
    settings.update(overrides)
    return export_job("esm2_fra_lora", tmp / "jobs", settings, include_package=True)


def _check_fedesm_result(result: Path) -> None:
    from fedesm.tables import read_table

    out = result / "workspace" / "fedesm"
    rows = read_table(out / "metrics.jsonl")
    for rnd in range(1, FEDESM_ROUNDS + 1):
        assert {r["site"] for r in rows if r["round"] == rnd and r.get("f1") is not None} == {"site-1", "site-2"}
    assert {r["site"] for r in rows if r["round"] == FEDESM_ROUNDS and r.get("global_f1") is not None} == {
        "site-1", "site-2"}  # the final global model was scored at every site
    for sub in ("last", f"rounds/round_{FEDESM_ROUNDS:03d}", "best"):
        assert (out / sub / "adapter_model.safetensors").is_file(), sub
    manifest = json.loads((out / "payload_manifest.json").read_text())
    assert all(all(".lora_" in n or ".classifier." in n for n in m["tensors"]) for m in manifest.values())


JOBS = {
    "numpy-sag": (_numpy_job, _check_numpy_result),
    "esm2_fra_lora": (_fedesm_job, _check_fedesm_result),
}


# ---- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def network(tmp_path_factory):
    t0 = time.time()
    net = LocalNetwork(tmp_path_factory.mktemp("net"), heart_beat_timeout=HEART_BEAT_TIMEOUT)
    with net:
        print(f"\nnetwork up in {time.time() - t0:.1f}s: {net.status()}")
        yield net
    print(f"\nnetwork lifetime {time.time() - t0:.1f}s")


@pytest.fixture
def both_sites(network):
    """Every test starts and ends with both sites connected (a fault test restarts what it killed)."""
    network.wait_for_clients(["site-1", "site-2"], timeout=60)
    yield network
    for site in ("site-1", "site-2"):
        if not network.state.procs[site].alive():
            network.start_client(site)


# ---- tests -------------------------------------------------------------------------------------


@pytest.mark.parametrize("job_name", list(JOBS))
def test_job_runs_to_completion_and_result_downloads(both_sites, tmp_path, job_name):
    net = both_sites
    make_job, check = JOBS[job_name]
    job = make_job(tmp_path, net)
    statuses = []
    job_id = net.submit(job)
    meta = net.follow(job_id, timeout=600, poll_interval=1.0, on_update=lambda m: statuses.append(m["status"]))
    assert meta["status"] == "FINISHED:COMPLETED"
    assert statuses[-1] == "FINISHED:COMPLETED" and len(statuses) >= 2
    assert sorted(meta["job_deploy_detail"]) == ["server: OK", "site-1: OK", "site-2: OK"]
    result = net.download(job_id, tmp_path / "result")
    assert result == tmp_path / "result" / job_id
    assert json.loads((result / "meta.json").read_text())["status"] == "FINISHED:COMPLETED"
    assert list((net.admin_kit / "transfer").iterdir()) == []  # moved out of the admin's download dir
    assert (net.kit("localhost") / "store" / "jobs-storage" / job_id).is_dir()  # not /tmp/nvflare
    check(result)
    assert job_id not in [j.job_id for j in net.session().get_system_info().job_info]


def test_admin_abort_ends_job_aborted(both_sites, tmp_path):
    net = both_sites
    job_id = net.submit(write_numpy_job(tmp_path, "abort-me", num_rounds=5, sleep_time=3))
    wait_for_text(net.job_log("site-1", job_id), "invoking task executor")
    assert net.job_status(job_id) == "RUNNING"
    net.abort(job_id)
    meta = net.follow(job_id, timeout=120, poll_interval=1.0)
    assert meta["status"] == "FINISHED:ABORTED"
    result = net.download(job_id, tmp_path / "result")
    assert len(aggregations(result)) < 5  # stopped before the last round


def test_admin_abort_of_fedesm_job_stops_sites_between_steps(both_sites, tmp_path):
    net = both_sites
    job = _fedesm_job(tmp_path, net, **{"training.rounds": 3, "training.steps_per_round": 100_000})  # hours
    job_id = net.submit(job)
    wait_for_text(net.job_log("site-1", job_id), "validation sequences; backbone", timeout=120)
    time.sleep(2)  # inside the local steps of round 0
    net.abort(job_id)
    meta = net.follow(job_id, timeout=120, poll_interval=1.0)
    assert meta["status"] == "FINISHED:ABORTED"
    result = net.download(job_id, tmp_path / "result")
    assert not (result / "workspace" / "fedesm" / "rounds" / "round_001").exists()  # nothing aggregated
    for site in ("site-1", "site-2"):  # the executor saw the abort signal between two optimizer steps
        wait_for_text(net.job_log(site, job_id), "aborted after", timeout=30)


def _kill_site_2_mid_round_1(net, job_id):
    """Round 0 is done, site-2 is inside round 1's training (NPTrainer sleeps) when it dies."""
    wait_for_text(net.job_log("site-2", job_id), "invoking task executor", count=2)
    net.kill_client("site-2")
    assert not net.state.procs["site-2"].alive()


def test_site_killed_mid_round_with_min_clients_1_finishes_with_the_other_site(both_sites, tmp_path):
    """The server drops the dead site while the job runs; the workflow goes on with site-1 alone.

    (NVFLARE 2.9: had the server noticed the death only after the workflow ended, it would mark
    the job FINISHED:ABNORMAL for want of site-2's outcome; hence 12 rounds, longer than the
    heart_beat_timeout, and the check that the job is still RUNNING when site-2 is dropped.)
    """
    net = both_sites
    job_id = net.submit(write_numpy_job(tmp_path, "kill-min1", num_rounds=12, min_clients=1, sleep_time=2))
    _kill_site_2_mid_round_1(net, job_id)
    net.wait_for_dropped(["site-2"], timeout=HEART_BEAT_TIMEOUT + 20)
    assert net.job_status(job_id) == "RUNNING"
    meta = net.follow(job_id, timeout=180, poll_interval=1.0)
    assert meta["status"] == "FINISHED:COMPLETED"
    result = net.download(job_id, tmp_path / "result")
    assert aggregations(result) == {0: 2, **{r: 1 for r in range(1, 12)}}  # site-1 alone from round 1 on
    np.testing.assert_array_equal(server_model(result), INITIAL + 12)


def test_site_killed_mid_round_with_min_clients_2_fails_cleanly(both_sites, tmp_path):
    net = both_sites
    job_id = net.submit(write_numpy_job(tmp_path, "kill-min2", num_rounds=3, min_clients=2, sleep_time=3))
    _kill_site_2_mid_round_1(net, job_id)
    meta = net.follow(job_id, timeout=180, poll_interval=1.0)
    assert meta["status"] == "FINISHED:EXECUTION_EXCEPTION"
    result = net.download(job_id, tmp_path / "result")
    log = (result / "workspace" / "log.txt").read_text()
    assert "Aborting job due to deployment policy violation" in log
    assert "Round 2 started" not in log
    # nothing half-written: the saved global model is exactly the one of the last complete round
    assert aggregations(result) == {0: 2}
    assert sorted(p.name for p in (result / "workspace" / "models").iterdir()) == ["server.npy"]
    np.testing.assert_array_equal(server_model(result), INITIAL + 1)
    # and the network is still usable: the site comes back and a new job runs (checked by both_sites)
    net.start_client("site-2")


def test_job_process_killed_fails_the_job_even_with_min_clients_1(both_sites, tmp_path):
    """The site stays up and reports its dead job process: NVFLARE fails the whole job."""
    net = both_sites
    job_id = net.submit(write_numpy_job(tmp_path, "kill-job-process", num_rounds=4, min_clients=1, sleep_time=2))
    wait_for_text(net.job_log("site-2", job_id), "invoking task executor", count=2)
    assert net.kill_job_process("site-2", job_id) == 1
    meta = net.follow(job_id, timeout=120, poll_interval=1.0)
    assert meta["status"] == "FINISHED:EXECUTION_EXCEPTION"
    assert net.state.procs["site-2"].alive()
    result = net.download(job_id, tmp_path / "result")
    assert aggregations(result) == {0: 2}
    np.testing.assert_array_equal(server_model(result), INITIAL + 1)


def test_stop_kills_every_process_even_when_the_body_fails(tmp_path):
    net = LocalNetwork(tmp_path / "net2", heart_beat_timeout=HEART_BEAT_TIMEOUT)
    with pytest.raises(RuntimeError, match="boom"):
        with net:
            pids = [p.pid for p in net.state.procs.values()]
            assert len(pids) == 3 and all(psutil.pid_exists(p) for p in pids)
            assert net.session().list_jobs() == []  # its own job store, not another network's
            raise RuntimeError("boom")
    marker = str(tmp_path / "net2")
    leftovers = [
        p.pid for p in psutil.process_iter(["cmdline"]) if any(marker in a for a in (p.info["cmdline"] or []))
    ]
    assert leftovers == []
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids)
    assert json.loads((tmp_path / "net2" / "network.json").read_text())["procs"] == {}
