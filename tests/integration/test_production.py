"""Production as the README documents it, on a real provisioned network with fedesm's site policy.

One network serves the module: server + 2 sites as separate processes from their kits (mutual TLS on
loopback), the kits carrying the policy `fedesm poc provision` writes (`fedesm.launch.policy`), and a
separate admin port, as in the orchestrator chart's production values. The tests run

* the README's production steps, line by line as written there (`nvflare job submit / wait / list /
  meta / download`, then `fedesm predict`), the export with `--set` flags for a tiny model;
* the README's admin-console session fed to `fl_admin.sh` on stdin (`check_status server`,
  `list_jobs`, `abort_job`);
* the refusals: a bundle that brings code (the server's job checker refuses it, and each site's when
  the sites alone get it), a component outside fedesm's job shapes, a job that declares one model and
  trains another, a bundle exported by another fedesm version.

The server's guard is set to warn here, so that what the test sees is the *sites'* refusal of a
bundle of another version (with the shipped default the server refuses it at submission already:
tests/unit/test_policy.py).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from fedesm.launch.network import LocalNetwork, free_port

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
ADMIN_USER = "admin@hub.example"
TINY = ["model.arch=esm2_t2_tiny", "training.rounds=2", "training.steps_per_round=10", "lora.r=4",
        "training.max_len=150"]


def readme_block(marker: str) -> str:
    """The first ```bash block after the README comment that names `marker`."""
    text = (REPO / "README.md").read_text()
    at = text.index(f"<!-- {marker}")
    block = re.search(r"```bash\n(.*?)```", text[at:], re.S)
    assert block, f"no bash block after {marker!r} in README.md"
    return block.group(1)


def readme_steps() -> list[str]:
    """The production steps: one command per line, trailing comments dropped."""
    lines = [re.split(r"\s{2,}#", line)[0].rstrip() for line in readme_block("production steps").splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


@pytest.fixture(scope="module")
def network(tmp_path_factory):
    from fedesm.data.split import split_records, write_split
    from fedesm.data.synth import synth_records
    from fedesm.launch.policy import write_server_policy
    from fedesm.model.checkpoint import make_random_checkpoint
    from fedesm.settings import SiteGuardSettings
    from fedesm.site_config import write_site_config

    root = tmp_path_factory.mktemp("prod")
    records = synth_records(n=160, n_families=10, pos_rate=0.1, min_len=60, max_len=150, seed=3)
    write_split(split_records(records, "iid", 2, seed=3, site_val_frac=0.15), root / "data")
    ckpt = make_random_checkpoint("esm2_t2_tiny", root / "models" / "esm2_t2_tiny.pt")
    # README step 3: each site's config is the file FEDESM_SITE_CONFIG names (one file serves both here)
    site_config = write_site_config(root / "site.yaml", ckpt, root / "data")
    (root / "query.fa").write_text("".join(f">{r.id}\n{r.sequence}\n" for r in records[:3]))
    net = LocalNetwork(root / "net", site_policy=True, admin_port=free_port())
    state = net.provision()
    server_kit = net.kit(state.server)
    write_server_policy(server_kit / "local", server_kit.resolve() / "store",
                        guard=SiteGuardSettings(version_mismatch="warn"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FEDESM_SITE_CONFIG", str(site_config))
        with net:
            yield {"net": net, "root": root, "ckpt": ckpt, "env": _env(net)}


def _env(net: LocalNetwork) -> dict:
    """The admin's shell: the installed fedesm and nvflare on PATH (the network's python3 shim first)."""
    return {**os.environ, "PATH": f"{net.workspace / 'bin'}{os.pathsep}{BIN}{os.pathsep}{os.environ['PATH']}"}


def sh(command: str, network, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    """One line of the README, run by bash in the workspace that holds kits/ (as the admin would)."""
    proc = subprocess.run(["bash", "-c", command], cwd=network["net"].workspace, env=network["env"],
                          capture_output=True, text=True, timeout=timeout, **kw)
    assert proc.returncode == 0, f"{command}\n{proc.stdout}\n{proc.stderr}"
    return proc


def submit(network, job: Path, kit: Path) -> str:
    proc = sh(f"nvflare job submit -j {job} --startup-kit {kit}", network)
    return re.search(r"job_id: (\S+)", proc.stdout).group(1)


def tiny_sets(network) -> str:
    return " ".join(f"--set {s}" for s in TINY + [f"model.backbone={network['ckpt']}"])


def export(network, *args: str) -> Path:
    """`fedesm job export` as the admin runs it (tiny model); returns the bundle."""
    out = Path(tempfile.mkdtemp(dir=network["root"], prefix="bundle-"))
    sh(f"fedesm job export esm2_fra_lora --out {out} {tiny_sets(network)} {' '.join(args)}", network)
    return out / "esm2_fra_lora"


def finished(network, job_id: str, timeout: float = 300) -> dict:
    net = network["net"]
    deadline = time.time() + timeout
    while time.time() < deadline:
        meta = net.session().get_job_meta(job_id)
        if str(meta.get("status", "")).startswith("FINISHED"):
            return meta
        time.sleep(1)
    raise AssertionError(f"job {job_id} still {meta.get('status')} after {timeout}s")


# ---- the README, as written ---------------------------------------------------------------------


def test_readme_production_steps_run_as_written(network):
    net, root = network["net"], network["root"]
    steps = readme_steps()
    assert steps[0] == "ADMIN=kits/fedesm/prod_00/admin@hub.example"
    assert (net.workspace / "kits" / "fedesm" / "prod_00" / ADMIN_USER).resolve() == net.admin_kit.resolve()
    assert [s.split()[:3] for s in steps[1:]] == [
        ["fedesm", "job", "export"], ["nvflare", "job", "submit"], ["nvflare", "job", "wait"],
        ["nvflare", "job", "list"], ["nvflare", "job", "meta"], ["nvflare", "job", "download"],
        ["fedesm", "predict", "--model"]]
    (net.workspace / "query.fa").write_text((root / "query.fa").read_text())
    env_line, job_id, out = steps[0], None, {}
    for step in steps[1:]:
        if step.startswith("fedesm job export"):
            step += " " + tiny_sets(network)
        step = step.replace("<job_id>", str(job_id))
        out[step.split()[2]] = proc = sh(f"{env_line}; {step}", network)
        if step.startswith("nvflare job submit"):
            job_id = re.search(r"job_id: (\S+)", proc.stdout).group(1)
    bundle = net.workspace / "jobs_export" / "esm2_fra_lora"
    assert sorted(str(p.relative_to(bundle)) for p in bundle.rglob("*") if p.is_file()) == [
        "app/config/config_fed_client.json", "app/config/config_fed_server.json", "meta.json"]
    assert re.search(rf"{job_id}\s+esm2_fra_lora\s+FINISHED:COMPLETED", out["list"].stdout), out["list"].stdout
    meta = net.session().get_job_meta(job_id)
    assert meta["status"] == "FINISHED:COMPLETED"
    assert sorted(meta["job_deploy_detail"]) == ["server: OK", "site-1: OK", "site-2: OK"]
    result = net.workspace / "results" / job_id / "workspace" / "fedesm"
    for sub in ("best", "last", "rounds/round_002"):
        assert (result / sub / "adapter_model.safetensors").is_file(), sub
    manifest = json.loads((result / "payload_manifest.json").read_text())
    assert set(manifest) == {"site-1", "site-2"}
    assert all(all(".lora_" in n or ".classifier." in n for n in m["tensors"]) for m in manifest.values())
    preds = (net.workspace / "preds.csv").read_text().splitlines()
    assert preds[0].startswith("id,position") and len(preds) > 3
    # the server's job store lives inside its workspace (the kit here), through its resources.json
    assert (net.kit(net.state.server) / "store" / "jobs-storage" / job_id).is_dir()


def test_admin_console_session_from_the_readme(network):
    """`check_status server`, `list_jobs`, `abort_job` fed to the kit's own fl_admin.sh on stdin."""
    net = network["net"]
    job = export(network, "--set training.steps_per_round=100000")  # hours: still running when aborted
    job_id = submit(network, job, net.admin_kit)
    deadline = time.time() + 120
    while net.job_status(job_id) != "RUNNING":
        assert time.time() < deadline, net.job_status(job_id)
        time.sleep(1)
    session = readme_block("admin console").replace("<job_id>", job_id)
    assert session.startswith("$ADMIN/startup/fl_admin.sh <<'EOF'\n" + ADMIN_USER + "\n") and "\ny\nbye\n" in session
    proc = sh(f"ADMIN={net.admin_kit}\n{session}", network, timeout=180)
    assert "Registered clients: 2" in proc.stdout and "| site-1 |" in proc.stdout and "| site-2 |" in proc.stdout
    assert re.search(rf"\| {job_id} \| esm2_fra_lora \| RUNNING", proc.stdout), proc.stdout
    assert finished(network, job_id, timeout=120)["status"] == "FINISHED:ABORTED"


# ---- what a site refuses ------------------------------------------------------------------------


def test_a_secure_job_completes_under_the_shipped_site_policy_and_the_server_gets_no_factor(network):
    """federation.secure_aggregation on the provisioned network: each site signs its round keys with its own
    kit's client.key (the kit is its workspace), the peers check them against the project's root CA, the
    job checker and the sites' outbound filters (the shipped policy) let the keys and masked words through,
    and the server saves every round without a single site's tensor ever reaching it."""
    net = network["net"]
    job = export(network, "--set federation.secure_aggregation=true", "--set federation.max_update_ratio=0",
                 "--set federation.clip_update_ratio=0")
    meta = finished(network, submit(network, job, net.admin_kit), timeout=600)
    assert meta["status"] == "FINISHED:COMPLETED", meta
    assert sorted(meta["job_deploy_detail"]) == ["server: OK", "site-1: OK", "site-2: OK"]
    run = net.download(meta["job_id"], network["root"] / "secure_result") / "workspace"
    assert (run / "fedesm" / "rounds" / "round_002" / "adapter_model.safetensors").is_file()
    manifest = json.loads((run / "fedesm" / "payload_manifest.json").read_text())
    assert manifest == {s: {"tensors": [], "parameters": 0, "secure_aggregation": True} for s in ("site-1", "site-2")}
    server_log = (run / "log.txt").read_text(errors="replace")
    assert server_log.count("secure fra of 2 sites") == 2
    for site in ("site-1", "site-2"):
        site_log = (net.kit(site) / meta["job_id"] / "log.txt").read_text(errors="replace")
        assert site_log.count("sent the masked pass2 message") == 2
        assert "site privacy policy: refused" not in site_log


def test_a_bundle_that_brings_code_is_refused_by_the_server_and_by_every_site(network):
    """The server's job checker refuses the code before any site gets it (from the project admin and a lead
    alike: a job is data); sent to the sites alone, each site's checker refuses it on its own (NVFLARE's byoc
    right, denied to every role there, would refuse it next)."""
    net = network["net"]
    job = export(network, "--with-code")
    assert (job / "app" / "custom" / "fedesm" / "flare" / "executor.py").is_file()
    refused = ("server: fedesm job check: app/custom/fedesm/__init__.py: a fedesm job carries only "
               "config/config_fed_client.json and config/config_fed_server.json")
    for kit in (net.admin_kit, net.kit("lead@org1.example")):
        meta = finished(network, submit(network, job, kit))
        assert meta["status"] == "FINISHED:FAILED_TO_RUN" and meta["job_deploy_detail"] == [refused]
        assert not (net.kit("site-1") / meta["job_id"]).exists()  # nothing of it was deployed at the site
    shutil.copytree(job / "app", job / "app_server", ignore=shutil.ignore_patterns("custom"))
    shutil.move(job / "app", job / "app_site")
    meta_json = json.loads((job / "meta.json").read_text())
    meta_json["deploy_map"] = {"app_server": ["server"], "app_site": ["site-1", "site-2"]}
    (job / "meta.json").write_text(json.dumps(meta_json))
    meta = finished(network, submit(network, job, net.admin_kit))
    assert meta["status"] == "FINISHED:FAILED_TO_RUN"
    site_line = "NVFLARE_ERROR: " + refused.split(": ", 1)[1]  # the site's own checker, before NVFLARE's byoc right
    assert sorted(meta["job_deploy_detail"]) == [
        "num_ok_sites 0 < required_min_sites 2", "server: OK", f"site-1: {site_line}", f"site-2: {site_line}"]
    assert not (net.kit("site-1") / meta["job_id"]).exists()


def test_a_component_outside_fedesms_job_shapes_is_refused_at_deployment(network):
    """The job checker (NVFLARE's app validator in each kit, fedesm.flare.job_check) refuses it before
    anything is built; more attacks of this kind: tests/security/."""
    net, root = network["net"], network["root"]
    job = export(network)
    marker = root / "the-job-ran-this"
    client = job / "app" / "config" / "config_fed_client.json"
    cfg = json.loads(client.read_text())
    cfg["components"].append({"id": "intruder", "path": "subprocess.Popen", "args": {"args": ["touch", str(marker)]}})
    client.write_text(json.dumps(cfg, indent=2))
    meta = finished(network, submit(network, job, net.admin_kit))
    assert meta["status"] == "FINISHED:FAILED_TO_RUN"
    assert meta["job_deploy_detail"] == [
        "server: fedesm job check: config/config_fed_client.json: component 'intruder' names 'subprocess.Popen', "
        "which is not one of fedesm's job component classes (fedesm.flare.job_check.COMPONENT_CLASSES)"]
    assert not marker.exists()


def test_a_job_that_declares_one_model_and_trains_another_is_refused_at_deployment(network):
    """A code-free bundle whose components get their own lora block (out_proj adapted too) while the job's
    declared blocks say q, k, v: the job checker refuses it before anything is built (each site's outbound
    filter, which would refuse the undeclared tensors, is tested in tests/unit/test_privacy_filter.py and
    tests/integration/test_privacy.py)."""
    net = network["net"]
    job = export(network)
    for name in ("config_fed_client.json", "config_fed_server.json"):
        path = job / "app" / "config" / name
        cfg = json.loads(path.read_text())
        undeclared = {**cfg["lora"], "targets": ["q_proj", "k_proj", "v_proj", "out_proj"]}
        for comp in cfg.get("components", []) + [e["executor"] for e in cfg.get("executors", [])]:
            if comp["args"].get("lora") == "{lora}":
                comp["args"]["lora"] = undeclared
        path.write_text(json.dumps(cfg, indent=2))
    meta = finished(network, submit(network, job, net.admin_kit))
    assert meta["status"] == "FINISHED:FAILED_TO_RUN"
    (line,) = meta["job_deploy_detail"]
    assert line.startswith("server: fedesm job check: config/config_fed_client.json: executors[0].executor.args.lora: ")
    assert not any((net.kit(s) / meta["job_id"]).exists() for s in ("site-1", "site-2"))


def test_a_bundle_of_another_fedesm_version_is_refused_by_every_site_in_one_line(network):
    net = network["net"]
    job = export(network)
    meta_file = job / "meta.json"
    meta_file.write_text(json.dumps({**json.loads(meta_file.read_text()), "fedesm_version": "0.0.1"}))
    meta = finished(network, submit(network, job, net.admin_kit))
    assert meta["status"] == "FINISHED:FAILED_TO_RUN"
    detail = dict(line.split(": ", 1) for line in meta["job_deploy_detail"] if ": " in line)
    import fedesm

    assert detail["server"] == "OK"  # this server warns (see the module doc)
    for site in ("site-1", "site-2"):
        assert detail[site] == (f"fedesm version mismatch: esm2_fra_lora was exported by fedesm 0.0.1, this "
                                f"participant runs {fedesm.__version__}; re-export it with fedesm "
                                f"{fedesm.__version__} (or upgrade the sites, docs/operations.md)")
        assert not (net.kit(site) / meta["job_id"]).exists()
    assert "(running it: site_policy.version_mismatch is warn)" in Path(net.state.procs[net.state.server].log).read_text()


def test_every_participant_logs_its_versions_at_start(network):
    import fedesm
    import nvflare

    net = network["net"]
    for name in (net.state.server, *net.state.clients):
        log = Path(net.state.procs[name].log).read_text()
        assert f"runs fedesm {fedesm.__version__}, nvflare {nvflare.__version__}, torch " in log, name
    for site in net.state.clients:  # and the policy the kits carry is the one shipped
        local = net.kit(site) / "local"
        resources = json.loads((local / "resources.json").read_text())
        assert resources["allow_log_streaming"] is False and "fedesm." not in resources["class_allow_list"]
        assert resources["app_validator"]["path"] == "fedesm.flare.job_check.FedesmJobValidator"
        assert json.loads((local / "authorization.json").read_text())["permissions"]["lead"]["byoc"] == "none"
