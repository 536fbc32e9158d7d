"""A job is data: its app folder is checked against fedesm's job shapes before NVFLARE builds anything.

NVFLARE builds a job component by importing its dotted ``path`` and calling it with the job's
``args``, and its class allow-list matches prefixes, so an allow-list alone lets a job call any
callable under an allowed prefix (a function such as ``fedesm.storage.upload`` included) or choose
the arguments of an allowed one (``ConvertToFedEvent`` turning log events into messages). Here the
whole app is compared with what `fedesm.launch.jobs` renders for the settings it carries:

* the app folder holds the two config files and nothing else (no code, no other configuration
  NVFLARE would read);
* every component ``path`` (at any depth, ``class_path`` and ``name`` too) is one of
  `COMPONENT_CLASSES`, exact class paths, no prefixes;
* the four settings blocks parse (`fedesm.settings.JobSettings`: unknown keys and bad values
  refused) and say the same in both files;
* everything else, component ids, args, filters, event conversions, top-level keys, equals the
  rendering of a shipped workflow with those settings;
* no setting names where a participant writes or sends data: ``federation.mlflow_tracking_uri`` is
  the server's to set (its ``MLFLOW_TRACKING_URI``), not a job's.

`FedesmJobValidator` is NVFLARE's ``AppValidator`` hook, set in each participant's
``local/resources.json`` (``app_validator``, `fedesm.launch.policy`): NVFLARE runs it in
``AppDeployer.deploy`` right after unpacking the app and before anything is built; a refusal removes
the run folder and is the participant's deploy reply, one line in the job's ``job_deploy_detail``
(``nvflare job meta``). The line names the file, the component and why, with the job's own values
shortened and nothing of the site's.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional

from nvflare.apis.app_validation import AppValidator
from nvflare.lighter.tool_consts import NVFLARE_SIG_FILE, NVFLARE_SUBMITTER_CRT_FILE

from fedesm.errors import FedesmError
from fedesm.launch.jobs import CLIENT_CONFIG, JOBS, SERVER_CONFIG, WORKFLOWS, JobTemplate, render_job
from fedesm.launch.policy import component_classes
from fedesm.settings import JobSettings

logger = logging.getLogger(__name__)

PREFIX = "fedesm job check"
CLIENT_FILE = Path(CLIENT_CONFIG).relative_to("app").as_posix()  # config/config_fed_client.json
SERVER_FILE = Path(SERVER_CONFIG).relative_to("app").as_posix()
ROLE_FILES = {"client": CLIENT_FILE, "server": SERVER_FILE}
COMPONENT_KEYS = ("path", "class_path", "name")  # what NVFLARE's builder reads as a class to instantiate
MAX_SHOWN = 60  # characters of a job's value quoted back in a refusal


COMPONENT_CLASSES = component_classes()


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= MAX_SHOWN else text[:MAX_SHOWN - 3] + "..."


def _foreign_component(node: Any, where: str) -> Optional[str]:
    """The first dict naming a class (path / class_path / name) that is not a listed component class."""
    if isinstance(node, dict):
        for key in COMPONENT_KEYS:
            if key in node and not (key == "path" and node[key] in COMPONENT_CLASSES):
                cid = node.get("id")
                who = f"component {_short(cid)}" if cid is not None else f"component at {where}"
                if key != "path":
                    return f"{who} names its class by {key!r}; fedesm's jobs name exact classes by 'path'"
                return (f"{who} names {_short(node[key])}, which is not one of fedesm's job component classes "
                        f"(fedesm.flare.job_check.COMPONENT_CLASSES)")
        for k, v in node.items():
            found = _foreign_component(v, f"{where}.{k}" if where else str(k))
            if found:
                return found
    elif isinstance(node, list):
        for i, v in enumerate(node):
            found = _foreign_component(v, f"{where}[{i}]")
            if found:
                return found
    return None


def _is_component_list(items: list) -> bool:
    return bool(items) and all(isinstance(x, dict) and "id" in x for x in items)


def _difference(actual: Any, expected: Any, where: str) -> Optional[str]:
    """The first place `actual` differs from `expected`, as '<where>: why'; None when equal."""
    if isinstance(expected, dict) and isinstance(actual, dict):
        for k in actual:
            if k not in expected:
                return f"{where or 'top level'}: {_short(k)} is not in fedesm's job (valid: {', '.join(expected)})"
        for k in expected:
            if k not in actual:
                return f"{where or 'top level'}: {k!r} is missing"
            found = _difference(actual[k], expected[k], f"{where}.{k}" if where else k)
            if found:
                return found
        return None
    if isinstance(expected, list) and isinstance(actual, list):
        if _is_component_list(expected) and all(isinstance(x, dict) for x in actual):
            want = {x["id"]: x for x in expected}
            for x in actual:
                if x.get("id") not in want:
                    return (f"{where}: component id {_short(x.get('id'))} is not one of fedesm's "
                            f"({', '.join(map(str, want))})")
            ids = [x.get("id") for x in actual]
            for cid, x in want.items():
                if ids.count(cid) != 1:
                    return f"{where}: component {cid!r} must appear once (found {ids.count(cid)})"
            for x in actual:
                found = _difference(x, want[x["id"]], f"{where}[{x['id']}]")
                if found:
                    return found
            return None
        if len(actual) != len(expected):
            return f"{where}: {_short(actual)} is not fedesm's {_short(expected)}"
        for i, (a, e) in enumerate(zip(actual, expected)):
            found = _difference(a, e, f"{where}[{i}]")
            if found:
                return found
        return None
    if type(actual) is not type(expected) or actual != expected:
        return f"{where}: {_short(actual)} is not fedesm's {_short(expected)}"
    return None


def _settings(name: str, config: dict) -> JobSettings:
    blocks = {k: config[k] for k in JobSettings.BLOCKS if k in config}
    missing = [k for k in JobSettings.BLOCKS if k not in blocks]
    if missing:
        raise FedesmError(f"{name}: settings block(s) {', '.join(missing)} missing")
    for block, value in blocks.items():
        if not isinstance(value, dict):
            raise FedesmError(f"{name}: {block} must be a mapping of settings")
    return JobSettings.from_dict(blocks, where=name)


def _workflow(server: Optional[dict]) -> str:
    """The shipped workflow a server config declares (its first workflow's id); the client's config is the
    same for every workflow."""
    if server is None:
        return WORKFLOWS[0]
    flows = server.get("workflows")
    first = flows[0] if isinstance(flows, list) and flows and isinstance(flows[0], dict) else {}
    if first.get("id") not in WORKFLOWS:
        raise FedesmError(f"{SERVER_FILE}: workflows: the first is {_short(first.get('id'))}, not one of fedesm's "
                          f"({', '.join(WORKFLOWS)})")
    return first["id"]


def check_configs(configs: dict[str, dict]) -> None:
    """Raise FedesmError (one line) unless each of `configs` ({CLIENT_FILE | SERVER_FILE: parsed JSON})
    is what fedesm renders for the settings it carries."""
    for name, config in configs.items():
        if not isinstance(config, dict):
            raise FedesmError(f"{name}: not a JSON object")
        rest = {k: v for k, v in config.items() if k not in JobSettings.BLOCKS}
        foreign = _foreign_component(rest, "")
        if foreign:
            raise FedesmError(f"{name}: {foreign}")
    settings = {name: _settings(name, config) for name, config in configs.items()}
    if any(s != next(iter(settings.values())) for s in settings.values()):
        raise FedesmError(f"{CLIENT_FILE} and {SERVER_FILE} carry different settings")
    chosen = next(iter(settings.values()))
    if chosen.federation.mlflow_tracking_uri:
        raise FedesmError("federation.mlflow_tracking_uri: a job may not name where the server writes or sends "
                          "metrics; the server's own MLFLOW_TRACKING_URI (or the job's result folder) decides")
    workflow = _workflow(configs.get(SERVER_FILE))
    rendered = render_job(JobTemplate("check", workflow, "", chosen))
    for name, config in configs.items():
        want = rendered["app/" + name]
        strip = lambda c: {k: v for k, v in c.items() if k not in JobSettings.BLOCKS}  # noqa: E731
        found = _difference(strip(config), json.loads(json.dumps(strip(want))), "")
        if found:
            raise FedesmError(f"{name}: {found}")


def check_app(app_folder, role: str) -> None:
    """Raise FedesmError (one line) unless `app_folder` (an unpacked app) is a fedesm job for `role`:
    the config files (and the certificate and signatures NVFLARE adds) and nothing else, each config what
    fedesm renders."""
    root = Path(app_folder)
    allowed = {CLIENT_FILE, SERVER_FILE}
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() or p.is_symlink())
    for rel in files:
        # NVFLARE's own additions in each folder of a signed job: the signature and the submitter's certificate
        if rel not in allowed and Path(rel).name not in (NVFLARE_SIG_FILE, NVFLARE_SUBMITTER_CRT_FILE):
            raise FedesmError(f"app/{rel[:MAX_SHOWN]}: a fedesm job carries only {CLIENT_FILE} and {SERVER_FILE}")
    if ROLE_FILES[role] not in files:
        raise FedesmError(f"app/{ROLE_FILES[role]} is missing")
    configs = {}
    for rel in (CLIENT_FILE, SERVER_FILE):
        if rel in files:
            path = root / rel
            if path.is_symlink():
                raise FedesmError(f"app/{rel}: a link, not a file")
            try:
                configs[rel] = json.loads(path.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise FedesmError(f"app/{rel}: not readable JSON ({str(e).splitlines()[0][:MAX_SHOWN]})") from None
    check_configs(configs)


class FedesmJobValidator(AppValidator):
    """NVFLARE's app validator (``app_validator`` in local/resources.json): refuses any app that is not a
    fedesm job before it is deployed (see the module docstring)."""

    def __init__(self, role: str = "client"):
        super().__init__()
        if role not in ROLE_FILES:
            raise FedesmError(f"FedesmJobValidator: role {role!r} is not one of {', '.join(ROLE_FILES)}")
        self.role = role

    def validate(self, app_folder: str) -> tuple[str, dict]:
        try:
            check_app(app_folder, self.role)
        except FedesmError as e:
            line = f"{PREFIX}: {str(e).splitlines()[0]}"
            logger.error("refused a job: %s", line)
            return line, {}
        except Exception as e:  # noqa: BLE001 - a hostile app must never get past the check by crashing it
            line = f"{PREFIX}: the app could not be checked ({type(e).__name__})"
            logger.error("refused a job: %s", line)
            return line, {}
        return "", {}


