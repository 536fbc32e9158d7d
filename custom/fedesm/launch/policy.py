"""The policy fedesm ships for each participant: NVFLARE's ``local/`` files, defined once here.

A site that installed fedesm runs only that code. Its kit's ``local/`` folder gets:

* ``authorization.json``: NVFLARE 2.9's default policy with the ``byoc`` right (jobs that bring
  code in ``app/custom``) denied to every role, the project admin included;
* ``resources.json``: NVFLARE's site resources with a class allow-list of the exact component
  classes the shipped jobs name (`fedesm.launch.jobs`; NVFLARE matches an entry without a trailing
  dot as that path exactly, and its loader imports the module before the last dot, so no function,
  method or other class is reachable), the job checker as NVFLARE's ``app_validator``
  (`fedesm.flare.job_check.FedesmJobValidator`: every app is compared with fedesm's job shapes
  after unpacking and before anything is built), ``allow_log_streaming`` off (no site log leaves
  the site), the GPUs the site declares, and `FedesmSiteGuard` (logs the versions, refuses jobs of
  another fedesm version or none: `SiteGuardSettings`);
* ``privacy.json``: one scope, the default, whose result filter lets only the job's LoRA factors and
  head (names, shapes and dtype of the model it declares, rank at most ``max_lora_rank``), counts
  and metrics leave, and refuses anything else with a logged reason
  (`fedesm.flare.privacy.AdaptersOnlyFilter`).

The server gets ``authorization.json`` with ``byoc`` left only to the project admin (org admins and
leads may not run their code on the orchestrator; the server's job checker refuses an app with code
from anyone, so that right only matters where the checker is taken out), and ``resources.json``
with its own allow-list and job checker, its job store and snapshots under one folder of its workspace, and ``max_jobs`` 1 (two jobs never
share a site's GPU unnoticed). Both are built on the templates of the installed NVFLARE, so they
stay NVFLARE 2.9's files with fedesm's changes and nothing else.

Users: `fedesm poc provision` and `LocalNetwork(site_policy=True)` write them into the kits, the
Helm charts mount their rendering (``helm/*/files/``, rewritten by `write_chart_files`; a test keeps
them equal), and `fedesm.launch.simulate` puts the allow-list and privacy scope into simulator
workspaces so code-free bundles run there under the same rules.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Iterable, Optional

import yaml

from fedesm.errors import FedesmError
from fedesm.fileio import atomic_write_text
from fedesm.launch.jobs import CLIENT_CONFIG, JOBS, SERVER_CONFIG, render_job
from fedesm.paths import repo_path
from fedesm.settings import SiteGuardSettings

AUTHORIZATION = "authorization.json"
RESOURCES = "resources.json"
PRIVACY = "privacy.json"
SITE_FILES = (AUTHORIZATION, PRIVACY, RESOURCES)
SERVER_FILES = (AUTHORIZATION, RESOURCES)
BYOC_RIGHTS = ("byoc", "server-predeployed-flwr")  # the rights that let a job run code it brings
MAX_JOBS = 1  # the server runs one job at a time: a site's GPU is never shared by two jobs unnoticed
GUARD_ID = "fedesm_site_guard"
GUARD_PATH = "fedesm.flare.site_guard.FedesmSiteGuard"
PRIVACY_FILTER_PATH = "fedesm.flare.privacy.AdaptersOnlyFilter"
MAX_LORA_RANK = 64  # the default cap on the rank of the factors a site sends (the privacy filter's max_lora_rank)
VALIDATOR_PATH = "fedesm.flare.job_check.FedesmJobValidator"
PRIVACY_SCOPE = "fedesm"
CHARTS_DIR = repo_path("helm")
# The server's job store as the image lays it out: inside NVFL_WORKSPACE (/var/nvflare/workspace), which the
# orchestrator chart puts on its volume.
IMAGE_STORE_ROOT = "/var/nvflare/workspace/store"
CHART_FILES = {"fedesm-site": "client", "fedesm-orchestrator": "server"}


# ------------------------------------------------------------------------------------------------
# NVFLARE's own templates (the installed 2.9)
# ------------------------------------------------------------------------------------------------


def _template(section: str, replacements: Optional[dict] = None) -> dict:
    """A JSON section of NVFLARE's master_template.yml with its {~~key~~} placeholders filled."""
    import nvflare.lighter

    path = Path(nvflare.lighter.__file__).resolve().parent / "templates" / "master_template.yml"
    text = yaml.safe_load(path.read_text())[section]
    for key, value in (replacements or {}).items():
        text = text.replace("{~~" + key + "~~}", value)
    return json.loads(text)


def all_rights() -> list[str]:
    """Every right NVFLARE 2.9 checks: its admin commands, their categories, and the code rights."""
    from nvflare.apis.fl_constant import AdminCommandNames
    from nvflare.security.security import COMMAND_CATEGORIES

    commands = {v for k, v in vars(AdminCommandNames).items() if not k.startswith("_") and isinstance(v, str)}
    return sorted(commands | set(COMMAND_CATEGORIES.values()) | set(BYOC_RIGHTS))


# ------------------------------------------------------------------------------------------------
# the three files
# ------------------------------------------------------------------------------------------------


def component_paths(config) -> set[str]:
    """Every component class a job config names (`"path": ...` at any depth)."""
    if isinstance(config, dict):
        own = {config["path"]} if isinstance(config.get("path"), str) else set()
        return own.union(*(component_paths(v) for v in config.values()))
    if isinstance(config, list):
        return set().union(*(component_paths(v) for v in config))
    return set()


def component_classes(role: Optional[str] = None) -> frozenset[str]:
    """The exact class paths fedesm's jobs name, for `role` (client | server) or both: every shipped job
    rendered with each component a setting can switch on (MLflow)."""
    files = {"client": [CLIENT_CONFIG], "server": [SERVER_CONFIG], None: [CLIENT_CONFIG, SERVER_CONFIG]}[role]
    found = set()
    for template in JOBS.values():
        for mlflow in (False, True):
            s = template.settings
            rendered = render_job(template, s.replace(federation=s.federation.replace(mlflow=mlflow)))
            found |= {p for f in files for p in component_paths(rendered[f])}
    return frozenset(found)


def class_allow_list(role: str) -> list[str]:
    """The exact component classes fedesm's jobs name for `role` (client | server): full class paths,
    never a package prefix (a prefix admits every callable under it, functions included)."""
    return sorted(component_classes(role))


def authorization(role: str) -> dict:
    """NVFLARE's default authorization with the code rights denied: to everyone on a site (`client`),
    to everyone but the project admin on the server."""
    policy = _template("default_authz")
    for name, rights in policy["permissions"].items():
        if role == "server" and name == "project_admin":
            continue
        if isinstance(rights, str):  # "any" grants every right at once: spell them out to take two away
            rights = {right: rights for right in all_rights()}
        policy["permissions"][name] = {**rights, **{right: "none" for right in BYOC_RIGHTS}}
    return policy


def privacy(max_lora_rank: Optional[int] = None) -> dict:
    """One scope, the default for every job: only the job's adapters, the head and metrics leave the site."""
    args = {"max_lora_rank": int(max_lora_rank or MAX_LORA_RANK)}
    return {"scopes": [{"name": PRIVACY_SCOPE, "properties": {},
                        "task_result_filters": [{"path": PRIVACY_FILTER_PATH, "args": args}]}],
            "default_scope": PRIVACY_SCOPE}


def _guard(guard: Optional[SiteGuardSettings]) -> dict:
    """The guard component with the participant's own settings (None: the settings' defaults)."""
    args = {} if guard is None else guard.to_dict()
    return {"id": GUARD_ID, "path": GUARD_PATH, "args": args}


def _validator(role: str) -> dict:
    """NVFLARE's app_validator hook: the job checker, run on every app before it is deployed."""
    return {"path": VALIDATOR_PATH, "args": {"role": role}}


def client_resources(num_gpus: int = 0, gpu_mem_gib: float = 0, guard: Optional[SiteGuardSettings] = None) -> dict:
    """A site's resources.json: NVFLARE's, with fedesm's allow-list, no log streaming, its GPUs, the guard."""
    res = _template("local_client_resources", {
        "num_gpus": json.dumps(int(num_gpus)), "gpu_mem": json.dumps(gpu_mem_gib), "allow_log_streaming": "false",
        "class_allow_list": json.dumps(class_allow_list("client"))})
    res["components"].append(_guard(guard))
    res["app_validator"] = _validator("client")
    return res


def server_resources(store_root: str | os.PathLike, max_jobs: int = MAX_JOBS,
                     guard: Optional[SiteGuardSettings] = None) -> dict:
    """The server's resources.json: NVFLARE's, with its allow-list, the job store and snapshots under
    `store_root` (inside its workspace), `max_jobs`, the guard."""
    res = _template("local_server_resources", {"class_allow_list": json.dumps(class_allow_list("server"))})
    store = str(store_root).rstrip("/")
    found = set()
    for comp in res["components"]:
        if comp.get("id") == "job_manager":
            comp["args"]["uri_root"] = f"{store}/jobs-storage"
            found.add("job_manager")
        elif comp.get("id") == "job_scheduler":
            comp["args"]["max_jobs"] = int(max_jobs)
            found.add("job_scheduler")
    res["snapshot_persistor"]["args"]["storage"]["args"]["root_dir"] = f"{store}/snapshot-storage"
    if found != {"job_manager", "job_scheduler"}:
        raise FedesmError(f"NVFLARE's server resources template has no {sorted({'job_manager', 'job_scheduler'} - found)}")
    res["components"].append(_guard(guard))
    res["app_validator"] = _validator("server")
    return res


def simulator_resources() -> dict:
    """What a simulator workspace's local/resources.json needs: the allow-lists of both roles, no log streaming."""
    allowed = sorted(set(class_allow_list("client")) | set(class_allow_list("server")))
    return {"format_version": 2, "class_list_enforcement_mode": "enforce", "class_allow_list": allowed,
            "allow_log_streaming": False}


# ------------------------------------------------------------------------------------------------
# writing them
# ------------------------------------------------------------------------------------------------


def _write_json(path: Path, content: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(content, indent=2) + "\n")
    return path


def write_site_policy(local_dir, num_gpus: int = 0, gpu_mem_gib: float = 0,
                      guard: Optional[SiteGuardSettings] = None) -> list[Path]:
    """authorization.json, privacy.json and resources.json into a site kit's (or workspace's) local/."""
    local = Path(local_dir)
    local.mkdir(parents=True, exist_ok=True)
    return [_write_json(local / AUTHORIZATION, authorization("client")),
            _write_json(local / PRIVACY, privacy()),
            _write_json(local / RESOURCES, client_resources(num_gpus, gpu_mem_gib, guard))]


def write_server_policy(local_dir, store_root, max_jobs: int = MAX_JOBS,
                        guard: Optional[SiteGuardSettings] = None) -> list[Path]:
    """authorization.json and resources.json into the server kit's local/."""
    local = Path(local_dir)
    local.mkdir(parents=True, exist_ok=True)
    return [_write_json(local / AUTHORIZATION, authorization("server")),
            _write_json(local / RESOURCES, server_resources(store_root, max_jobs, guard))]


def apply_to_kits(kits_dir, server: str, clients: Iterable[str], store_root=None) -> list[Path]:
    """The shipped policy into freshly provisioned kits: every site's local/ and the server's.

    `store_root`: the server's job store (default: `store/` inside its kit, i.e. its workspace).
    """
    kits = Path(kits_dir)
    written = []
    for name in clients:
        written += write_site_policy(kits / name / "local")
    server_kit = kits / server
    written += write_server_policy(server_kit / "local", store_root or server_kit.resolve() / "store")
    return written


def write_simulator_policy(workspace) -> Path:
    """The allow-list and privacy scope into a simulator workspace's local/ (NVFLARE copies it to every
    participant), so a code-free bundle runs there under the sites' rules."""
    local = Path(workspace) / "local"
    local.mkdir(parents=True, exist_ok=True)
    _write_json(local / PRIVACY, privacy())
    return _write_json(local / RESOURCES, simulator_resources())


# ------------------------------------------------------------------------------------------------
# the charts' copies
# ------------------------------------------------------------------------------------------------

def chart_files(chart: str) -> dict[str, dict]:
    """{file name: content} a chart mounts into the kit's local/ (its templates adjust GPUs and values)."""
    role = CHART_FILES[chart]
    if role == "client":
        return {AUTHORIZATION: authorization("client"), PRIVACY: privacy(), RESOURCES: client_resources()}
    return {AUTHORIZATION: authorization("server"), RESOURCES: server_resources(IMAGE_STORE_ROOT)}


def write_chart_files(charts_dir=None) -> list[Path]:
    """Rewrite helm/<chart>/files/*.json from the definitions here (what `fedesm poc policy --charts` does)."""
    root = Path(charts_dir) if charts_dir else CHARTS_DIR
    written = []
    for chart in CHART_FILES:
        for name, content in chart_files(chart).items():
            written.append(_write_json(root / chart / "files" / name, copy.deepcopy(content)))
    return written
