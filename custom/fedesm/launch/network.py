"""A real, provisioned NVFLARE network on one machine: provision, start, submit, follow, stop.

The server and every site run as separate processes from their own startup kits (the kit's
``startup/sub_start.sh --once``, i.e. exactly what an organisation runs), talking gRPC with
mutual TLS over loopback. The admin side uses the FLARE API ``Session`` of the project
admin's kit. Used by the integration tests and by ``fedesm poc``.

Every process is started in its own session (process group). ``stop()`` kills each process
tree (including NVFLARE's job processes, which NVFLARE starts in sessions of their own) and
sweeps any process of ours whose command line names one of this network's kit folders. A context manager and
an ``atexit`` hook make sure this also happens when a test fails.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

import psutil
import yaml

from fedesm.errors import FedesmError
from fedesm.fileio import atomic_write_text
from fedesm.paths import repo_path

logger = logging.getLogger(__name__)

STATE_FILE = "network.json"
DEFAULT_PROJECT_FILE = repo_path("provisioning", "project.yml")



def _kill(procs) -> None:
    """SIGKILL each process (gone already is fine) and wait up to 5 s for them to be reaped."""
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=5.0)

class NetworkError(FedesmError):
    """The local network could not be provisioned, started or driven."""


# --------------------------------------------------------------------------------------------
# provisioning
# --------------------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port that is free on loopback right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_project(project_file: str | os.PathLike) -> dict:
    path = Path(project_file)
    if not path.is_file():
        raise NetworkError(f"{path}: project file not found")
    try:
        project = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise NetworkError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(project, dict) or not isinstance(project.get("participants"), list):
        raise NetworkError(f"{path}: not an NVFLARE project file (no 'participants' list)")
    servers = [p for p in project["participants"] if p.get("type") == "server"]
    if len(servers) != 1:
        raise NetworkError(f"{path}: expected exactly one participant of type 'server', found {len(servers)}")
    return project


LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def is_loopback_name(name: str) -> bool:
    """A server name NVFLARE 2.9 binds to 127.0.0.1 only (so nothing off this machine can connect)."""
    name = str(name).rstrip(".").lower()
    return name in LOOPBACK_NAMES or name.startswith("127.") or name.endswith(".localhost")


def render_project(
    src: str | os.PathLike,
    dest: str | os.PathLike,
    server_name: Optional[str] = None,
    fl_port: Optional[int] = None,
    admin_port: Optional[int] = None,
    allow_loopback: bool = True,
) -> Path:
    """Write a copy of project.yml with the server's DNS name and/or ports substituted.

    `allow_loopback=False` (kits for a real deployment) refuses a server name that binds loopback
    only (`localhost`, 127.x), whether given here or left in the file.
    """
    project = load_project(src)
    server = next(p for p in project["participants"] if p.get("type") == "server")
    if server_name:
        from nvflare.apis.utils.format_check import name_check

        if name_check(server_name, "server")[0]:
            raise NetworkError(f"invalid server name {server_name!r}: expected a DNS host name like fl.example.org")
        server["name"] = server_name
    if not allow_loopback and is_loopback_name(server["name"]):
        raise NetworkError(f"server name {server['name']!r} is loopback: NVFLARE would listen on 127.0.0.1 only and no "
                           "site could connect; give the DNS name sites and admins dial (e.g. fl.example.org), or "
                           "use `fedesm poc up` for a network on this machine")
    if fl_port:
        server["fed_learn_port"] = int(fl_port)
    if admin_port:
        server["admin_port"] = int(admin_port)
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    header = f"# Generated from {Path(src).resolve()} by fedesm (server name and ports substituted).\n"
    atomic_write_text(dest, header + yaml.safe_dump(project, sort_keys=False))
    return dest


def provision(project_file: str | os.PathLike, workspace: str | os.PathLike) -> Path:
    """Run ``nvflare provision``; return the new kits folder (``<workspace>/<project>/prod_NN``)."""
    project = load_project(project_file)
    workspace = Path(workspace).resolve()
    workspace.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "nvflare.cli", "provision", "-p", str(Path(project_file).resolve()),
           "-w", str(workspace), "--force"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    prod_dirs = sorted((workspace / project["name"]).glob("prod_*"), key=lambda p: int(p.name.split("_")[1]))
    if proc.returncode != 0 or not prod_dirs:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-5:]
        raise NetworkError(f"nvflare provision failed (exit {proc.returncode}): {' | '.join(tail)}")
    return prod_dirs[-1]


def use_private_server_storage(server_kit: Path) -> Path:
    """Keep the server's job store and snapshots inside its kit (writes local/resources.json).

    NVFLARE's default is /tmp/nvflare/{jobs,snapshot}-storage, shared by every server on the
    machine: two local networks would list, and may even schedule, each other's jobs.
    """
    local = Path(server_kit) / "local"
    cfg = json.loads((local / "resources.json.default").read_text())
    store = Path(server_kit).resolve() / "store"
    found = 0
    for comp in cfg.get("components", []):
        if comp.get("id") == "job_manager":
            comp.setdefault("args", {})["uri_root"] = str(store / "jobs-storage")
            found += 1
    snapshot = cfg.get("snapshot_persistor", {}).get("args", {}).get("storage", {}).get("args")
    if snapshot is not None:
        snapshot["root_dir"] = str(store / "snapshot-storage")
        found += 1
    if found != 2:
        raise NetworkError(f"{local}/resources.json.default: no job_manager or snapshot storage to relocate")
    atomic_write_text(local / "resources.json", json.dumps(cfg, indent=2))
    return store


# --------------------------------------------------------------------------------------------
# processes
# --------------------------------------------------------------------------------------------


@dataclass
class Proc:
    """One started participant: enough to find and kill its process tree, even from another command."""

    name: str
    pid: int
    create_time: float
    kit: str
    log: str

    def process(self) -> Optional[psutil.Process]:
        """The live root process, or None (also when the pid was reused by another program)."""
        try:
            p = psutil.Process(self.pid)
            if abs(p.create_time() - self.create_time) > 0.5 or p.status() == psutil.STATUS_ZOMBIE:
                return None
            return p
        except psutil.Error:
            return None

    def alive(self) -> bool:
        return self.process() is not None


def _processes_mentioning(marker: str) -> list[psutil.Process]:
    """Our own processes whose command line names `marker` (a kit folder): NVFLARE job processes."""
    found, uid = [], os.getuid()
    for p in psutil.process_iter(["pid", "uids", "cmdline"]):
        try:
            if p.pid == os.getpid() or p.info["uids"] is None or p.info["uids"].real != uid:
                continue
            if any(marker in arg for arg in (p.info["cmdline"] or [])):
                found.append(p)
        except psutil.Error:
            continue
    return found


def kill_tree(proc: Proc, sig: int = signal.SIGTERM, grace: float = 5.0) -> None:
    """Signal the participant's whole tree (its process groups first), SIGKILL what outlives `grace`.

    The participant's own process is signalled before its job processes: were a job process
    to die first, the participant would report the job as failed to the server (a different
    fault from "the site crashed").
    """
    own_group = os.getpgrp()
    for _ in range(3):  # a job process may be spawned while we collect: go round until nothing is left
        procs: dict[int, psutil.Process] = {}  # insertion order = signal order, root first
        root = proc.process()
        if root is not None:
            procs[root.pid] = root
            try:
                for c in root.children(recursive=True):
                    procs[c.pid] = c
            except psutil.Error:
                pass
        for p in _processes_mentioning(proc.kit):
            procs.setdefault(p.pid, p)
        if not procs:
            return
        groups = []
        for p in procs.values():
            try:
                pgid = os.getpgid(p.pid)
            except OSError:
                continue
            if pgid in procs and pgid != own_group and pgid not in groups:  # only groups led by this tree
                groups.append(pgid)
        for pgid in groups:
            try:
                os.killpg(pgid, sig)
            except OSError:
                pass
        for p in procs.values():
            try:
                p.send_signal(sig)
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(list(procs.values()), timeout=grace if sig != signal.SIGKILL else 5.0)
        _kill(alive)


# --------------------------------------------------------------------------------------------
# the network
# --------------------------------------------------------------------------------------------


@dataclass
class NetworkState:
    """What `fedesm poc` needs to find a running network again (saved as <workspace>/network.json)."""

    workspace: str
    project_file: str
    kits: str
    server: str
    clients: list[str]
    admin: str
    fl_port: int
    admin_port: int
    procs: dict[str, Proc] = field(default_factory=dict)

    def to_json(self) -> str:
        d = dict(self.__dict__)
        d["procs"] = {k: v.__dict__ for k, v in self.procs.items()}
        return json.dumps(d, indent=2)

    @classmethod
    def from_json(cls, text: str) -> "NetworkState":
        d = json.loads(text)
        d["procs"] = {k: Proc(**v) for k, v in d.get("procs", {}).items()}
        return cls(**d)


_LIVE: set["LocalNetwork"] = set()


@atexit.register
def _stop_all_at_exit() -> None:
    for net in list(_LIVE):
        try:
            net.stop()
        except Exception:  # noqa: BLE001 - best effort at interpreter exit
            pass


class LocalNetwork:
    """A provisioned NVFLARE network (server + sites) running on this machine.

    Typical use::

        with LocalNetwork(tmp_path / "net") as net:     # provisions, starts, waits for all sites
            job_id = net.submit("jobs_export/esm2_fra_lora")
            meta = net.follow(job_id, timeout=600)
            assert meta["status"] == "FINISHED:COMPLETED"
            result = net.download(job_id, tmp_path / "result")
    """

    def __init__(
        self,
        workspace: str | os.PathLike,
        project_file: str | os.PathLike | None = None,
        server_name: str = "localhost",
        fl_port: Optional[int] = None,
        admin_port: Optional[int] = None,
        heart_beat_timeout: Optional[int] = None,
        admin: Optional[str] = None,
        site_policy: bool = False,
    ):
        """
        Args:
            workspace: folder for the rendered project.yml, the kits, process logs and state.
            project_file: NVFLARE project file; default: the repository's provisioning/project.yml.
            server_name: server DNS name written into the kits ("localhost" for one machine).
            fl_port, admin_port: server ports; default: free ports picked now (admin shares fl_port).
            heart_beat_timeout: whole seconds without a heartbeat before the server drops a site
                (NVFLARE default 600; sites beat every 10 s); tests lower it so that a killed
                site is noticed quickly. NVFLARE 2.9 fails every job submission when it is a float.
            admin: admin user for the Session; default: the project's first project_admin.
            site_policy: write fedesm's shipped policy into the kits (`fedesm.launch.policy`: no
                bring-your-own-code, fedesm's class allow-list, adapters-only privacy filter, version
                guard; the server's job store in its kit, max_jobs 1), as `fedesm poc` does. False
                keeps NVFLARE's default policy (any NVFLARE component, BYOC for admins and leads).
        """
        self.workspace = Path(workspace).resolve()
        self.project_file = Path(project_file) if project_file else DEFAULT_PROJECT_FILE
        self.server_name = server_name
        self.fl_port = fl_port
        self.admin_port = admin_port
        self.heart_beat_timeout = heart_beat_timeout
        self.admin = admin
        self.site_policy = site_policy
        self.state: Optional[NetworkState] = None
        self._sessions: dict = {}  # admin user -> FLARE API Session
        self._popens: dict[str, subprocess.Popen] = {}

    # ---- set-up ------------------------------------------------------------------------------

    def provision(self) -> NetworkState:
        """Render project.yml (server name, free ports) and provision the kits into the workspace."""
        self.workspace.mkdir(parents=True, exist_ok=True)
        fl_port = self.fl_port or free_port()
        admin_port = self.admin_port or fl_port
        rendered = render_project(
            self.project_file, self.workspace / "project.yml", self.server_name, fl_port, admin_port
        )
        project = load_project(rendered)
        kits = provision(rendered, self.workspace / "kits")
        parts = project["participants"]
        server = next(p["name"] for p in parts if p["type"] == "server")
        clients = [p["name"] for p in parts if p["type"] == "client"]
        admins = [p for p in parts if p["type"] == "admin"]
        admin = self.admin or next((p["name"] for p in admins if p.get("role") == "project_admin"), None)
        if not admin or admin not in {p["name"] for p in admins}:
            raise NetworkError(f"{self.project_file}: no admin user {admin or '(project_admin)'} in the project")
        if self.site_policy:
            from fedesm.launch.policy import apply_to_kits

            apply_to_kits(kits, server, clients)
        else:
            use_private_server_storage(kits / server)
        if self.heart_beat_timeout:
            cfg_path = kits / server / "startup" / "fed_server.json"
            cfg = json.loads(cfg_path.read_text())
            for s in cfg["servers"]:
                s["heart_beat_timeout"] = int(math.ceil(self.heart_beat_timeout))
            atomic_write_text(cfg_path, json.dumps(cfg, indent=2))
        self.state = NetworkState(
            workspace=str(self.workspace), project_file=str(rendered), kits=str(kits), server=server,
            clients=clients, admin=admin, fl_port=fl_port, admin_port=admin_port,
        )  # fmt: skip
        self._save()
        return self.state

    @classmethod
    def attach(cls, workspace: str | os.PathLike) -> "LocalNetwork":
        """The network described by <workspace>/network.json (e.g. started by `fedesm poc up`)."""
        path = Path(workspace).resolve() / STATE_FILE
        if not path.is_file():
            raise NetworkError(f"{path}: no network state here (run `fedesm poc up --workspace {workspace}` first)")
        net = cls(workspace)
        net.state = NetworkState.from_json(path.read_text())
        return net

    def _save(self) -> None:
        atomic_write_text(self.workspace / STATE_FILE, self.state.to_json())

    def _require_state(self) -> NetworkState:
        if self.state is None:
            raise NetworkError("network not provisioned (call provision() or start())")
        return self.state

    def kit(self, name: str) -> Path:
        """The startup kit folder of one participant (server, site or admin user)."""
        path = Path(self._require_state().kits) / name
        if not path.is_dir():
            raise NetworkError(f"no startup kit for {name!r} in {self.state.kits}")
        return path

    @property
    def admin_kit(self) -> Path:
        return self.kit(self._require_state().admin)

    # ---- processes ---------------------------------------------------------------------------

    def _python_shim(self) -> Path:
        """A bin/ folder whose `python3` runs this interpreter: the kits' scripts call `python3`.

        A wrapper script, not a symlink: a virtualenv's python only finds its packages when
        started from its own bin/ folder.
        """
        bin_dir = self.workspace / "bin"
        bin_dir.mkdir(exist_ok=True)
        shim = bin_dir / "python3"
        text = f'#!/bin/sh\nexec "{sys.executable}" "$@"\n'
        if not shim.is_file() or shim.read_text() != text:
            atomic_write_text(shim, text)
            shim.chmod(0o755)
        return bin_dir

    def _launch(self, name: str) -> Proc:
        state = self._require_state()
        old = state.procs.get(name)
        if old is not None and old.alive():
            raise NetworkError(f"{name} is already running (pid {old.pid})")
        kit = self.kit(name)
        log_dir = self.workspace / "logs"
        log_dir.mkdir(exist_ok=True)
        log_path = log_dir / f"{name}.log"
        env = dict(os.environ)
        env["PATH"] = f"{self._python_shim()}{os.pathsep}{env.get('PATH', '')}"
        env.pop("NVFL_WORKSPACE", None)
        with open(log_path, "ab") as log:
            popen = subprocess.Popen(
                ["bash", str(kit / "startup" / "sub_start.sh"), "--once"],
                cwd=kit, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,  # own process group: killpg reaches the whole participant
            )  # fmt: skip
        self._popens[name] = popen
        proc = Proc(name, popen.pid, psutil.Process(popen.pid).create_time(), str(kit), str(log_path))
        state.procs[name] = proc
        self._save()
        _LIVE.add(self)
        logger.info("started %s (pid %d), log %s", name, popen.pid, log_path)
        return proc

    def start_server(self) -> None:
        self._launch(self._require_state().server)

    def start_client(self, name: str, wait: bool = True, timeout: float = 120.0) -> None:
        """Start one site; with `wait`, return once the server lists it as (re)connected."""
        state = self._require_state()
        if name not in state.clients:
            raise NetworkError(f"unknown site {name!r}; sites are {', '.join(state.clients)}")
        since = time.time()
        self._launch(name)
        if wait:
            self.wait_for_clients([name], timeout=timeout, since=since)

    def start(self, timeout: float = 180.0) -> "LocalNetwork":
        """Provision (if not done), start the server and all sites, wait until all sites are connected."""
        if self.state is None:
            self.provision()
        deadline = time.time() + timeout
        since = time.time()
        self.start_server()
        self.session(timeout=max(1.0, deadline - time.time()))
        for name in self.state.clients:
            self._launch(name)
        self.wait_for_clients(self.state.clients, timeout=max(1.0, deadline - time.time()), since=since)
        return self

    def kill_client(self, name: str) -> None:
        """Crash one site: SIGKILL its client process and its job process, no goodbye to the server."""
        proc = self._require_state().procs.get(name)
        if proc is None:
            raise NetworkError(f"{name} was not started")
        kill_tree(proc, signal.SIGKILL)
        self._reap(name)

    def kill_job_process(self, name: str, job_id: str) -> int:
        """Crash only a site's job process (as an out-of-memory kill would); the site stays up.

        Returns the number of processes killed (0 when the job does not run there).
        """
        proc = self._require_state().procs.get(name)
        root = proc.process() if proc is not None else None
        if root is None:
            raise NetworkError(f"{name} is not running")
        victims = []
        for p in root.children(recursive=True):
            try:
                if any(job_id in arg for arg in p.cmdline()):
                    victims.append(p)
            except psutil.Error:
                continue
        _kill(victims)
        return len(victims)

    def _reap(self, name: str) -> None:
        popen = self._popens.pop(name, None)
        if popen is not None:
            try:
                popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass

    def stop(self, grace: float = 5.0) -> None:
        """Stop every process of this network (sites first, then the server). Safe to call twice."""
        _LIVE.discard(self)
        self._close_sessions()
        if self.state is None:
            return
        names = [n for n in self.state.procs if n != self.state.server] + [self.state.server]
        for name in names:
            proc = self.state.procs.get(name)
            if proc is not None:
                kill_tree(proc, signal.SIGTERM, grace)
                self._reap(name)
        self.state.procs.clear()
        self._save()
        logger.info("network in %s stopped", self.workspace)

    def detach(self) -> None:
        """Leave the processes running after this Python process exits (for `fedesm poc up`)."""
        _LIVE.discard(self)
        self._close_sessions()
        self._popens.clear()

    def __enter__(self) -> "LocalNetwork":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- admin session -----------------------------------------------------------------------

    def _close_sessions(self) -> None:
        for session in self._sessions.values():
            try:
                session.close()
            except Exception:  # noqa: BLE001 - the server may already be gone
                pass
        self._sessions.clear()

    def session(self, timeout: float = 60.0, user: Optional[str] = None):
        """An admin user's FLARE API Session (connected once, then reused): the project admin's, or `user`'s
        (any admin of the project, from its own startup kit: what NVFLARE authorizes is that user's role)."""
        from nvflare.fuel.flare_api.flare_api import new_secure_session

        state = self._require_state()
        user = user or state.admin
        if user in self._sessions:
            return self._sessions[user]
        deadline = time.time() + timeout
        last_error = None
        while time.time() < deadline:
            server = state.procs.get(state.server)
            if server is not None and not server.alive():
                raise NetworkError(f"server process exited; see {server.log}")
            try:
                with contextlib.redirect_stdout(io.StringIO()):  # NVFLARE prints "Connecting to FLARE ..."
                    self._sessions[user] = new_secure_session(user, str(self.kit(user)), timeout=5.0)
                return self._sessions[user]
            except Exception as e:  # noqa: BLE001 - NoConnection etc. while the server boots
                last_error = e
                time.sleep(1.0)
        raise NetworkError(f"admin {user} could not connect within {timeout:.0f}s: {last_error}")

    def connected_clients(self) -> dict[str, float]:
        """Sites the server currently lists, with their last heartbeat time (epoch seconds)."""
        info = self.session().get_system_info()
        return {c.name: float(c.last_connect_time or 0.0) for c in info.client_info}

    def wait_for_clients(self, names: Iterable[str], timeout: float = 120.0, since: float = 0.0) -> None:
        """Wait until the server lists every site in `names` with a heartbeat after `since`."""
        names = list(names)
        deadline = time.time() + timeout
        seen: dict[str, float] = {}
        while time.time() < deadline:
            for n in names:
                proc = self.state.procs.get(n)
                if proc is not None and not proc.alive():
                    raise NetworkError(f"site {n} exited; see {proc.log}")
            seen = self.connected_clients()
            if all(seen.get(n, 0.0) >= since for n in names):
                logger.info("sites connected: %s", ", ".join(sorted(seen)))
                return
            time.sleep(1.0)
        missing = [n for n in names if seen.get(n, 0.0) < since]
        raise NetworkError(f"sites not connected after {timeout:.0f}s: {', '.join(missing)}")

    def wait_for_dropped(self, names: Iterable[str], timeout: float = 120.0) -> None:
        """Wait until the server no longer lists any site in `names` (after heart_beat_timeout)."""
        names = set(names)
        deadline = time.time() + timeout
        while time.time() < deadline:
            listed = names & set(self.connected_clients())
            if not listed:
                return
            time.sleep(1.0)
        raise NetworkError(f"server still lists {', '.join(sorted(listed))} after {timeout:.0f}s")

    # ---- jobs --------------------------------------------------------------------------------

    def submit(self, job_dir: str | os.PathLike, user: Optional[str] = None) -> str:
        """Submit a job folder (meta.json + app folders) as the project admin or `user`; return its job id."""
        job_dir = Path(job_dir).resolve()
        if not (job_dir / "meta.json").is_file() and not (job_dir / "meta.conf").is_file():
            raise NetworkError(f"{job_dir}: not an NVFLARE job folder (no meta.json)")
        job_id = self.session(user=user).submit_job(str(job_dir))
        logger.info("submitted %s as job %s", job_dir.name, job_id)
        return job_id

    def follow(
        self,
        job_id: str,
        timeout: float = 600.0,
        poll_interval: float = 2.0,
        on_update: Optional[Callable[[dict], None]] = None,
        user: Optional[str] = None,
    ) -> dict:
        """Poll the job until it finishes; log each status change; return the final job meta.

        Raises NetworkError when `timeout` passes first (the job keeps running: abort it if needed).
        """
        from nvflare.fuel.flare_api.api_spec import MonitorReturnCode

        last = {"status": None}

        def _cb(session, job_id, job_meta, *args, **kwargs) -> bool:
            status = job_meta.get("status")
            if status != last["status"]:
                logger.info("job %s: %s", job_id, status)
                last["status"] = status
            if on_update is not None:
                on_update(job_meta)
            return True

        session = self.session(user=user)
        rc = session.monitor_job(job_id, timeout=timeout, poll_interval=poll_interval, cb=_cb)
        if rc == MonitorReturnCode.TIMEOUT:
            raise NetworkError(f"job {job_id} still {last['status']} after {timeout:.0f}s")
        return session.get_job_meta(job_id)

    def job_log(self, name: str, job_id: str) -> Path:
        """The job's log file in a participant's workspace (may not exist yet)."""
        return self.kit(name) / job_id / "log.txt"

    def job_status(self, job_id: str) -> str:
        return self.session().get_job_meta(job_id)["status"]

    def download(self, job_id: str, dest: str | os.PathLike, user: Optional[str] = None) -> Path:
        """Download the job's result (server and site workspaces) into `dest`; return its folder."""
        dest = Path(dest).resolve()
        location = self.session(user=user).download_job_result(job_id, str(dest))
        if not location or not Path(location).is_dir():
            raise NetworkError(f"job {job_id}: download returned no result folder ({location})")
        return Path(location)

    def abort(self, job_id: str) -> str:
        """Ask the server to abort the job; returns the server's message."""
        info = self.session().abort_job(job_id)
        logger.info("abort job %s: %s", job_id, info)
        return info

    # ---- status ------------------------------------------------------------------------------

    def status(self) -> dict:
        """Which processes are alive and, if the server answers, which sites and jobs it sees."""
        state = self._require_state()
        out = {
            "workspace": state.workspace,
            "server": f"{state.server}:{state.fl_port}",
            "processes": {n: (p.pid if p.alive() else None) for n, p in state.procs.items()},
            "connected_sites": None,
            "running_jobs": None,
        }
        server = state.procs.get(state.server)
        if server is not None and server.alive():
            try:
                info = self.session(timeout=10.0).get_system_info()
                out["connected_sites"] = sorted(c.name for c in info.client_info)
                out["running_jobs"] = [j.job_id for j in info.job_info]
            except Exception as e:  # noqa: BLE001 - report, don't fail, a status query
                out["error"] = str(e)
        return out
