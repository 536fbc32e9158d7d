"""Resume points: what the server writes beside every round's global adapters so that a new job can
continue a crashed one, and how that job finds and reads it back (no NVFLARE here).

Every round folder the server saves (``rounds/round_NNN/``, and ``last/``) is a complete resume point::

    adapter_config.json, adapter_model.safetensors, fedesm_model.json   the global adapters + head (PEFT layout)
    fedesm_resume.json         rounds done, the strategy, the best-model bookkeeping
    ef_residual.safetensors    fra-ef only: the truncated tail the next aggregation adds back
    metrics.jsonl, .csv        the metrics table up to this round

The folder is written under a temporary name and renamed into place (``fileio.atomic_dir``), so a
crash mid-write leaves the previous round whole. ``federation.resume_from`` names one (a path on the
server or an ``s3://`` URI); the new job's persistor reads it with :func:`read_resume_point`, takes
the earlier rounds and the fuller metrics table it finds beside it in the old run folder, and the
workflow continues at round NNN+1 (``fedesm.flare.workflows``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from fedesm import results
from fedesm.errors import FedesmError
from fedesm.tables import read_table, write_table

RESUME_STATE = "fedesm_resume.json"
EF_RESIDUAL = "ef_residual.safetensors"
FORMAT = 1
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
    residuals: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # fra-ef: pair -> (A, B)
    best_round: Optional[int] = None
    manifest: dict = field(default_factory=dict)  # payload_manifest.json of the old run, when beside it
    earlier_rounds: dict[int, Path] = field(default_factory=dict)  # round -> folder in the old run (< rounds_done)


def write_resume_files(folder, rounds_done: int, strategy: str, rows: list[dict],
                       residuals: Optional[dict[str, tuple[np.ndarray, np.ndarray]]] = None,
                       best_round: Optional[int] = None) -> None:
    """Write the resume files into `folder` (a round folder being built, before it is renamed into place)."""
    from safetensors.numpy import save_file

    folder = Path(folder)
    state = {"format": FORMAT, "rounds_done": int(rounds_done), "strategy": strategy, "best_round": best_round,
             "ef_residual": bool(residuals)}
    (folder / RESUME_STATE).write_text(json.dumps(state, indent=2) + "\n")
    if residuals:
        tensors = {}
        for pair, (a_res, b_res) in residuals.items():
            tensors[f"{pair}{_SEP}A"] = np.ascontiguousarray(a_res)
            tensors[f"{pair}{_SEP}B"] = np.ascontiguousarray(b_res)
        save_file(tensors, str(folder / EF_RESIDUAL))
    write_table(folder / results.METRICS, rows_until(rows, rounds_done))


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
    try:
        state = json.loads(state_path.read_text())
        rounds_done = int(state["rounds_done"])
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
    if state.get("format", 1) > FORMAT:
        raise FedesmError(f"federation.resume_from {folder}: saved by a newer fedesm (format {state['format']})")

    run = old_run_folder(folder)
    table = run / results.METRICS if run is not None and (run / results.METRICS).is_file() else folder / results.METRICS
    rows = rows_until(read_table(table), rounds_done)  # the old run's own table is fuller than the snapshot
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
    return ResumePoint(folder=folder, rounds_done=rounds_done, weights=weights, strategy=str(state.get("strategy")),
                       rows=rows, residuals=residuals, best_round=state.get("best_round"), manifest=manifest,
                       earlier_rounds=earlier)


def check_compatible(point: ResumePoint, expected: dict[str, tuple], total_rounds: int) -> None:
    """The saved adapters fit this job (same names and shapes), and rounds are left to run."""
    missing = sorted(set(expected) - set(point.weights))
    extra = sorted(set(point.weights) - set(expected))
    where = f"federation.resume_from {point.folder}"
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
