"""Job bundles: each shipped job is defined once here, rendered in NVFLARE's layout, exported with overrides.

A job is a workflow (Scatter-and-Gather or cyclic) plus the four settings blocks of
`fedesm.settings` (model, lora, training, federation). Both config files carry the blocks at top
level, and every fedesm component takes them by reference (``"lora": "{lora}"``), so within a
bundle each setting has one home and the server and the sites read the same values. Values NVFLARE's
own components need as plain numbers (the workflow's ``num_rounds``, ``min_clients``,
``train_timeout``, ``wait_time_after_min_received``; ``meta.json``'s ``min_clients``) are written
from the blocks on every render and export, never by hand.

`JOBS` are the shipped jobs; the repository's ``jobs/`` folder holds their rendering (a test keeps
it equal to `render_job`, `fedesm job render` rewrites it). `export_job` writes a bundle with
overrides applied through the settings (``training.lr=0.002``, or a bare field name that only one
block has: ``strategy=fra-ef``), so an unknown or invalid value is refused before anything is written.

Bundles carry configuration only: sites run the fedesm they installed (the shipped site policy,
`fedesm.launch.policy`, refuses jobs that bring code in ``app/custom``), and ``meta.json`` records
the fedesm version that wrote the bundle (``fedesm_version``), which each participant compares with
its own at deployment (`fedesm.flare.site_guard`). ``include_package`` keeps the old self-contained
bundle (fedesm copied into ``app/custom``) for networks that allow bring-your-own-code; it never
copies a file that ``nvflare job submit`` would parse as job configuration (``*.json``, ``*.conf``,
``*.yml``, ``*.yaml``, also with ``.default``: the experiment presets stay behind).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

from fedesm import __version__
from fedesm.errors import FedesmError
from fedesm.fileio import atomic_dir
from fedesm.paths import repo_path
from fedesm.secure.wire import SECURE_TASKS
from fedesm.settings import FederationSettings, JobSettings, ModelSettings, TrainConfig

SERVER_CONFIG = "app/config/config_fed_server.json"
CLIENT_CONFIG = "app/config/config_fed_client.json"
META = "meta.json"
CONFIG_FILES = (SERVER_CONFIG, CLIENT_CONFIG)
WORKFLOWS = ("scatter_and_gather", "cyclic")
VERSION_KEY = "fedesm_version"  # meta.json: the fedesm that wrote the bundle (checked at every participant)
# What `nvflare job submit` parses as configuration wherever it finds it under app/custom (NVFLARE 2.9's
# ConfigFormat extensions); a bundle's copy of the package leaves these out.
CONFIG_EXTENSIONS = (".json", ".conf", ".yml", ".yaml", ".json.default", ".conf.default", ".yml.default",
                     ".yaml.default")


@dataclass(frozen=True)
class JobTemplate:
    name: str
    workflow: str  # one of WORKFLOWS
    description: str
    settings: JobSettings


# The paper's setting: ESM-2 35M, r=16 on q,k,v, 30 rounds x 5,000 local steps, max length 1000.
PAPER = JobSettings(model=ModelSettings(arch="esm2_t12_35M_UR50D"),
                    training=TrainConfig(rounds=30, steps_per_round=5000, lr=5e-4, max_len=1000),
                    federation=FederationSettings(strategy="fra", min_clients=2))

JOBS: dict[str, JobTemplate] = {t.name: t for t in (
    JobTemplate("esm2_fra_lora", "scatter_and_gather",
                "experiment 1: sites train concurrently, FRA-LoRA merges (federation.strategy: fra, fra-ef, fedit, "
                "ffa)", PAPER),
    JobTemplate("esm2_fra_lora_skew_dp", "scatter_and_gather",
                "experiment 2: run on label-skewed site data (`fedesm data split --mode skew`), gradient noise "
                "1e-4 at every step", PAPER.replace(training=PAPER.training.replace(grad_noise_std=1e-4))),
    JobTemplate("esm2_cyclic", "cyclic",
                "sites train one after another on the model the previous one sent", PAPER),
)}

_BLOCK_REFS = {name: "{" + name + "}" for name in JobSettings.BLOCKS}


def _component(cid: str, path: str, args: Optional[dict] = None) -> dict:
    return {"id": cid, "path": path, "args": args or {}}


def _server_config(workflow: str) -> dict:
    """The server's components; numbers NVFLARE needs are filled in by `_sync`."""
    if workflow == "scatter_and_gather":
        flow = _component("scatter_and_gather", "fedesm.flare.workflows.ScatterAndGather", {
            "min_clients": None, "num_rounds": None, "wait_time_after_min_received": None,
            "aggregator_id": "aggregator", "persistor_id": "persistor", "shareable_generator_id": "shareable_generator",
            "train_task_name": "train", "train_timeout": None, "ignore_result_error": None})
    elif workflow == "cyclic":
        flow = _component("cyclic", "fedesm.flare.workflows.CyclicController", {
            "num_rounds": None, "task_assignment_timeout": 60, "persistor_id": "persistor",
            "shareable_generator_id": "shareable_generator", "task_name": "train", "order": "FIXED"})
    else:
        raise FedesmError(f"unknown workflow {workflow!r}; valid: {', '.join(WORKFLOWS)}")
    components = [
        _component("persistor", "fedesm.flare.persistor.LoraPersistor", dict(_BLOCK_REFS)),
        _component("shareable_generator", "nvflare.app_common.shareablegenerators.full_model_shareable_generator."
                   "FullModelShareableGenerator"),
    ]
    if workflow == "scatter_and_gather":
        components.append(_component("aggregator", "fedesm.flare.aggregator.FraLoraAggregator",
                                     {"lora": "{lora}", "federation": "{federation}"}))
    components += [
        _component("model_locator", "fedesm.flare.model_locator.LoraModelLocator", {"persistor_id": "persistor"}),
        _component("metrics_recorder", "fedesm.flare.metrics_recorder.MetricsRecorder"),
        _component("tb_receiver", "nvflare.app_opt.tracking.tb.tb_receiver.TBAnalyticsReceiver",
                   {"tb_folder": "tb_events", "events": ["fed.analytix_log_stats"]}),
    ]
    evaluation = _component("global_model_eval", "fedesm.flare.workflows.GlobalModelEval",
                            {"model_locator_id": "model_locator", "validation_timeout": 6000})
    return {"format_version": 2, "workflows": [flow, evaluation], "components": components}


def _client_config() -> dict:
    executor = _component("executor", "fedesm.flare.executor.EsmLoraExecutor", dict(_BLOCK_REFS))
    return {
        "format_version": 2,
        "executors": [{"tasks": ["train", "validate", "submit_model"], "executor": executor}],
        "task_result_filters": [],
        "task_data_filters": [],
        "components": [
            _component("analytic_sender", "nvflare.app_common.widgets.streaming.AnalyticsSender"),
            _component("event_to_fed", "nvflare.app_common.widgets.convert_to_fed_event.ConvertToFedEvent",
                       {"events_to_convert": ["analytix_log_stats"], "fed_event_prefix": "fed."}),
        ],
    }


MLFLOW_COMPONENT = _component("mlflow_receiver", "fedesm.flare.mlflow_receiver.FedesmMLflowReceiver",
                              {"model": "{model}", "lora": "{lora}", "federation": "{federation}"})


def _sync_tracking(server: dict, settings: JobSettings) -> None:
    """The MLflow receiver is in the server's components exactly when `federation.mlflow` is on."""
    components = [c for c in server.get("components", []) if c.get("id") != MLFLOW_COMPONENT["id"]]
    if settings.federation.mlflow:
        components.append(json.loads(json.dumps(MLFLOW_COMPONENT)))
    server["components"] = components


def _sync_tasks(client: dict, settings: JobSettings) -> None:
    """The executor also takes the secure passes' tasks exactly when `federation.secure_aggregation` is on."""
    secure = list(SECURE_TASKS.values())
    for entry in client.get("executors", []):
        tasks = [t for t in entry.get("tasks", []) if t not in secure]
        if settings.federation.secure_aggregation and "train" in tasks:
            tasks += secure
        entry["tasks"] = tasks


def _sync(files: dict[str, dict], settings: JobSettings, name: str) -> dict[str, dict]:
    """Put the settings blocks into both configs (first, for readers) and the numbers derived from them
    into NVFLARE's own components and meta.json; add the components the settings switch on (MLflow)."""
    derived = {"num_rounds": settings.training.rounds, "min_clients": settings.federation.min_clients,
               "train_timeout": settings.federation.train_timeout,
               "wait_time_after_min_received": settings.federation.wait_after_min_clients}
    out = dict(files)
    for cfg in CONFIG_FILES:
        if cfg not in files:
            continue
        data = {k: v for k, v in files[cfg].items() if k not in JobSettings.BLOCKS and k != "format_version"}
        for flow in data.get("workflows", []):
            for key, value in derived.items():
                if key in flow.get("args", {}):
                    flow["args"][key] = value
        if cfg == SERVER_CONFIG:
            _sync_tracking(data, settings)
            if settings.federation.secure_aggregation and any(
                    not str(w.get("path", "")).endswith(".ScatterAndGather") for w in data.get("workflows", [])[:1]):
                raise FedesmError(f"job {name}: federation.secure_aggregation needs the scatter-and-gather workflow "
                                  "(esm2_fra_lora): a cyclic job hands each site's model to the next site, there is "
                                  "no sum to hide")
        else:
            _sync_tasks(data, settings)
        out[cfg] = {"format_version": files[cfg].get("format_version", 2), **settings.to_dict(), **data}
    meta = dict(files.get(META) or {})
    meta.update(name=name, min_clients=settings.federation.min_clients)
    meta[VERSION_KEY] = __version__
    meta.setdefault("resource_spec", {})
    meta.setdefault("deploy_map", {"app": ["@ALL"]})
    out[META] = meta
    return out


def render_job(template: JobTemplate, settings: Optional[JobSettings] = None) -> dict[str, dict]:
    """{relative path: JSON content} of a job bundle (meta.json and the two config files)."""
    files = {META: {"name": template.name}, SERVER_CONFIG: _server_config(template.workflow),
             CLIENT_CONFIG: _client_config()}
    return _sync(files, settings or template.settings, template.name)


def _write_files(root: Path, files: Mapping[str, dict]) -> None:
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(content, indent=2) + "\n")


def jobs_root() -> Path:
    """The repository's `jobs/` folder, where the shipped jobs are rendered (FEDESM_JOBS_DIR overrides)."""
    env = os.environ.get("FEDESM_JOBS_DIR")
    return Path(env) if env else repo_path("jobs")


def list_jobs() -> list[str]:
    return sorted(JOBS)


def write_shipped_jobs(root=None) -> list[Path]:
    """Render every shipped job into `root` (default `jobs_root()`): what `fedesm job render` does."""
    root = Path(root) if root else jobs_root()
    out = []
    for name, template in sorted(JOBS.items()):
        with atomic_dir(root / name) as tmp:
            _write_files(tmp, render_job(template))
        out.append(root / name)
    return out


def job_source(name_or_path: Union[str, os.PathLike]) -> Union[JobTemplate, Path]:
    """A shipped job by name, or a job folder (holding meta.json) by path."""
    if str(name_or_path) in JOBS:
        return JOBS[str(name_or_path)]
    path = Path(name_or_path)
    if (path / META).is_file():
        return path
    raise FedesmError(f"{name_or_path!r} is not a job folder; known jobs: {', '.join(list_jobs())}")


def read_job_settings(job_dir) -> JobSettings:
    """The settings blocks of a job folder's server config (the client's must say the same)."""
    job_dir = Path(job_dir)
    blocks = {}
    for cfg in CONFIG_FILES:
        path = job_dir / cfg
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise FedesmError(f"{path}: not a readable job config ({str(e).splitlines()[0]})") from None
        found = {k: data[k] for k in JobSettings.BLOCKS if k in data}
        if not found:
            raise FedesmError(f"{path}: not a fedesm job config (no {', '.join(JobSettings.BLOCKS)} blocks)")
        settings = JobSettings.from_dict(found, where=str(path))
        if blocks and settings != blocks["settings"]:
            raise FedesmError(f"{job_dir}: the server and client configs carry different settings; export the job "
                              "with `fedesm job export` instead of editing one file")
        blocks["settings"] = settings
    if not blocks:
        raise FedesmError(f"{job_dir}: no job config files ({', '.join(CONFIG_FILES)})")
    return blocks["settings"]


def job_settings(name_or_path) -> JobSettings:
    """A job's settings: a shipped job's definition, or what a job folder's configs carry."""
    src = job_source(name_or_path)
    return src.settings if isinstance(src, JobTemplate) else read_job_settings(src)


def export_job(name_or_path, out_dir, overrides: Optional[Union[Mapping[str, Any], Sequence[str]]] = None,
               job_name: Optional[str] = None, include_package: bool = False,
               settings: Optional[JobSettings] = None) -> Path:
    """Write a job bundle to `out_dir/<job_name or name>`: `settings` (default: the job's own) with
    `overrides` applied; configuration only, unless `include_package` copies the fedesm package into
    app/custom (a bring-your-own-code job, which the shipped site policy refuses). Nothing is written
    when a setting is unknown or invalid."""
    src = job_source(name_or_path)
    name = job_name or (src.name if isinstance(src, JobTemplate) else Path(src).name)
    base = settings or job_settings(name_or_path)
    final = base.with_overrides(overrides)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out_dir / name) as tmp:
        if isinstance(src, JobTemplate):
            files = render_job(src, final)
            files[META]["name"] = name
        else:
            ignore = ["__pycache__", "*.pyc"] + ([] if include_package else ["custom"])
            shutil.copytree(src, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns(*ignore))
            files = {rel: json.loads((tmp / rel).read_text()) for rel in (META, *CONFIG_FILES) if (tmp / rel).is_file()}
            files = _sync(files, final, name)
        _write_files(tmp, files)
        if include_package:
            package, copy = Path(__file__).resolve().parents[1], tmp / "app" / "custom" / "fedesm"
            shutil.rmtree(copy, ignore_errors=True)  # a source bundle's copy may be another version's
            shutil.copytree(package, copy,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc", *(f"*{e}" for e in CONFIG_EXTENSIONS)))
    return out_dir / name
