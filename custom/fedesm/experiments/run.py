"""`fedesm experiment run CONFIG --out DIR`: the paper's experiments from one YAML file.

For each seed, prepares what all arms share (data split per split mode, held-out val and test, the
backbone, the initial adapters), then runs every arm (`fedesm.experiments.arms`), records its status
in the run folder (`fedesm.experiments.layout`) so a run can be resumed, and writes the report (mean
and spread over seeds). Presets live in `presets/` (`fedesm experiment presets` lists them): `cpu` (tiny
random-init ESM-2, real GPSite ATP data, 3 seeds, CPU), `paper` (ESM-2 35M, r=16, 30 x 5,000 steps; for a
GPU), `ranks` (sites of different LoRA ranks, CPU) and `loss` (loss class weights, centralized, CPU).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

import yaml

from fedesm.errors import FedesmError
from fedesm.experiments import layout
from fedesm.experiments.arms import RUNNERS, Seed, run_reference, write_json
from fedesm.experiments.config import ExperimentConfig, arm_settings
from fedesm.experiments.plan import plan_lines
from fedesm.experiments.prepare import heldout_data, prepare_backbone, prepare_data, prepare_initial
from fedesm.fileio import atomic_write_text


def machine_info() -> dict:
    import platform

    import torch

    info = {"platform": platform.platform(), "machine": platform.machine(), "cpus": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _select(cfg: ExperimentConfig, only: Optional[list[str]], arms: Optional[list[str]]) -> ExperimentConfig:
    """The config restricted to the experiments in `only` and the arms in `arms` (the plan, the config copy
    and the report then show what this run does)."""
    unknown = set(only or []) - {e.id for e in cfg.experiments}
    if unknown:
        raise FedesmError(f"unknown experiment(s) {sorted(unknown)}; config has {[e.id for e in cfg.experiments]}")
    experiments = [e for e in cfg.experiments if not only or e.id in only]
    known_arms = {a.id for e in experiments for a in e.arms}
    if arms and set(arms) - known_arms:
        raise FedesmError(f"unknown arm(s) {sorted(set(arms) - known_arms)}; selected experiments have {sorted(known_arms)}")
    if not (only or arms):
        return cfg
    cfg = copy.copy(cfg)
    cfg.experiments = [copy.copy(e) for e in experiments]
    for e in cfg.experiments:
        e.arms = [a for a in e.arms if not arms or a.id in arms]
    cfg.experiments = [e for e in cfg.experiments if e.arms]
    return cfg


def _prepare_out(out: Path, resume: bool, force: bool) -> None:
    if out.exists() and (out / layout.RUN).exists() and not (resume or force):
        raise FedesmError(f"{out} holds a previous run: use --resume to continue it or --force to start over")
    if force and out.exists():
        if not (out / layout.RUN).exists() and any(out.iterdir()):
            raise FedesmError(f"{out}: not empty and not an experiment run; refusing to delete it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def run_experiments(cfg: ExperimentConfig, out_dir, only: Optional[list[str]] = None,
                    arms: Optional[list[str]] = None, resume: bool = False, force: bool = False,
                    echo: Callable[[str], None] = print, report: bool = True, target_f1: float = 0.5) -> Path:
    """Run the config's experiments (or those in `only`, arms in `arms`) into `out_dir`; write the report."""
    out = Path(out_dir).resolve()
    cfg = _select(cfg, only, arms)
    _prepare_out(out, resume, force)
    t0 = time.perf_counter()
    for line in plan_lines(cfg):
        echo(line)
    atomic_write_text(out / layout.CONFIG, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    run_info = {"name": cfg.name, "title": cfg.title, "caption": cfg.caption, "description": cfg.description,
                "source": cfg.source, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                "plan": plan_lines(cfg), "status": "running", "machine": machine_info()}
    write_json(out / layout.RUN, run_info)
    if cfg.runtime["cpu_threads"]:  # the centralized arms and evaluation here, like each simulated site
        import torch

        torch.set_num_threads(int(cfg.runtime["cpu_threads"]))
    failures = []
    for exp in cfg.experiments:
        (out / exp.id).mkdir(exist_ok=True)
        write_json(out / exp.id / layout.EXPERIMENT, {"id": exp.id, "title": exp.title, "split": exp.split,
                                                      "job": exp.job, "description": exp.description,
                                                      "arms": [a.id for a in exp.arms], "seeds": cfg.seeds})
    for seed in cfg.seeds:
        shared = prepare_seed(cfg, out, seed, echo)
        for exp in cfg.experiments:
            echo(f"{exp.id} (seed {seed}): {exp.title}")
            if shared.heldout.get("test"):
                run_reference(exp, layout.reference_path(out, exp.id, seed), shared, echo)
            for arm in exp.arms:
                failure = _run_arm(cfg, exp, arm, layout.arm_dir(out, exp.id, arm.id, seed), shared, resume, echo)
                if failure:
                    failures.append(failure)
    run_info.update(status="failed" if failures else "done", failures=failures,
                    finished=time.strftime("%Y-%m-%d %H:%M:%S"), wall_seconds=time.perf_counter() - t0)
    write_json(out / layout.RUN, run_info)
    if report:
        from fedesm.experiments.report import build_report

        path = build_report(out, target_f1=target_f1)
        echo(f"report: {path}")
    echo(f"total {time.perf_counter() - t0:.0f}s" + (f"; {len(failures)} arm(s) failed" if failures else ""))
    if failures:
        raise FedesmError(f"{len(failures)} arm(s) failed: " + "; ".join(failures))
    return out


def prepare_seed(cfg: ExperimentConfig, out: Path, seed: int, echo) -> Seed:
    """The split, backbone, initial adapters, held-out data and evaluator every arm of `seed` shares."""
    from fedesm.evaluation.scoring import AdapterEvaluator

    split_dirs = prepare_data(cfg, out, seed, echo)
    backbone = prepare_backbone(cfg, out, seed)
    initial = prepare_initial(cfg, out, seed, backbone)
    evaluator = AdapterEvaluator(backbone, cfg.lora, seed=seed, device=cfg.runtime["device"],
                                 attention=cfg.model.attention)
    return Seed(seed=seed, split_dirs=split_dirs, backbone=backbone, initial=initial,
                heldout=heldout_data(next(iter(split_dirs.values()))), evaluator=evaluator)


def _run_arm(cfg, exp, arm, arm_dir: Path, shared: Seed, resume: bool, echo) -> Optional[str]:
    """Run one arm for one seed into `arm_dir` and record its status in arm.json; returns a failure line or None."""
    info_path = arm_dir / layout.ARM
    if resume and info_path.is_file() and json.loads(info_path.read_text()).get("status") == "done":
        echo(f"  [{exp.id}/{arm.id} seed {shared.seed}] already done; skipped (--resume)")
        return None
    if arm_dir.exists():
        shutil.rmtree(arm_dir)
    arm_dir.mkdir(parents=True)
    s = arm_settings(cfg, exp, arm, shared.seed)
    info = {"id": arm.id, "label": arm.label, "kind": arm.kind, "experiment": exp.id, "seed": shared.seed,
            "strategy": s.federation.strategy if arm.kind == "federated" else None, "description": arm.description,
            "split": exp.split, "job": exp.job if arm.kind == "federated" else None,
            "training": s.training.to_dict(), "federation": s.federation.to_dict(), "lora": s.lora.to_dict(),
            "model": s.model.to_dict(), "sites": cfg.sites, "status": "running"}
    write_json(info_path, info)
    start = time.perf_counter()
    failure = None
    try:
        info.update(RUNNERS[arm.kind](cfg, exp, arm, arm_dir, shared, echo))
        info["status"] = "done"
    except FedesmError as e:
        info.update(status="failed", error=str(e))
        failure = f"{exp.id}/{arm.id} seed {shared.seed}: {str(e).splitlines()[0]}"
        echo(f"  [{exp.id}/{arm.id} seed {shared.seed}] FAILED: {e}")
    info["wall_seconds"] = time.perf_counter() - start
    write_json(info_path, info)
    return failure
