"""Resume points: what the server writes beside every round's global adapters so that a new job can
continue a crashed one, and how that job finds and reads it back (no NVFLARE here).

Every round folder the server saves (``rounds/round_NNN/``, and ``last/``) is a complete resume point::

    adapter_config.json, adapter_model.safetensors, fedesm_model.json   the global adapters + head (PEFT layout)
    fedesm_resume.json         rounds done, the strategy, the best-model bookkeeping, the job definition and
                               its hash (:func:`job_definition`), and its owner: who submitted the job
                               that saved it (NVFLARE's authenticated submitter, :func:`run_owner`)
    ef_residual.safetensors    fra-ef only: the truncated tail the next aggregation adds back
    metrics.jsonl, .csv        the metrics table up to this round

The folder is written under a temporary name and renamed into place (``fileio.atomic_dir``), so a
crash mid-write leaves the previous round whole. ``federation.resume_from`` names one (a path on the
server or an ``s3://`` URI); the new job's persistor reads it with :func:`read_resume_point`, takes
the earlier rounds and the fuller metrics table it finds beside it in the old run folder, and the
workflow continues at round NNN+1 (``fedesm.flare.workflows``).

A resume point is checked like an arriving contribution before anything of it is used: finite float tensors
of this job's names and shapes (so its rank), ``rounds_done`` a whole number below ``training.rounds``, a
metrics table of JSON rows, and the same job definition (the hash of the settings that shape the model and
its training; only those a resumed job may change, listed in ``MAY_CHANGE``, are left out), saved by a job of
the same submitter: a job names the folder, so without the owner check anyone who may submit could resume,
and then download, another submitter's model from the server's disk or buckets. Anything else is refused in
one line (FedesmError).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from fedesm import results
from fedesm.errors import FedesmError
from fedesm.settings import STRATEGIES
from fedesm.tables import read_table, write_table

RESUME_STATE = "fedesm_resume.json"
EF_RESIDUAL = "ef_residual.safetensors"
FORMAT = 2  # 2: the job definition and its hash are recorded
# Settings a resumed job may change: how long it runs and where, how many sites and how long it waits for them,
# the update screen's bounds (a job stopped because the screen left too few sites may resume with them eased),
# what it streams and keeps; none changes what the saved adapters mean or how sites train and are averaged.
MAY_CHANGE = {
    "training": {"rounds", "device", "precision", "bucket", "eval_batch_tokens", "activation_checkpointing"},
    "federation": {"resume_from", "min_clients", "train_timeout", "wait_after_min_clients", "keep_rounds",
                   "evaluate_global", "max_update_ratio", "max_update_norm", "clip_update_ratio", "mlflow",
                   "mlflow_tracking_uri", "mlflow_experiment"},
}


def job_definition(settings) -> dict:
    """The job's settings (a JobSettings) that a resume point must share with the job resuming it."""
    blocks = settings.to_dict()
    return {block: {k: v for k, v in values.items() if k not in MAY_CHANGE.get(block, ())}
            for block, values in sorted(blocks.items())}


def job_hash(definition: dict) -> str:
    return hashlib.sha256(json.dumps(definition, sort_keys=True, default=str).encode()).hexdigest()
_ADAPTERS = "adapter_model.safetensors"  # = fedesm.model.cards.ADAPTER_WEIGHTS (cards imports torch and PEFT)
_SEP = "::"  # EF residual keys: "<pair>::A", "<pair>::B"


@dataclass
class ResumePoint:
    """A saved round, read back: everything a new job needs to continue after it."""

    folder: Path  # the round folder itself (local; fetched first when it was on S3)
    rounds_done: int  # aggregation rounds behind this model: the new job runs round rounds_done + 1 next
    weights: dict[str, np.ndarray]  # the global adapters + head
    strategy: str
    rows: list[dict]  # the metrics table, rounds 0 .. rounds_done
    job: dict = field(default_factory=dict)  # the job definition it was saved by (job_definition)
    job_hash: str = ""
    owner: Optional[dict] = None  # {"name", "org"} of the submitter whose job saved it (None: none recorded)
    residuals: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # fra-ef: pair -> (A, B)
    best_round: Optional[int] = None
    manifest: dict = field(default_factory=dict)  # payload_manifest.json of the old run, when beside it
    earlier_rounds: dict[int, Path] = field(default_factory=dict)  # round -> folder in the old run (< rounds_done)


def write_resume_files(folder, rounds_done: int, strategy: str, rows: list[dict],
                       residuals: Optional[dict[str, tuple[np.ndarray, np.ndarray]]] = None,
                       best_round: Optional[int] = None, job: Optional[dict] = None,
                       owner: Optional[dict] = None) -> None:
    """Write the resume files into `folder` (a round folder being built, before it is renamed into place);
    `job` is the job's :func:`job_definition`, `owner` its submitter (:func:`run_owner`)."""
    from safetensors.numpy import save_file

    folder = Path(folder)
    job = job or {}
    state = {"format": FORMAT, "rounds_done": int(rounds_done), "strategy": strategy, "best_round": best_round,
             "ef_residual": bool(residuals), "job": job, "job_hash": job_hash(job), "owner": owner}
    (folder / RESUME_STATE).write_text(json.dumps(state, indent=2) + "\n")
    if residuals:
        tensors = {}
        for pair, (a_res, b_res) in residuals.items():
            tensors[f"{pair}{_SEP}A"] = np.ascontiguousarray(a_res)
            tensors[f"{pair}{_SEP}B"] = np.ascontiguousarray(b_res)
        save_file(tensors, str(folder / EF_RESIDUAL))
    write_table(folder / results.METRICS, rows_until(rows, rounds_done))


def run_owner(run_dir) -> Optional[dict]:
    """The submitter of the job running in `run_dir` (the server's run folder): the name and organisation
    NVFLARE writes into the run's meta.json from the admin's authenticated session (a job's own meta.json
    cannot set them). None where there is none (the simulator)."""
    try:
        meta = json.loads((Path(run_dir) / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    name = meta.get("submitter_name") if isinstance(meta, dict) else None
    if not isinstance(name, str) or not name:
        return None
    org = meta.get("submitter_org")
    return {"name": name, "org": org if isinstance(org, str) else ""}


def owner_text(owner: Optional[dict]) -> str:
    return f"{owner['name']} ({owner['org']})" if owner else "no recorded submitter (a simulator run)"


def rows_until(rows: list[dict], rounds_done: int) -> list[dict]:
    """The table's rows of rounds 0 .. rounds_done: later rows belong to rounds that were never saved."""
    return [r for r in rows if isinstance(r.get("round"), int) and r["round"] <= rounds_done]


def old_run_folder(folder: Path) -> Optional[Path]:
    """The old run's `fedesm/` folder when `folder` is its rounds/round_NNN or last/ (else None)."""
    folder = Path(folder)
    if folder.parent.name == results.ROUNDS:
        return folder.parent.parent
    if folder.name == results.LAST:
        return folder.parent
    return None


_ROUND_NAME = re.compile(r"^round_\d{3,}$")


def fetch_resume_point(resume_from: str, cache_dir, endpoint_url: Optional[str] = None) -> Path:
    """A local folder for `resume_from`: the path itself, or for ``s3://`` the old run's whole `fedesm/`
    prefix mirrored into `cache_dir` (so the earlier rounds and the metrics table come along)."""
    from fedesm import storage

    if not storage.is_s3_uri(resume_from):
        path = Path(resume_from).expanduser()
        if not path.is_dir():
            raise FedesmError(f"federation.resume_from {resume_from}: no such folder on the server")
        return path
    uri = resume_from.rstrip("/")
    parts = uri.split("/")
    if len(parts) >= 5 and parts[-2] == results.ROUNDS and _ROUND_NAME.match(parts[-1]):
        root, inside = "/".join(parts[:-2]), parts[-2:]
    elif len(parts) >= 4 and parts[-1] == results.LAST:
        root, inside = "/".join(parts[:-1]), parts[-1:]
    else:
        root, inside = uri, []
    # the server reads the one run the setting names (what it may read is not a site's allow-list: see
    # docs/threat-model.md); fetch takes no unchecked reads
    local = storage.fetch(root + "/", cache_dir, storage.AccessPolicy.exactly(root, source="federation.resume_from"),
                          endpoint_url=endpoint_url)
    return Path(local).joinpath(*inside)


def read_resume_point(folder) -> ResumePoint:
    """Read a saved round (see the module docstring); FedesmError naming the folder when it is not one."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    folder = Path(folder)
    state_path = folder / RESUME_STATE
    if not (folder / _ADAPTERS).is_file():
        raise FedesmError(f"federation.resume_from {folder}: not a saved round (no {_ADAPTERS}); name a run's "
                          "fedesm/rounds/round_NNN or fedesm/last folder")
    if not state_path.is_file():
        raise FedesmError(f"federation.resume_from {folder}: no {RESUME_STATE} (saved by a fedesm older than resume "
                          "support, or not a round folder)")
    where = f"federation.resume_from {folder}"
    try:
        state = json.loads(state_path.read_text())
        if not isinstance(state, dict):
            raise ValueError(f"{RESUME_STATE} is not a JSON object")
        rounds_done = state["rounds_done"]
        weights = load_file(str(folder / _ADAPTERS))
        residuals = {}
        if state.get("ef_residual"):
            flat = load_file(str(folder / EF_RESIDUAL))
            for key in flat:
                pair, _, which = key.rpartition(_SEP)
                if which == "A":
                    residuals[pair] = (flat[key].astype(np.float64), flat[f"{pair}{_SEP}B"].astype(np.float64))
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:
        raise FedesmError(f"federation.resume_from {folder}: unreadable saved round ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''})") from None
    fmt = state.get("format", 1)
    if not isinstance(fmt, int) or fmt > FORMAT:
        raise FedesmError(f"{where}: saved by a newer fedesm (format {str(fmt)[:20]})")
    if isinstance(rounds_done, bool) or not isinstance(rounds_done, int) or rounds_done < 0:
        raise FedesmError(f"{where}: rounds_done {repr(rounds_done)[:40]} is not a number of rounds (a whole "
                          "number >= 0)")
    strategy = state.get("strategy")
    if strategy not in STRATEGIES:
        raise FedesmError(f"{where}: strategy {str(strategy)[:40]!r} is not one of {', '.join(STRATEGIES)}")
    job, saved_hash = state.get("job"), state.get("job_hash")
    if not isinstance(job, dict) or not isinstance(saved_hash, str) or job_hash(job) != saved_hash:
        raise FedesmError(f"{where}: records no job definition that matches its hash (saved by a fedesm before "
                          "format 2, or edited); only a round saved with its job definition resumes")
    if job.get("federation", {}).get("strategy") != strategy:
        raise FedesmError(f"{where}: strategy {strategy!r} is not the one of the job definition it was saved by")
    _check_tensors(where, weights, _ADAPTERS)
    for pair, (a_res, b_res) in residuals.items():
        _check_tensors(where, {f"{pair}{_SEP}A": a_res, f"{pair}{_SEP}B": b_res}, EF_RESIDUAL)
        if a_res.ndim != 2 or b_res.ndim != 2 or a_res.shape[0] != b_res.shape[1]:
            raise FedesmError(f"{where}: {EF_RESIDUAL} {pair}: A {a_res.shape} and B {b_res.shape} are not one "
                              "residual pair")

    run = old_run_folder(folder)
    table = run / results.METRICS if run is not None and (run / results.METRICS).is_file() else folder / results.METRICS
    try:
        rows = read_table(table)
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise FedesmError(f"{where}: {table.name} is not a table of JSON rows ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:120] if str(e) else ''})") from None
    if not all(isinstance(r, dict) for r in rows):
        raise FedesmError(f"{where}: {table.name} is not a table of JSON rows (a line is not an object)")
    rows = rows_until(rows, rounds_done)  # the old run's own table is fuller than the snapshot
    manifest = {}
    earlier = {}
    if run is not None:
        if (run / results.PAYLOAD_MANIFEST).is_file():
            try:
                manifest = json.loads((run / results.PAYLOAD_MANIFEST).read_text())
            except (OSError, ValueError):
                manifest = {}
        for d in results.round_dirs(run):
            n = results.round_number(d)
            if n < rounds_done and (d / _ADAPTERS).is_file():
                earlier[n] = d
    best_round = state.get("best_round")
    if isinstance(best_round, bool) or not (best_round is None or isinstance(best_round, int)):
        best_round = None
    owner = state.get("owner")
    if owner is not None and not (isinstance(owner, dict) and isinstance(owner.get("name"), str)
                                  and isinstance(owner.get("org", ""), str)):
        raise FedesmError(f"{where}: its owner {str(owner)[:60]!r} is not a submitter's name and organisation")
    return ResumePoint(folder=folder, rounds_done=rounds_done, weights=weights, strategy=strategy,
                       rows=rows, job=job, job_hash=saved_hash, residuals=residuals, best_round=best_round,
                       manifest=manifest, earlier_rounds=earlier,
                       owner={"name": owner["name"], "org": owner.get("org", "")} if owner else None)


def _check_tensors(where: str, tensors: dict, name: str) -> None:
    for key, arr in tensors.items():
        if not np.issubdtype(arr.dtype, np.floating):
            raise FedesmError(f"{where}: {name} {key} is not a float tensor (dtype {arr.dtype})")
        if not np.all(np.isfinite(arr)):
            raise FedesmError(f"{where}: {name} {key} has non-finite values")


def check_compatible(point: ResumePoint, expected: dict[str, tuple], total_rounds: int,
                     definition: Optional[dict] = None, owner: Optional[dict] = None) -> None:
    """It was saved by a job of this job's submitter (`owner`, :func:`run_owner`; checked first, before
    anything of the point is compared or used), the saved adapters fit this job (same names and shapes),
    rounds are left to run, and it was saved by the same job definition (`definition`, :func:`job_definition`)."""
    where = f"federation.resume_from {point.folder}"
    if point.owner != owner:
        raise FedesmError(f"{where}: saved by a job of {owner_text(point.owner)}, and this job was submitted by "
                          f"{owner_text(owner)}: only the submitter of a run may resume it")
    missing = sorted(set(expected) - set(point.weights))
    extra = sorted(set(point.weights) - set(expected))
    if missing or extra:
        raise FedesmError(f"{where}: its adapters do not fit this job's model.arch / lora / num_labels "
                          f"(missing {missing[:2]}, unexpected {extra[:2]})")
    for key, shape in expected.items():
        if tuple(point.weights[key].shape) != tuple(shape):
            raise FedesmError(f"{where}: {key} has shape {tuple(point.weights[key].shape)}, this job's model "
                              f"has {tuple(shape)} (a different lora.r or model.arch?)")
    if point.rounds_done >= total_rounds:
        raise FedesmError(f"{where}: holds {point.rounds_done} rounds and the job's training.rounds is "
                          f"{total_rounds}: nothing left to run (raise training.rounds to the total you want)")
    if definition is not None and job_hash(definition) != point.job_hash:
        differ = [f"{block}.{k}" for block in sorted(set(definition) | set(point.job))
                  for k in sorted(set(definition.get(block, {})) | set(point.job.get(block, {})))
                  if definition.get(block, {}).get(k) != point.job.get(block, {}).get(k)]
        raise FedesmError(f"{where}: saved by another job definition (differs in {', '.join(differ[:4]) or '?'}"
                          f"{', ...' if len(differ) > 4 else ''}); resume a round of this job, or start afresh")
    from fedesm.keys import lora_pairs

    pairs = lora_pairs(list(expected))
    for pair, (a_res, b_res) in point.residuals.items():
        if pair not in pairs:
            raise FedesmError(f"{where}: {EF_RESIDUAL} holds {pair!r}, not a LoRA pair of this job")
        a_key, b_key = pairs[pair]
        if a_res.shape[1] != expected[a_key][1] or b_res.shape[0] != expected[b_key][0]:
            raise FedesmError(f"{where}: {EF_RESIDUAL} {pair} has shapes {a_res.shape}, {b_res.shape}: not this "
                              "job's matrices")
