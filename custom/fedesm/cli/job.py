"""`fedesm job list|show|export|render`."""

from __future__ import annotations

import json

from fedesm.launch.jobs import JOBS, export_job, job_settings, list_jobs, write_shipped_jobs
from fedesm.settings import parse_assignment


def register(sub) -> None:
    p = sub.add_parser("job", help="list, inspect and export NVFLARE job bundles",
                       description="NVFLARE job bundles of fedesm: " + "; ".join(
                           f"{t.name} ({t.workflow.replace('_', '-')}: {t.description})" for t in JOBS.values())
                       + ". Each bundle's configs carry the settings blocks model, lora, training and federation.")
    jsub = p.add_subparsers(dest="job_command", metavar="ACTION")

    q = jsub.add_parser("list", help="the shipped job bundles")
    q.set_defaults(func=_list)

    q = jsub.add_parser("show", help="a job's settings (the model, lora, training and federation blocks)")
    q.add_argument("job", help="job name or job folder")
    q.set_defaults(func=_show)

    q = jsub.add_parser("export", help="write job bundles with changed settings (configuration only)",
                        description="Write job bundles for `nvflare job submit` or `nvflare simulator`: "
                        "meta.json (with the fedesm version that wrote it) and the two config files, nothing "
                        "else, so every site runs the fedesm it installed and the shipped site policy accepts "
                        "the job. --set BLOCK.FIELD=VALUE changes a setting (values parsed as YAML, as "
                        "everywhere in fedesm), e.g. training.rounds=5, training.steps_per_round=200, "
                        "federation.strategy=fra-ef, model.arch=esm2_t6_8M_UR50D, lora.r=8; a field name that "
                        "only one block has may stand alone (steps_per_round=200). `fedesm job show JOB` lists "
                        "them all.")
    q.add_argument("jobs", nargs="*", help="job names or folders (default: all shipped jobs)")
    q.add_argument("--out", default="jobs_export", help="output folder (default jobs_export)")
    q.add_argument("--set", action="append", default=[], metavar="BLOCK.FIELD=VALUE", help="change a setting")
    q.add_argument("--name", default=None, help="name of the exported job (one job only)")
    q.add_argument("--with-code", action="store_true",
                   help="also copy the fedesm package into app/custom (a bring-your-own-code job): for a plain "
                   "`nvflare simulator` run in a workspace without fedesm's class allow-list, or a network "
                   "whose policy grants BYOC. The shipped site policy refuses such jobs.")
    q.add_argument("--resume-from", default=None, metavar="PATH",
                   help="continue a crashed run: its saved round on the server, <server workspace>/<job id>/fedesm/"
                   "rounds/round_NNN (or .../fedesm/last), or an s3:// URI of one; the job runs rounds NNN+1 to "
                   "training.rounds (= --set federation.resume_from=PATH)")
    q.set_defaults(func=_export)

    q = jsub.add_parser("render", help="rewrite the shipped job folders from their definitions",
                        description="Render every shipped job (fedesm.launch.jobs.JOBS) into a folder (default: the "
                        "repository's jobs/), configuration only.")
    q.add_argument("--out", default=None, help="folder (default: the repository's jobs/)")
    q.set_defaults(func=_render)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _list(args) -> int:
    for name in list_jobs():
        print(name)
    return 0


def _show(args) -> int:
    print(json.dumps(job_settings(args.job).to_dict(), indent=2))
    return 0


def _export(args) -> int:
    names = args.jobs or list_jobs()
    overrides = {".".join(parts): value for parts, value in map(parse_assignment, args.set)}
    if args.resume_from is not None:
        overrides["federation.resume_from"] = args.resume_from  # a path, never parsed as YAML
    for name in names:
        dest = export_job(name, args.out, overrides, job_name=args.name if len(names) == 1 else None,
                          include_package=args.with_code)
        print(f"exported {dest}" + (f" (resumes from {args.resume_from})" if args.resume_from else ""))
    return 0


def _render(args) -> int:
    for path in write_shipped_jobs(args.out):
        print(f"rendered {path}")
    return 0
