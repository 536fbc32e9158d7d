"""`fedesm poc provision|up|down|status`: startup kits, and a real provisioned network on this machine."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from fedesm.errors import FedesmError
from fedesm.launch.network import DEFAULT_PROJECT_FILE, LocalNetwork, provision, render_project


def register(sub) -> None:
    p = sub.add_parser(
        "poc",
        help="provision startup kits; run a provisioned server + sites on this machine",
        description="Provision NVFLARE startup kits from provisioning/project.yml, or bring up the whole "
        "network (server and every site as separate processes, gRPC with mutual TLS on loopback) for trying "
        "jobs before a real deployment.",
    )
    psub = p.add_subparsers(dest="poc_command", metavar="ACTION")

    q = psub.add_parser(
        "provision",
        help="write startup kits for a real deployment, with the server's DNS name substituted",
        description="Copy the project file with the server's name (its DNS name, which is also the CN/SAN "
        "of its certificate) substituted, then run `nvflare provision`. Hand each organisation its own "
        "kit folder; keep the workspace's state/ folder (root CA key) private.",
    )
    q.add_argument("--server-name", required=True, help="fully qualified DNS name of the server, e.g. fl.example.org")
    q.add_argument("--workspace", required=True, help="folder to write the project copy and the kits into")
    q.add_argument("--port", type=int, default=None, help="server port for sites and admins (default: as in the file, 8002)")
    q.add_argument("--project-file", default=str(DEFAULT_PROJECT_FILE), help="NVFLARE project file (default: %(default)s)")
    q.set_defaults(func=_provision)

    q = psub.add_parser(
        "up",
        help="provision (first time) and start server + sites in the background",
        description="Provision kits for server name localhost on a free port (first time only; later runs "
        "reuse the kits), start the server and every site from their startup kits, wait until all sites "
        "are connected, and print how to connect as admin. Processes keep running until `fedesm poc down`.",
    )
    q.add_argument("--workspace", required=True, help="folder for kits, logs and network.json")
    q.add_argument("--project-file", default=str(DEFAULT_PROJECT_FILE), help="NVFLARE project file (default: %(default)s)")
    q.add_argument("--port", type=int, default=None, help="server port (default: a free port)")
    q.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for all sites (default 180)")
    q.set_defaults(func=_up)

    q = psub.add_parser("down", help="stop every process of the network", description="Stop the server, the sites "
                        "and their job processes started by `fedesm poc up` (kits and logs stay).")  # fmt: skip
    q.add_argument("--workspace", required=True, help="the folder given to `fedesm poc up`")
    q.set_defaults(func=_down)

    q = psub.add_parser("status", help="processes, connected sites and running jobs",
                        description="Show which processes of the network are alive and, when the server "
                        "answers, which sites it sees and which jobs run.")  # fmt: skip
    q.add_argument("--workspace", required=True, help="the folder given to `fedesm poc up`")
    q.add_argument("--json", action="store_true", help="print the status as JSON")
    q.set_defaults(func=_status)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _provision(args) -> int:
    workspace = Path(args.workspace).resolve()
    rendered = render_project(args.project_file, workspace / "project.yml", server_name=args.server_name,
                              fl_port=args.port)  # fmt: skip
    kits = provision(rendered, workspace)
    print(f"startup kits: {kits}")
    for kit in sorted(p for p in kits.iterdir() if p.is_dir()):
        print(f"  {kit.name}")
    print(f"root CA state (keep private, needed to add sites later): {workspace / kits.parent.name / 'state'}")
    return 0


def _up(args) -> int:
    workspace = Path(args.workspace).resolve()
    if (workspace / "network.json").is_file():
        net = LocalNetwork.attach(workspace)
        running = [n for n, p in net.state.procs.items() if p.alive()]
        if running:
            raise FedesmError(f"{workspace}: network already running ({', '.join(running)}); "
                              f"`fedesm poc down --workspace {args.workspace}` first")  # fmt: skip
    else:
        net = LocalNetwork(workspace, args.project_file, fl_port=args.port)
    try:
        net.start(timeout=args.timeout)
    except BaseException:
        net.stop()
        raise
    net.detach()
    state = net.state
    admin_kit = net.admin_kit
    q = shlex.quote
    print(f"network up: server {state.server}:{state.fl_port}, sites {', '.join(state.clients)}")
    print(f"  logs:   {workspace / 'logs'}  (each job: <kit>/<job id>/log.txt)")
    print(f"  admin:  {state.admin}, startup kit {admin_kit}")
    print("connect:")
    print(f"  admin console: bash {q(str(admin_kit / 'startup' / 'fl_admin.sh'))}   (user name: {state.admin})")
    print(f"  CLI:           nvflare job submit -j JOB_FOLDER --startup-kit {q(str(admin_kit))}")
    print(f"                 nvflare job list --startup-kit {q(str(admin_kit))}")
    print("  Python:        from nvflare.fuel.flare_api.flare_api import new_secure_session")
    print(f"                 s = new_secure_session({state.admin!r}, {str(admin_kit)!r})")
    print(f"stop: fedesm poc down --workspace {q(args.workspace)}")
    return 0


def _down(args) -> int:
    net = LocalNetwork.attach(args.workspace)
    running = [n for n, p in net.state.procs.items() if p.alive()]
    net.stop()
    print(f"stopped: {', '.join(running) if running else 'nothing was running'}")
    return 0


def _status(args) -> int:
    net = LocalNetwork.attach(args.workspace)
    try:
        status = net.status()
    finally:
        net.detach()
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    print(f"server {status['server']} (workspace {status['workspace']})")
    if not status["processes"]:
        print(f"  not running (start it with `fedesm poc up --workspace {args.workspace}`)")
    for name, pid in status["processes"].items():
        print(f"  {name:<12} {'running, pid ' + str(pid) if pid else 'stopped'}")
    if status["connected_sites"] is not None:
        print(f"connected sites: {', '.join(status['connected_sites']) or 'none'}")
        print(f"running jobs:    {', '.join(status['running_jobs']) or 'none'}")
    elif "error" in status:
        print(f"server not answering: {status['error']}")
    return 0 if status["processes"] and all(status["processes"].values()) else 1
