"""`fedesm job list|show|export`."""

from __future__ import annotations

import json

from fedesm.jobs import export_job, job_source, job_values, list_jobs, parse_overrides


def register(sub) -> None:
    p = sub.add_parser("job", help="list, inspect and export NVFLARE job bundles",
                       description="NVFLARE job bundles of fedesm (jobs/): esm2_fra_lora (Scatter-and-Gather, "
                       "FRA-LoRA), esm2_fra_lora_skew_dp (label-skewed sites, gradient noise), esm2_cyclic "
                       "(sequential training across sites).")
    jsub = p.add_subparsers(dest="job_command", metavar="ACTION")

    q = jsub.add_parser("list", help="the job bundles and their settable values")
    q.set_defaults(func=_list)

    q = jsub.add_parser("show", help="a job's settable top-level values (model, rank, rounds, steps, lr, strategy)")
    q.add_argument("job", help="job name (in jobs/) or job folder")
    q.set_defaults(func=_show)

    q = jsub.add_parser("export", help="write self-contained job copies (fedesm inside app/custom)",
                        description="Copy job bundles with the fedesm package inside app/custom, so `nvflare job "
                        "submit` works on a network whose sites only have NVFLARE, torch, fair-esm and peft. "
                        "--set KEY=VALUE changes a top-level value of the server/client configs (e.g. "
                        "num_rounds=5, steps_per_round=200, strategy=fra-ef, arch=esm2_t6_8M_UR50D).")
    q.add_argument("jobs", nargs="*", help="job names or folders (default: all in jobs/)")
    q.add_argument("--out", default="jobs_export", help="output folder (default jobs_export)")
    q.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    q.add_argument("--name", default=None, help="name of the exported job (one job only)")
    q.add_argument("--no-package", action="store_true", help="do not copy fedesm into app/custom")
    q.set_defaults(func=_export)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _list(args) -> int:
    for name in list_jobs():
        print(name)
    return 0


def _show(args) -> int:
    print(json.dumps(job_values(job_source(args.job)), indent=2))
    return 0


def _export(args) -> int:
    overrides = parse_overrides(args.set)
    names = args.jobs or list_jobs()
    for name in names:
        dest = export_job(name, args.out, overrides, job_name=args.name if len(names) == 1 else None,
                          include_package=not args.no_package)
        print(f"exported {dest}")
    return 0
