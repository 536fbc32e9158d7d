"""`fedesm poc provision|up|policy|down|status`: startup kits, their site policy, and a real provisioned
network on this machine."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from fedesm.errors import FedesmError
from fedesm.launch.network import DEFAULT_PROJECT_FILE, LocalNetwork, load_project, provision, render_project
from fedesm.launch.policy import (IMAGE_STORE_ROOT, PRIVACY, apply_to_kits, write_chart_files, write_server_policy,
                                  write_simulator_policy, write_site_policy)


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
        "of its certificate) and ports substituted, run `nvflare provision`, and write fedesm's site policy "
        "into the kits (fedesm.launch.policy): every site's local/ gets authorization.json (no job may bring "
        "code), resources.json (fedesm's class allow-list, no log streaming, the version guard) and "
        "privacy.json (only adapters, the head and metrics leave); the server's local/ gets its "
        "authorization.json and a resources.json with the job store under --server-store and max_jobs 1. "
        "Hand each organisation its own kit folder; keep the workspace's state/ folder (root CA key) private. "
        "A loopback server name (localhost, 127.x) is refused: NVFLARE would listen on 127.0.0.1 only.",
    )
    q.add_argument("--server-name", required=True, help="fully qualified DNS name of the server, e.g. fl.example.org")
    q.add_argument("--workspace", required=True, help="folder to write the project copy and the kits into")
    q.add_argument("--port", type=int, default=None, help="server port for sites (default: as in the file, 8002)")
    q.add_argument("--admin-port", type=int, default=None,
                   help="a separate server port for admin consoles and the nvflare CLI (project admin, org admins, "
                   "leads), e.g. 8003; default: admins share --port (NVFLARE's default)")
    q.add_argument("--server-store", default=IMAGE_STORE_ROOT,
                   help="absolute folder, as the server sees it, for its job store and snapshots (default: "
                   "%(default)s, inside the workspace of the fedesm image and the orchestrator chart)")
    q.add_argument("--no-site-policy", action="store_true",
                   help="leave NVFLARE's default policy in the kits (BYOC for admins and leads, NVFLARE's class "
                   "allow-list, which refuses fedesm's components)")
    q.add_argument("--project-file", default=str(DEFAULT_PROJECT_FILE), help="NVFLARE project file (default: %(default)s)")
    q.set_defaults(func=_provision)

    q = psub.add_parser(
        "up",
        help="provision (first time) and start server + sites in the background",
        description="Provision kits for server name localhost on a free port (first time only; later runs "
        "reuse the kits) with fedesm's site policy in them (as `fedesm poc provision` writes it), start the "
        "server and every site from their startup kits, wait until all sites are connected, and print how "
        "to connect as admin. Processes keep running until `fedesm poc down`.",
    )
    q.add_argument("--workspace", required=True, help="folder for kits, logs and network.json")
    q.add_argument("--project-file", default=str(DEFAULT_PROJECT_FILE), help="NVFLARE project file (default: %(default)s)")
    q.add_argument("--port", type=int, default=None, help="server port (default: a free port)")
    q.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for all sites (default 180)")
    q.set_defaults(func=_up)

    q = psub.add_parser(
        "policy",
        help="write fedesm's site policy files (authorization, privacy, resources) for a kit's local/",
        description="Write the local/ files of fedesm's site policy (fedesm.launch.policy) for one participant "
        "whose kit was provisioned without them: --role site writes authorization.json (no job may bring code), "
        "privacy.json (only adapters, the head and metrics leave) and resources.json (fedesm's class "
        "allow-list, no log streaming, --gpus, the version guard); --role server writes authorization.json and "
        "resources.json (job store under --server-store, max_jobs 1); --role simulator writes, into the "
        "simulator workspace --out, the allow-list and privacy scope that let `nvflare simulator` run "
        "code-free bundles (NVFLARE keeps WORKSPACE/local between runs). --charts rewrites the copies the "
        "Helm charts mount (helm/*/files/) instead.",
    )
    q.add_argument("--out", default=None, help="the kit's local/ folder to write into (--role simulator: the workspace)")
    q.add_argument("--role", choices=("site", "server", "simulator"), default="site",
                   help="site (default), server or simulator")
    q.add_argument("--gpus", type=int, default=0, help="GPUs the site declares to NVFLARE's resource manager (default 0)")
    q.add_argument("--server-store", default=IMAGE_STORE_ROOT,
                   help="server only: absolute folder for the job store and snapshots (default: %(default)s)")
    q.add_argument("--charts", action="store_true", help="rewrite helm/fedesm-site/files and helm/fedesm-orchestrator/files")
    q.set_defaults(func=_policy)

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
    if not Path(args.server_store).is_absolute():
        raise FedesmError(f"--server-store {args.server_store}: give an absolute path (NVFLARE's storage needs one)")
    rendered = render_project(args.project_file, workspace / "project.yml", server_name=args.server_name,
                              fl_port=args.port, admin_port=args.admin_port, allow_loopback=False)  # fmt: skip
    kits = provision(rendered, workspace)
    project = load_project(rendered)
    server = next(p for p in project["participants"] if p["type"] == "server")
    print(f"startup kits: {kits}")
    for kit in sorted(p for p in kits.iterdir() if p.is_dir()):
        print(f"  {kit.name}")
    port = server.get("fed_learn_port", 8002)
    print(f"server {server['name']}: sites connect to port {port}, admins to port {server.get('admin_port', port)}")
    if not args.no_site_policy:
        clients = [p["name"] for p in project["participants"] if p["type"] == "client"]
        apply_to_kits(kits, server["name"], clients, store_root=args.server_store)
        print(f"site policy written into local/ of {', '.join(clients)} and {server['name']} "
              f"(job store {args.server_store})")
    print(f"root CA state (keep private, needed to add sites later): {workspace / kits.parent.name / 'state'}")
    return 0


def _policy(args) -> int:
    if args.charts:
        for path in write_chart_files():
            print(f"rendered {path}")
        return 0
    if not args.out:
        raise FedesmError("give --out LOCAL_DIR (a kit's local/ folder) or --charts")
    if args.role == "simulator":
        resources = write_simulator_policy(args.out)
        written = [resources.parent / PRIVACY, resources]  # it writes both
    elif args.role == "server":
        if not Path(args.server_store).is_absolute():
            raise FedesmError(f"--server-store {args.server_store}: give an absolute path")
        written = write_server_policy(args.out, args.server_store)
    else:
        written = write_site_policy(args.out, num_gpus=args.gpus)
    for path in written:
        print(f"wrote {path}")
    print("  " + "; ".join(([] if args.role == "simulator" else ["authorization.json: no bring-your-own-code jobs"])
                           + ["resources.json: fedesm's class allow-list" + ("" if args.role == "simulator" else
                                                                              " and version guard")]
                           + ([] if args.role == "server" else ["privacy.json: only the job's LoRA factors, head, "
                                                                "counts and metrics leave a site"])))
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
        net = LocalNetwork(workspace, args.project_file, fl_port=args.port, site_policy=True)
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
    print(_site_config_note(net))
    print(f"stop: fedesm poc down --workspace {q(args.workspace)}")
    return 0


def _site_config_note(net: LocalNetwork) -> str:
    """Give each POC site a site config when it has none (the shipped public data, a tiny random-init model),
    and say what a job for them looks like."""
    import os

    from fedesm.site_config import DEFAULT_NAME, ENV_VAR, POC_ARCH, POC_JOB_SETTINGS, write_poc_site_config

    if os.environ.get(ENV_VAR):
        return f"site config: every site reads {os.environ[ENV_VAR]} ({ENV_VAR})"
    written = []
    for site in net.state.clients:
        path = net.kit(site) / "local" / DEFAULT_NAME
        if not path.is_file():
            write_poc_site_config(path)
            written.append(site)
    sets = " ".join(f"--set {s}" for s in POC_JOB_SETTINGS)
    return (f"site config: each site reads <its kit>/local/{DEFAULT_NAME}"
            + (f" (written now for {', '.join(written)}: the shipped gpsite:ATP, random:{POC_ARCH})" if written else "")
            + f"\n  a job for these sites: fedesm job export esm2_fra_lora --out jobs_export {sets}")


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
