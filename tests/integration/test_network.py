"""A real provisioned network on loopback: server + 2 sites as separate processes, mutual TLS.

One network serves the whole module (NVFLARE start-up costs seconds). The happy path runs
every job in JOBS; the fault cases (a site, a job process or the server killed, an admin abort,
and resuming after them) run on the esm2_fra_lora bundle in test_network_faults.py.
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
