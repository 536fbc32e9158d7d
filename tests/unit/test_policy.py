"""The site policy fedesm ships (fedesm.launch.policy), its guard and its privacy filter, on real NVFLARE
objects: NVFLARE's own authorizer evaluates the authorization files, its allow-list widget checks the
class list, FLContexts carry what NVFLARE puts there at deployment and submission."""

from __future__ import annotations

import configparser
import json
import re
from pathlib import Path

import pytest

from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import AdminCommandNames, FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.fuel.sec.authz import AuthzContext, Person
from nvflare.security.security import COMMAND_CATEGORIES, FLAuthorizer

import fedesm
from fedesm.cli import main
from fedesm.errors import FedesmError
from fedesm.flare.site_guard import FedesmSiteGuard, version_problem
from fedesm.launch import policy
from fedesm.launch.jobs import JOBS, META, VERSION_KEY, export_job, render_job
from fedesm.settings import SiteGuardSettings, SettingError

REPO = Path(__file__).resolve().parents[2]
ROLES = ("project_admin", "org_admin", "lead", "member")


# ---- authorization.json -------------------------------------------------------------------------


def _authorize(config: dict, role: str, right: str, same_org: bool) -> bool:
    user = Person(f"{role}@org1.example", "org1", role)
    ok, _ = FLAuthorizer("org1" if same_org else "org2", config).authorize(AuthzContext(right, user, user))
    return ok


@pytest.mark.parametrize("role_of_site", ["client", "server"])
def test_authorization_is_nvflares_default_minus_the_code_rights(role_of_site):
    """For every role, every right NVFLARE checks and both a same-org and another-org site, NVFLARE's
    own authorizer answers exactly as with NVFLARE's default policy, except for the two rights that let
    a job run code it brings: nobody on a site, only the project admin on the server."""
    default, shipped = policy._template("default_authz"), policy.authorization(role_of_site)
    rights = policy.all_rights()
    assert set(COMMAND_CATEGORIES.values()) <= set(rights) and {"submit_job", "byoc"} <= set(rights)
    changed = set()
    for role in ROLES:
        for right in rights:
            for same_org in (True, False):
                before, after = (_authorize(c, role, right, same_org) for c in (default, shipped))
                if before != after:
                    changed.add((role, right, before, after))
    code_rights = set(policy.BYOC_RIGHTS)
    assert {r for _, r, _, _ in changed} <= code_rights and all(not after for *_, after in changed)
    for role in ROLES:
        for right in policy.BYOC_RIGHTS:
            assert _authorize(shipped, role, right, True) == (role_of_site == "server" and role == "project_admin")
    assert _authorize(default, "lead", "byoc", False)  # what the shipped policy takes away


def test_the_server_keeps_byoc_for_the_project_admin_only():
    perms = policy.authorization("server")["permissions"]
    assert perms["project_admin"] == "any"
    assert all(perms[r]["byoc"] == "none" for r in ("org_admin", "lead", "member"))


# ---- resources.json -----------------------------------------------------------------------------


@pytest.mark.parametrize("role, config", [("client", "app/config/config_fed_client.json"),
                                          ("server", "app/config/config_fed_server.json")])
def test_class_allow_list_admits_the_shipped_jobs_and_nothing_else(role, config):
    """NVFLARE's own allow-list widget passes every component of every shipped job and refuses
    anything else, fedesm's functions and other classes included (the list names exact classes)."""
    from nvflare.apis.fl_exception import UnsafeComponentError
    from nvflare.app_common.widgets.component_path_authorizer import ComponentPathAuthorizer

    resources = policy.client_resources() if role == "client" else policy.server_resources("/store")
    authorizer = ComponentPathAuthorizer()
    allowed, enforcement, _ = authorizer._get_policy_from_resources(resources)
    assert enforcement.value == "enforce"
    used = set().union(*(policy.component_paths(render_job(t)[config]) for t in JOBS.values()))
    assert "fedesm.flare.executor.EsmLoraExecutor" in used or "fedesm.flare.persistor.LoraPersistor" in used
    assert used <= set(allowed) and not any(a.endswith(".") for a in allowed)
    for path in used:
        assert any(authorizer._path_matches_prefix(path, a) for a in allowed), path
    for path in ("subprocess.Popen", "nvflare.app_common.np.np_trainer.NPTrainer", "fedesmx.Evil", "os.system",
                 "fedesm.anything.At.All", "fedesm.storage.upload", "fedesm.storage.fetch", "fedesm."):
        assert not any(authorizer._path_matches_prefix(path, a) for a in allowed), path
    with pytest.raises(UnsafeComponentError, match="not in allow_list"):
        ctx = FLContext()
        ctx.set_prop(FLContextKey.JOB_META, {}, private=True, sticky=False)
        authorizer._get_policy = lambda **kw: (allowed, enforcement, "test")  # the file's list, no workspace
        authorizer.authorize_component_config({"path": "subprocess.Popen"}, fl_ctx=ctx)


def test_site_resources_turn_log_streaming_off_declare_gpus_and_add_the_guard():
    res = policy.client_resources(num_gpus=2, gpu_mem_gib=40, guard=SiteGuardSettings(version_mismatch="warn"))
    assert res["allow_log_streaming"] is False and res["class_list_enforcement_mode"] == "enforce"
    comps = {c["id"]: c for c in res["components"]}
    assert comps["resource_manager"]["args"]["num_of_gpus"] == 2 and comps["resource_manager"]["args"][
        "mem_per_gpu_in_GiB"] == 40
    assert comps[policy.GUARD_ID] == {"id": policy.GUARD_ID, "path": policy.GUARD_PATH,
                                      "args": {"version_mismatch": "warn"}}
    # the rest is NVFLARE 2.9's own site template
    assert {"resource_consumer", "process_launcher", "site_log_streamer"} <= set(comps)
    # and NVFLARE's app-validator hook runs the job checker on every app before it is deployed
    assert res["app_validator"] == {"path": "fedesm.flare.job_check.FedesmJobValidator", "args": {"role": "client"}}
    assert policy.server_resources("/s")["app_validator"]["args"] == {"role": "server"}


def test_server_resources_keep_the_job_store_in_the_workspace_and_one_job_at_a_time():
    res = policy.server_resources("/var/nvflare/workspace/store")
    comps = {c["id"]: c for c in res["components"]}
    assert comps["job_manager"]["args"]["uri_root"] == "/var/nvflare/workspace/store/jobs-storage"
    assert res["snapshot_persistor"]["args"]["storage"]["args"]["root_dir"] == "/var/nvflare/workspace/store/snapshot-storage"
    assert comps["job_scheduler"]["args"]["max_jobs"] == policy.MAX_JOBS == 1
    assert "/tmp/nvflare" not in json.dumps(res)
    assert comps[policy.GUARD_ID]["args"] == {}  # the setting's own default


def test_the_charts_mount_the_rendering_of_the_definitions():
    """helm/*/files/ is written by `fedesm poc policy --charts`; a hand edit there fails here."""
    for chart in policy.CHART_FILES:
        files = policy.chart_files(chart)
        on_disk = sorted(p.name for p in (policy.CHARTS_DIR / chart / "files").iterdir())
        assert on_disk == sorted(files), chart
        for name, content in files.items():
            assert json.loads((policy.CHARTS_DIR / chart / "files" / name).read_text()) == content, (chart, name)


def test_apply_to_kits_and_the_cli(tmp_path, capsys):
    for name in ("site-1", "site-2", "fl.example.org"):
        (tmp_path / name / "local").mkdir(parents=True)
    policy.apply_to_kits(tmp_path, "fl.example.org", ["site-1", "site-2"], store_root="/srv/store")
    assert sorted(p.name for p in (tmp_path / "site-1" / "local").iterdir()) == sorted(policy.SITE_FILES)
    assert sorted(p.name for p in (tmp_path / "fl.example.org" / "local").iterdir()) == sorted(policy.SERVER_FILES)
    server = json.loads((tmp_path / "fl.example.org" / "local" / "resources.json").read_text())
    assert server == policy.server_resources("/srv/store")
    assert main(["poc", "policy", "--role", "site", "--gpus", "1", "--out", str(tmp_path / "x")]) == 0
    assert json.loads((tmp_path / "x" / "resources.json").read_text()) == policy.client_resources(num_gpus=1)
    assert main(["poc", "policy", "--role", "simulator", "--out", str(tmp_path / "ws")]) == 0
    simulator = json.loads((tmp_path / "ws" / "local" / "resources.json").read_text())
    assert simulator["class_allow_list"] == sorted(set(policy.class_allow_list("client")) |
                                                   set(policy.class_allow_list("server")))
    assert main(["poc", "policy", "--role", "server", "--server-store", "rel/store", "--out", str(tmp_path / "y")]) == 2
    assert "give an absolute path" in capsys.readouterr().err


# ---- the version guard --------------------------------------------------------------------------


def _deploy_ctx(job_meta: dict, command: str = AdminCommandNames.SUBMIT_JOB) -> FLContext:
    """What a site's admin handler puts into the FLContext before firing AUTHORIZE_COMMAND_CHECK."""
    ctx = FLContext()
    ctx.set_prop(FLContextKey.COMMAND_NAME, command, sticky=False)
    ctx.set_prop(FLContextKey.SECURITY_ITEMS, {FLContextKey.JOB_META: job_meta}, private=True, sticky=False)
    return ctx


def test_site_guard_refuses_a_job_of_another_fedesm_version_at_deployment(tmp_path):
    """The job meta NVFLARE hands over at deployment is meta.json's: export a bundle, claim another
    version, and the guard refuses it in one line; the same bundle as exported passes."""
    job = export_job("esm2_fra_lora", tmp_path)
    meta = json.loads((job / META).read_text())
    assert meta[VERSION_KEY] == fedesm.__version__
    guard = FedesmSiteGuard()
    ok = _deploy_ctx(meta)
    guard.handle_event(EventType.AUTHORIZE_COMMAND_CHECK, ok)
    assert ok.get_prop(FLContextKey.AUTHORIZATION_RESULT, True) is True
    old = _deploy_ctx({**meta, VERSION_KEY: "0.0.1"})
    guard.handle_event(EventType.AUTHORIZE_COMMAND_CHECK, old)
    assert old.get_prop(FLContextKey.AUTHORIZATION_RESULT) is False
    reason = old.get_prop(FLContextKey.AUTHORIZATION_REASON)
    assert reason == (f"fedesm version mismatch: esm2_fra_lora was exported by fedesm 0.0.1, this participant runs "
                      f"{fedesm.__version__}; re-export it with fedesm {fedesm.__version__} (or upgrade the sites, "
                      "docs/operations.md)") and "\n" not in reason
    # check_resources is not deployment: refusing there would leave the job waiting for resources forever
    scheduling = _deploy_ctx({**meta, VERSION_KEY: "0.0.1"}, AdminCommandNames.CHECK_RESOURCES)
    guard.handle_event(EventType.AUTHORIZE_COMMAND_CHECK, scheduling)
    assert scheduling.get_prop(FLContextKey.AUTHORIZATION_RESULT, True) is True


def test_site_guard_warns_when_told_to_and_refuses_jobs_that_record_no_version():
    warn = FedesmSiteGuard(version_mismatch="warn")
    ctx = _deploy_ctx({"name": "j", VERSION_KEY: "9.9"})
    warn.handle_event(EventType.AUTHORIZE_COMMAND_CHECK, ctx)
    assert ctx.get_prop(FLContextKey.AUTHORIZATION_RESULT, True) is True
    missing = (f"fedesm version missing: hello-numpy records no fedesm_version in meta.json, so this participant "
               f"cannot tell which fedesm wrote it; export it with `fedesm job export` (fedesm {fedesm.__version__})")
    for meta in ({"name": "hello-numpy"}, {"name": "hello-numpy", VERSION_KEY: None}):
        plain = _deploy_ctx(meta)
        FedesmSiteGuard().handle_event(EventType.AUTHORIZE_COMMAND_CHECK, plain)
        assert plain.get_prop(FLContextKey.AUTHORIZATION_RESULT) is False
        assert plain.get_prop(FLContextKey.AUTHORIZATION_REASON) == missing
        submitted = FLContext()
        submitted.set_prop(FLContextKey.JOB_META, meta, private=True, sticky=False)
        FedesmSiteGuard().handle_event(EventType.SUBMIT_JOB, submitted)
        assert submitted.get_prop(FLContextKey.JOB_BLOCK_REASON) == missing
    lenient = _deploy_ctx({"name": "hello-numpy"})
    warn.handle_event(EventType.AUTHORIZE_COMMAND_CHECK, lenient)  # warn keeps the warning-only path
    assert lenient.get_prop(FLContextKey.AUTHORIZATION_RESULT, True) is True
    assert version_problem({VERSION_KEY: fedesm.__version__}) is None
    assert version_problem(None).startswith("fedesm version missing: the job records no fedesm_version")
    assert len(version_problem({"name": "x" * 5000, VERSION_KEY: "y" * 5000})) < 400  # one short line
    with pytest.raises(SettingError, match="site_policy.version_mismatch: 'ignore' is not one of refuse, warn"):
        FedesmSiteGuard(version_mismatch="ignore")


def test_server_guard_blocks_the_submission_of_a_job_of_another_version():
    ctx = FLContext()
    ctx.set_prop(FLContextKey.JOB_META, {"name": "esm2_fra_lora", VERSION_KEY: "0.0.1"}, private=True, sticky=False)
    FedesmSiteGuard().handle_event(EventType.SUBMIT_JOB, ctx)
    assert "fedesm version mismatch: esm2_fra_lora was exported by fedesm 0.0.1" in ctx.get_prop(
        FLContextKey.JOB_BLOCK_REASON)
    ctx = FLContext()
    ctx.set_prop(FLContextKey.JOB_META, {"name": "x", VERSION_KEY: "0.0.1"}, private=True, sticky=False)
    FedesmSiteGuard(version_mismatch="warn").handle_event(EventType.SUBMIT_JOB, ctx)
    assert ctx.get_prop(FLContextKey.JOB_BLOCK_REASON) is None


def test_site_policy_setting_has_one_home():
    assert SiteGuardSettings().version_mismatch == "refuse"
    assert SiteGuardSettings.from_dict({"version_mismatch": "warn"}).to_dict() == {"version_mismatch": "warn"}
    with pytest.raises(SettingError, match="unknown site_policy setting 'version'"):
        SiteGuardSettings.from_dict({"version": "warn"})


# ---- versions pinned ----------------------------------------------------------------------------


def test_nvflare_is_pinned_to_the_installed_2_9_series_in_setup_cfg_and_the_image():
    import nvflare
    from packaging.requirements import Requirement

    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    reqs = [Requirement(line) for line in cfg["options"]["install_requires"].split("\n") if line.strip()]
    spec = next(r for r in reqs if r.name == "nvflare").specifier
    assert str(spec) in ("<2.10,>=2.9", ">=2.9,<2.10")
    image = re.search(r"ARG NVFLARE_VERSION=(\S+)", (REPO / "docker" / "Dockerfile").read_text()).group(1)
    assert spec.contains(image) and spec.contains(nvflare.__version__)
    assert 'pip install "nvflare==${NVFLARE_VERSION}" .' in (REPO / "docker" / "Dockerfile").read_text()
    assert cfg["metadata"]["version"] == "attr: fedesm.__version__"  # one home for fedesm's version


# ---- the privacy scope (the filter itself: tests/unit/test_privacy_filter.py) -----------------------


def test_privacy_json_names_the_filter_as_its_default_scope():
    p = policy.privacy()
    assert p["default_scope"] == p["scopes"][0]["name"] == policy.PRIVACY_SCOPE
    assert p["scopes"][0]["task_result_filters"] == [{"path": "fedesm.flare.privacy.AdaptersOnlyFilter",
                                                      "args": {"max_lora_rank": 64}}]
    assert policy.privacy(max_lora_rank=16)["scopes"][0]["task_result_filters"][0]["args"] == {"max_lora_rank": 16}


def test_loopback_server_names_are_refused_for_real_kits(tmp_path, capsys):
    from fedesm.launch.network import DEFAULT_PROJECT_FILE, NetworkError, is_loopback_name, render_project

    for name in ("localhost", "LOCALHOST.", "127.0.0.1", "127.1.2.3", "fl.localhost"):
        assert is_loopback_name(name), name
    assert not is_loopback_name("fl.example.org")
    with pytest.raises(NetworkError, match="'localhost' is loopback: NVFLARE would listen on 127.0.0.1 only"):
        render_project(DEFAULT_PROJECT_FILE, tmp_path / "p.yml", allow_loopback=False)  # the file's own name
    assert render_project(DEFAULT_PROJECT_FILE, tmp_path / "p.yml", server_name="fl.example.org",
                          allow_loopback=False).is_file()
    for name in ("localhost", "127.0.0.1"):
        assert main(["poc", "provision", "--server-name", name, "--workspace", str(tmp_path / "k")]) == 2
        assert "is loopback: NVFLARE would listen on 127.0.0.1 only" in capsys.readouterr().err
    assert not (tmp_path / "k" / "fedesm").exists()
    with pytest.raises(FedesmError):
        render_project(DEFAULT_PROJECT_FILE, tmp_path / "q.yml", server_name="localhost", allow_loopback=False)
