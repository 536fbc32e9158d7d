"""The job checker (fedesm.flare.job_check) and the exact class allow-list, attacked as a job submitter
would: every callable a dotted path can reach in fedesm, other arguments, other ids, other files, other
event conversions and filters. The shipped jobs and every export the experiment presets make pass."""

from __future__ import annotations

import copy
import importlib
import json
import pkgutil
from pathlib import Path

import pytest
from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.fl_exception import UnsafeComponentError
from nvflare.app_common.widgets.component_path_authorizer import ComponentPathAuthorizer
from nvflare.fuel.utils.class_loader import load_class

import fedesm
from fedesm.errors import FedesmError
from fedesm.flare.job_check import (CLIENT_FILE, COMPONENT_CLASSES, SERVER_FILE, FedesmJobValidator, check_app,
                                    check_configs)
from fedesm.launch import policy
from fedesm.launch.jobs import CLIENT_CONFIG, JOBS, SERVER_CONFIG, export_job, render_job

SHIPPED = render_job(JOBS["esm2_fra_lora"])


def configs(client=None, server=None) -> dict:
    return {CLIENT_FILE: copy.deepcopy(client or SHIPPED[CLIENT_CONFIG]),
            SERVER_FILE: copy.deepcopy(server or SHIPPED[SERVER_CONFIG])}


def refusal(cfgs: dict) -> str:
    with pytest.raises(FedesmError) as err:
        check_configs(cfgs)
    line = str(err.value)
    assert "\n" not in line
    return line


def reachable_paths() -> set[str]:
    """Every dotted path NVFLARE's loader (import the module before the last dot, take the attribute) turns
    into a callable under fedesm: functions, classes, and whatever each module imported."""
    paths = {"fedesm.cli.__main__.main"}  # importing it runs the CLI: named, not imported
    for info in pkgutil.walk_packages(fedesm.__path__, "fedesm."):
        if info.name.endswith(".__main__"):
            continue
        module = importlib.import_module(info.name)
        paths |= {f"{info.name}.{name}" for name in dir(module) if callable(getattr(module, name, None))}
    return paths


def allow_lists() -> dict:
    authorizer = ComponentPathAuthorizer()
    return {role: authorizer._get_policy_from_resources(res)[0]
            for role, res in (("client", policy.client_resources()), ("server", policy.server_resources("/s")))}


def nvflare_allows(path: str, allowed: list) -> bool:
    return any(ComponentPathAuthorizer._path_matches_prefix(path, a) for a in allowed)


# ---- what passes --------------------------------------------------------------------------------


def test_every_shipped_job_passes_at_every_participant(tmp_path):
    for name in JOBS:
        job = export_job(name, tmp_path)
        for role in ("client", "server"):
            check_app(job / "app", role)
        assert FedesmJobValidator("client").validate(str(job / "app")) == ("", {})
    # and with the component a setting switches on (MLflow, its URI left to the server)
    job = export_job("esm2_cyclic", tmp_path / "m", ["federation.mlflow=true", "strategy=fra-ef", "lora.r=4"])
    check_app(job / "app", "server")


def test_every_export_the_experiment_presets_make_passes(tmp_path):
    from fedesm.experiments.config import arm_settings, list_presets, load_config

    n = 0
    for preset in list_presets():
        cfg = load_config(preset)
        for exp in cfg.experiments:
            for arm in exp.arms:
                if arm.kind != "federated":
                    continue
                job = export_job(exp.job, tmp_path, job_name=f"{preset}-{exp.id}-{arm.id}",
                                 settings=arm_settings(cfg, exp, arm, cfg.seeds[0], backbone="random:esm2_t2_tiny"))
                check_app(job / "app", "client")
                check_app(job / "app", "server")
                n += 1
    assert n >= 10  # the presets' federated arms, each exported as the experiments do


# ---- the class of "a job names a callable" ------------------------------------------------------


def test_every_fedesm_callable_that_is_not_a_component_class_is_refused_by_both_checks():
    """Enumerated, not sampled: each path NVFLARE's loader can reach in fedesm that is not a listed class
    is refused by the job checker (as an extra component, and as the executor's class) and by NVFLARE's
    own allow-list widget with the kits' lists."""
    paths = reachable_paths()
    assert "fedesm.storage.upload" in paths and "fedesm.storage.fetch" in paths and "fedesm.storage.Path" in paths
    assert COMPONENT_CLASSES <= paths | {p for p in COMPONENT_CLASSES if p.startswith("nvflare.")}
    lists = allow_lists()
    foreign = sorted(paths - COMPONENT_CLASSES)
    assert len(foreign) > 500
    base = SHIPPED[CLIENT_CONFIG]
    for path in foreign:
        extra = {**base, "components": base["components"] + [{"id": "x", "path": path, "args": {}}]}
        assert f"component 'x' names '{path}', which is not one of fedesm's" in refusal(configs(client=extra)), path
        swapped = copy.deepcopy(base)
        swapped["executors"][0]["executor"]["path"] = path
        assert f"component 'executor' names '{path}'" in refusal(configs(client=swapped)), path
        assert not any(nvflare_allows(path, allowed) for allowed in lists.values()), path


def test_a_dotted_path_below_a_listed_class_reaches_nothing():
    """NVFLARE admits `<listed class>.<anything>` by its prefix rule; its loader imports the part before the
    last dot as a module, which a class is not, so no method or attribute of a listed class can be built."""
    lists = allow_lists()
    for cls_path in sorted(COMPONENT_CLASSES):
        cls = load_class(cls_path)
        for name in [n for n in dir(cls) if callable(getattr(cls, n, None))][:40]:
            path = f"{cls_path}.{name}"
            with pytest.raises(TypeError, match="Can't load class"):
                load_class(path)
            assert "is not one of fedesm's job component classes" in refusal(configs(
                client={**SHIPPED[CLIENT_CONFIG], "components": [{"id": "m", "path": path, "args": {}}]}))
        assert any(nvflare_allows(cls_path, a) for a in lists.values())


def test_the_kits_allow_lists_name_exact_classes_and_nvflare_refuses_the_rest():
    lists = allow_lists()
    for role, allowed in lists.items():
        assert allowed == policy.class_allow_list(role)
        assert all(not a.endswith(".") and a.count(".") >= 2 for a in allowed), allowed  # no package prefix
        used = {p for t in JOBS.values() for p in policy.component_paths(
            render_job(t, t.settings.replace(federation=t.settings.federation.replace(mlflow=True)))[
                CLIENT_CONFIG if role == "client" else SERVER_CONFIG])}
        assert used <= set(allowed)
        authorizer = ComponentPathAuthorizer()
        authorizer._get_policy = lambda allowed=allowed, **kw: (allowed, authorizer._get_policy_from_resources(
            {"class_allow_list": allowed})[1], "test")
        ctx = FLContext()
        ctx.set_prop(FLContextKey.JOB_META, {}, private=True, sticky=False)
        for path in ("fedesm.storage.upload", "fedesm.flare.job_check.check_app", "subprocess.Popen",
                     "fedesm.flare.executor.load_backbone"):
            with pytest.raises(UnsafeComponentError, match="not in allow_list"):
                authorizer.authorize_component_config({"path": path}, fl_ctx=ctx)


# ---- the class of "a job chooses the arguments, ids, events, filters, files" --------------------


def _client(edit) -> dict:
    cfg = copy.deepcopy(SHIPPED[CLIENT_CONFIG])
    edit(cfg)
    return configs(client=cfg)


def _server(edit) -> dict:
    cfg = copy.deepcopy(SHIPPED[SERVER_CONFIG])
    edit(cfg)
    return configs(server=cfg)


def _comp(cfg, cid):
    return next(c for c in cfg["components"] if c["id"] == cid)


@pytest.mark.parametrize("edit, expected", [
    (lambda c: _comp(c, "event_to_fed")["args"].update(events_to_convert=["analytix_log_stats", "_error_log_available"]),
     "components[event_to_fed].args.events_to_convert: "),
    (lambda c: _comp(c, "event_to_fed")["args"].update(fed_event_prefix="x."),
     "components[event_to_fed].args.fed_event_prefix: 'x.' is not fedesm's 'fed.'"),
    (lambda c: _comp(c, "analytic_sender")["args"].update(event_type="_error_log_available"),
     "components[analytic_sender].args: 'event_type' is not in fedesm's job"),
    (lambda c: c["executors"][0]["executor"]["args"].update(output_dir="/tmp/x"),
     "executors[0].executor.args: 'output_dir' is not in fedesm's job"),
    (lambda c: c["executors"][0]["executor"]["args"].update(class_attributes={"model": {}}),
     "executors[0].executor.args: 'class_attributes' is not in fedesm's job"),
    (lambda c: c["executors"][0]["executor"]["args"].update(lora={"r": 64, "alpha": 1.0}),
     "executors[0].executor.args.lora: "),
    (lambda c: c["executors"][0].update(tasks=["train", "validate", "submit_model", "shell"]),
     "executors[0].tasks: "),
    (lambda c: _comp(c, "event_to_fed").update(id="event_to_fed_2"),
     "components: component id 'event_to_fed_2' is not one of fedesm's"),
    (lambda c: c["components"].append(copy.deepcopy(c["components"][1])),
     "components: component 'event_to_fed' must appear once (found 2)"),
    (lambda c: c["components"].pop(1), "components: component 'event_to_fed' must appear once (found 0)"),
    (lambda c: c["task_result_filters"].append({"tasks": ["train"], "filters": [{"path": "fedesm.flare.privacy."
                                                                                         "AdaptersOnlyFilter"}]}),
     "names 'fedesm.flare.privacy.AdaptersOnlyFilter', which is not one of fedesm's"),
    (lambda c: c["task_data_filters"].append({"tasks": ["train"], "filters": []}), "task_data_filters: "),
    (lambda c: c.update(log_config={"level": "DEBUG"}), "top level: 'log_config' is not in fedesm's job"),
    (lambda c: c["components"].append({"id": "n", "name": "AnalyticsSender", "args": {}}),
     "component 'n' names its class by 'name'"),
    (lambda c: c["components"].append({"id": "n", "class_path": "nvflare.app_common.widgets.streaming.AnalyticsSender"}),
     "component 'n' names its class by 'class_path'"),
    (lambda c: _comp(c, "analytic_sender")["args"].update(inner={"path": "fedesm.storage.fetch", "args": {}}),
     "component at components[0].args.inner names 'fedesm.storage.fetch'"),
    (lambda c: c["training"].update(shell="rm -rf /"), "unknown training setting 'shell'"),
    (lambda c: c["federation"].update(min_clients=0), "federation.min_clients"),
    (lambda c: c.pop("lora"), "settings block(s) lora missing"),
    (lambda c: c["training"].update(lr=0.1), "carry different settings"),
])
def test_a_client_config_that_is_not_fedesms_is_refused_in_one_line(edit, expected):
    assert expected in refusal(_client(edit))


@pytest.mark.parametrize("edit, expected", [
    (lambda c: _comp(c, "tb_receiver")["args"].update(tb_folder="/var/www"),
     "components[tb_receiver].args.tb_folder: '/var/www' is not fedesm's 'tb_events'"),
    (lambda c: _comp(c, "tb_receiver")["args"].update(events=["fed.analytix_log_stats", "fed._error_log_available"]),
     "components[tb_receiver].args.events: "),
    (lambda c: c["workflows"][0]["args"].update(num_rounds=10 ** 6), "workflows[scatter_and_gather].args.num_rounds"),
    (lambda c: c["workflows"].reverse(), "workflows: the first is 'global_model_eval', not one of fedesm's"),
    (lambda c: _comp(c, "persistor")["args"].update(output_dir="/etc"), "'output_dir' is not in fedesm's job"),
    (lambda c: c["federation"].update(mlflow=True, mlflow_tracking_uri="file:/etc/cron.d"),
     "federation.mlflow_tracking_uri: a job may not name where the server writes or sends metrics"),
])
def test_a_server_config_that_is_not_fedesms_is_refused_in_one_line(edit, expected):
    cfgs = _server(edit)
    if "federation" in json.dumps(expected):  # the blocks travel in both files
        cfgs[CLIENT_FILE]["federation"] = cfgs[SERVER_FILE]["federation"]
    assert expected in refusal(cfgs)


def test_an_app_with_any_other_file_is_refused_and_the_validator_answers_in_one_line(tmp_path):
    job = export_job("esm2_fra_lora", tmp_path)
    app = job / "app"
    assert FedesmJobValidator("client").validate(str(app)) == ("", {})
    for extra in ("custom/fedesm/__init__.py", "config/config_fed_client.conf", "config/resources.json",
                  "config/log_config.json", "site-packages/evil.pth"):
        (app / extra).parent.mkdir(parents=True, exist_ok=True)
        (app / extra).write_text("{}")
        err, props = FedesmJobValidator("client").validate(str(app))
        assert err == (f"fedesm job check: app/{extra}: a fedesm job carries only config/config_fed_client.json and "
                       "config/config_fed_server.json") and props == {}
        (app / extra).unlink()
    (app / "config" / "config_fed_client.json").write_bytes(b"\xff\xfe{")
    err, _ = FedesmJobValidator("client").validate(str(app))
    assert err.startswith("fedesm job check: app/config/config_fed_client.json: not readable JSON") and "\n" not in err
    (app / "config" / "config_fed_client.json").unlink()
    assert FedesmJobValidator("client").validate(str(app))[0] == "fedesm job check: app/config/config_fed_client.json is missing"
    with pytest.raises(FedesmError, match="role 'admin' is not one of client, server"):
        FedesmJobValidator("admin")


def test_nvflare_runs_the_checker_before_deploying_and_leaves_nothing(tmp_path):
    """NVFLARE's own AppDeployer with the validator the kits configure: a hostile app is refused with the
    checker's line, and its run folder is gone; the shipped app deploys."""
    from nvflare.apis.workspace import Workspace
    from nvflare.fuel.utils.zip_utils import zip_directory_to_bytes
    from nvflare.private.fed.app.fl_app_validator import FLAppValidator
    from nvflare.private.fed.utils.app_authz import AppAuthzService
    from nvflare.private.fed.utils.app_deployer import AppDeployer

    (tmp_path / "ws" / "startup").mkdir(parents=True)
    (tmp_path / "ws" / "local").mkdir()
    workspace = Workspace(root_dir=str(tmp_path / "ws"), site_name="site-1")
    job = export_job("esm2_fra_lora", tmp_path / "jobs")
    cfg = json.loads((job / CLIENT_CONFIG).read_text())
    cfg["components"].append({"id": "exfil", "path": "fedesm.storage.upload", "args": {"local_path": "/x", "uri": "s3://a/"}})
    hostile = tmp_path / "hostile"
    (hostile / "config").mkdir(parents=True)
    (hostile / CLIENT_FILE).write_text(json.dumps(cfg))
    before = AppAuthzService.app_validator
    AppAuthzService.initialize(FLAppValidator(site_type="client", custom_validators=[FedesmJobValidator("client")]))
    try:
        deploy = lambda app, job_id: AppDeployer().deploy(  # noqa: E731
            workspace=workspace, job_id=job_id, job_meta={"name": "j"}, app_name="app",
            app_data=zip_directory_to_bytes(str(app), ""), fl_ctx=FLContext())
        assert deploy(hostile, "job-1") == ("fedesm job check: config/config_fed_client.json: component 'exfil' names "
                                            "'fedesm.storage.upload', which is not one of fedesm's job component "
                                            "classes (fedesm.flare.job_check.COMPONENT_CLASSES)")
        assert not Path(workspace.get_run_dir("job-1")).exists()
        assert not deploy(job / "app", "job-2")
        assert Path(workspace.get_app_dir("job-2"), CLIENT_FILE).is_file()
    finally:
        AppAuthzService.app_validator = before
