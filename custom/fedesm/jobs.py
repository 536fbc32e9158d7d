"""Job bundles: find the job templates in `jobs/`, set their plain config values, make them self-contained.

A job folder holds only configuration (meta.json + app/config/*.json). Export copies it, applies
overrides to the top-level values of its config files (`num_rounds`, `lora_r`, `steps_per_round`,
`strategy`, ...: the `{var}` references in components resolve to them), and puts the fedesm package
into `app/custom/`, so `nvflare job submit` works on sites that only have NVFLARE, torch, fair-esm
and peft installed.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional

from fedesm.errors import FedesmError
from fedesm.fileio import atomic_dir

CONFIG_FILES = ("config_fed_server.json", "config_fed_client.json")


def jobs_root() -> Path:
    """The repository's `jobs/` folder (FEDESM_JOBS_DIR overrides)."""
    env = os.environ.get("FEDESM_JOBS_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "jobs"


def list_jobs(root: Optional[Path] = None) -> list[str]:
    root = root or jobs_root()
    return sorted(p.name for p in root.iterdir() if (p / "meta.json").is_file()) if root.is_dir() else []


def job_source(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if (path / "meta.json").is_file():
        return path
    candidate = jobs_root() / name_or_path
    if (candidate / "meta.json").is_file():
        return candidate
    raise FedesmError(f"{name_or_path!r} is not a job folder; known jobs: {', '.join(list_jobs()) or 'none'}")


def parse_overrides(items: list[str]) -> dict:
    """`key=value` strings; values parsed as JSON when they are (numbers, true/false, null, lists)."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise FedesmError(f"--set {item!r}: expected KEY=VALUE")
        key, raw = item.split("=", 1)
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw
    return out


def job_values(job_dir: Path) -> dict[str, dict]:
    """Top-level plain values of each config file: what `--set` can change."""
    values = {}
    for cfg in CONFIG_FILES:
        path = Path(job_dir) / "app" / "config" / cfg
        if path.is_file():
            data = json.loads(path.read_text())
            values[cfg] = {k: v for k, v in data.items() if not isinstance(v, (list, dict)) and k != "format_version"}
    return values


def export_job(name_or_path: str, out_dir, overrides: Optional[dict] = None, job_name: Optional[str] = None,
               include_package: bool = True, min_clients: Optional[int] = None) -> Path:
    """Write a self-contained copy of a job; unknown override keys are an error (no silent typos)."""
    src = job_source(name_or_path)
    overrides = dict(overrides or {})
    name = job_name or src.name
    out_dir = Path(out_dir)
    dest = out_dir / name
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_dir(dest) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        used = set()
        for cfg in CONFIG_FILES:
            path = tmp / "app" / "config" / cfg
            if not path.is_file():
                continue
            data = json.loads(path.read_text())
            for k, v in overrides.items():
                if k in data and not isinstance(data[k], (list, dict)):
                    data[k] = v
                    used.add(k)
            path.write_text(json.dumps(data, indent=2) + "\n")
        unknown = set(overrides) - used
        if unknown:
            known = sorted({k for vals in job_values(src).values() for k in vals})
            raise FedesmError(f"unknown job setting(s) {sorted(unknown)} for {src.name}; settable: {', '.join(known)}")
        meta_path = tmp / "meta.json"
        meta = json.loads(meta_path.read_text())
        meta["name"] = name
        if min_clients is not None or "min_clients" in overrides:
            meta["min_clients"] = min_clients if min_clients is not None else overrides["min_clients"]
        meta_path.write_text(json.dumps(meta, indent=2) + "\n")
        if include_package:
            package = Path(__file__).resolve().parent
            shutil.copytree(package, tmp / "app" / "custom" / "fedesm",
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest
