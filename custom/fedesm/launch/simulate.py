"""Run a job in `nvflare simulator` as a subprocess, showing rounds as the metrics table grows."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

from fedesm import results
from fedesm.errors import FedesmError
from fedesm.launch.policy import write_simulator_policy
from fedesm.tables import SERVER_ROW

SERVER_RESULT = Path("server") / "simulate_job"


def nvflare_command() -> list[str]:
    exe = Path(sys.executable).parent / "nvflare"
    if exe.exists():
        return [str(exe)]
    found = shutil.which("nvflare")
    if not found:
        raise FedesmError("the `nvflare` command is not installed (pip install nvflare)")
    return [found]


def result_dir(workspace) -> Path:
    """Where the server's run folder of a simulator workspace lives (metrics, adapters, TensorBoard)."""
    return Path(workspace) / SERVER_RESULT


def run_simulator(job_dir, workspace, n_clients: int, threads: Optional[int] = None, site_config=None,
                  log_path=None, timeout: Optional[float] = None, env: Optional[dict] = None,
                  on_round: Optional[Callable[[int, list], None]] = None, clients: Optional[list] = None) -> Path:
    """Run `nvflare simulator JOB -w WORKSPACE -n N -t T`; returns the server's run folder.

    The workspace gets the sites' class allow-list and privacy scope first (`fedesm.launch.policy`),
    so a code-free bundle runs on the installed fedesm under the rules of a real site.
    `site_config` is exported as FEDESM_SITE_CONFIG. The simulator's output goes to `log_path`
    (default `<workspace>.log`); `on_round(n, rows)` is called as each round finishes, with the sites' rows for it.
    Raises FedesmError (with the log's tail) when the simulator fails or the job produced no model.
    """
    workspace = Path(workspace)
    if workspace.exists():
        shutil.rmtree(workspace)
    workspace.parent.mkdir(parents=True, exist_ok=True)
    write_simulator_policy(workspace)
    log_path = Path(log_path or f"{workspace}.log")
    cmd = nvflare_command() + ["simulator", str(job_dir), "-w", str(workspace), "-t", str(threads or n_clients)]
    cmd += ["-c", ",".join(clients)] if clients else ["-n", str(n_clients)]
    run_env = dict(os.environ)
    run_env.update(env or {})
    if site_config:
        run_env["FEDESM_SITE_CONFIG"] = str(Path(site_config).resolve())
    metrics = results.output_dir(result_dir(workspace)) / results.METRICS
    seen: set = set()
    start = time.monotonic()
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=run_env, start_new_session=True)
        try:
            while proc.poll() is None:
                time.sleep(1.0)
                _emit_new_rows(metrics, seen, on_round)
                if timeout and time.monotonic() - start > timeout:
                    raise FedesmError(f"simulator run exceeded {timeout:.0f}s (log: {log_path})")
        except BaseException:
            _kill(proc)
            raise
    _emit_new_rows(metrics, seen, on_round)
    out = result_dir(workspace)
    expected = _num_rounds(job_dir)
    done = _rounds_saved(out)
    if proc.returncode != 0 or done is None or (expected is not None and done < expected):
        tail = "".join(log_path.read_text(errors="replace").splitlines(True)[-15:])
        raise FedesmError(f"nvflare simulator failed (exit {proc.returncode}, {done or 0} of {expected} rounds "
                          f"completed); log {log_path}; last lines:\n{tail}")
    return out


def _num_rounds(job_dir) -> Optional[int]:
    from fedesm.launch.jobs import read_job_settings

    try:
        return read_job_settings(job_dir).training.rounds
    except FedesmError:
        return None


def _rounds_saved(out: Path) -> Optional[int]:
    card = results.output_dir(out) / results.LAST / "fedesm_model.json"
    try:
        return int(json.loads(card.read_text())["extra"]["rounds"])
    except (OSError, KeyError, ValueError, TypeError):
        return None


def _emit_new_rows(path: Path, seen: set, on_round) -> None:
    """Call on_round(n, rows) once per finished round (the server's row for round n has appeared)."""
    if on_round is None or not path.exists():
        return
    try:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, json.JSONDecodeError):
        return  # being rewritten; next poll
    for row in rows:
        n = row.get("round")
        if row.get("site") == SERVER_ROW and n not in seen:
            seen.add(n)
            on_round(n, [r for r in rows if r.get("round") == n and r.get("site") != SERVER_ROW])


def _kill(proc: subprocess.Popen) -> None:
    import signal

    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except Exception:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except Exception:
            pass
