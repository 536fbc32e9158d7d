"""Running one arm of an experiment, and scoring it on the held-out data every arm shares.

* a federated arm exports the experiment's job with the arm's settings and runs it in `nvflare
  simulator`; each site reads its own split through a site config (`{site}` expands to its name);
  each round's global model is then scored on the held-out val split (and the last on test);
* a centralized arm trains the same model with the same settings on the pooled training data of the
  sites (`fedesm.training.centralized.run_centralized`), R rounds of N steps, scored the same way;
* the reference (logistic regression) is trained on the same pooled data and scored the same way.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Callable

from fedesm import results
from fedesm.experiments import layout
from fedesm.experiments.config import ArmSpec, ExperimentConfig, ExperimentSpec, arm_settings
from fedesm.experiments.prepare import pooled_site_training
from fedesm.fileio import atomic_write_text
from fedesm.settings import TrainConfig
from fedesm.tables import read_table, write_table

METRIC_KEYS = ("accuracy", "precision", "recall", "f1", "mcc", "auroc", "auprc")
TUNED_KEYS = ("precision_tuned", "recall_tuned", "f1_tuned", "mcc_tuned")


def metric_row(arm_id: str, round_num: int, split: str, metrics: dict) -> dict:
    """A held-out row: split "val" from plain metrics, split "test" from the `test_*` ones (at 0.5 and at
    the threshold tuned on the held-out val)."""
    row = {"arm": arm_id, "site": layout.HELDOUT, "round": round_num, "split": split}
    if split == "test":
        row.update({k: metrics.get(f"test_{k}") for k in METRIC_KEYS + TUNED_KEYS})
        row["positive_fraction"] = metrics.get("test_positive_fraction")
    else:
        row.update({k: metrics.get(k) for k in METRIC_KEYS})
        row.update(residues=metrics.get("residues"), positives=metrics.get("positives"))
    row["threshold_tuned"] = metrics.get("threshold_tuned")
    return row


def write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def _final_test(arm_id: str, round_num: int, metrics: dict, arm_dir: Path) -> dict:
    """The test row of an arm's final model; its precision-recall curve goes to test_pr_curve.json."""
    if metrics.get("pr_curve"):
        write_json(arm_dir / layout.PR_CURVE, metrics["pr_curve"])
    return metric_row(arm_id, round_num, "test", metrics)


@contextlib.contextmanager
def forward_log(logger_name: str, echo, prefix: str):
    """Show a module's INFO lines (e.g. the centralized runner's per-round line) as progress lines."""
    logger = logging.getLogger(logger_name)

    class Handler(logging.Handler):
        def emit(self, record):
            echo(f"{prefix}{record.getMessage()}")

    handler = Handler(level=logging.INFO)
    old_level, old_propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        logger.propagate = old_propagate


def _fmt(v, spec=".3f") -> str:
    return format(v, spec) if isinstance(v, (int, float)) else "-"


def run_federated(cfg: ExperimentConfig, exp: ExperimentSpec, arm: ArmSpec, arm_dir: Path, split_dir: Path,
                  backbone: str, heldout: dict, evaluator, echo: Callable[[str], None]) -> dict:
    from fedesm.launch.jobs import export_job
    from fedesm.launch.simulate import run_simulator
    from fedesm.site_config import write_site_config

    s = arm_settings(cfg, exp, arm, backbone=backbone)
    t = s.training
    job = export_job(exp.job, arm_dir, job_name="job", settings=s)
    site_cfg = write_site_config(arm_dir / "site_config.yaml", backbone, split_dir, cfg.runtime["cpu_threads"],
                                 cfg.runtime["device"])
    prefix = f"  [{exp.id}/{arm.id}]"
    start = time.perf_counter()

    def on_round(n, rows):
        parts = []
        for r in sorted(rows, key=lambda r: r["site"]):
            part = f"{r['site']} F1 {_fmt(r.get('f1'))}"
            if r.get("epsilon") is not None:
                part += f" eps {r['epsilon']:.2f}"
            parts.append(part)
        echo(f"{prefix} round {n}/{t.rounds}: local models on site val: {', '.join(parts)} "
             f"({time.perf_counter() - start:.0f}s)")

    echo(f"{prefix} nvflare simulator: {cfg.sites} sites x {t.rounds} rounds x {t.steps_per_round} steps, "
         f"strategy {s.federation.strategy} (log {arm_dir / 'simulator.log'})")
    result = run_simulator(job, arm_dir / "workspace", n_clients=cfg.sites, site_config=site_cfg,
                           log_path=arm_dir / "simulator.log", timeout=cfg.runtime["simulator_timeout"],
                           on_round=on_round)
    out = results.output_dir(result)
    write_table(arm_dir / layout.METRICS, [{"arm": arm.id, **r} for r in read_table(out / results.METRICS)])
    sim_seconds = time.perf_counter() - start
    held = []
    rounds = results.round_dirs(out)
    for rd in rounds:
        n = results.round_number(rd)
        last = rd == rounds[-1] and heldout.get("test")
        m = evaluator.evaluate(rd, heldout["val"], t.max_len, heldout["test"] if last else None, curve=True)
        held.append(metric_row(arm.id, n, "val", m))
        if last:
            held.append(_final_test(arm.id, n, m, arm_dir))
    write_table(arm_dir / layout.HELDOUT_TABLE, held)
    final = [r for r in held if r["split"] == "val"][-1] if held else {}
    echo(f"{prefix} done in {time.perf_counter() - start:.0f}s: global model on held-out val after "
         f"{final.get('round')} rounds: F1 {_fmt(final.get('f1'))}, precision {_fmt(final.get('precision'))}, "
         f"recall {_fmt(final.get('recall'))}")
    return {"result_dir": str(result), "simulator_seconds": sim_seconds}


def _central_epsilon(t: TrainConfig, n: int):
    if not t.dp_noise_multiplier:
        return None
    from fedesm.training.privacy.accountant import compute_epsilon

    q = t.batch_size / n
    return lambda r: compute_epsilon(t.dp_noise_multiplier, q, r * t.steps_per_round, t.dp_delta)


def run_central(cfg: ExperimentConfig, exp: ExperimentSpec, arm: ArmSpec, arm_dir: Path, split_dir: Path,
                backbone: str, heldout: dict, evaluator, echo: Callable[[str], None]) -> dict:
    from fedesm.training.centralized import run_centralized

    s = arm_settings(cfg, exp, arm, backbone=backbone)
    t = s.training
    pooled = pooled_site_training(split_dir)
    prefix = f"  [{exp.id}/{arm.id}]"
    echo(f"{prefix} centralized: {len(pooled)} pooled training sequences, {t.rounds} rounds x "
         f"{t.steps_per_round} steps, evaluated on the held-out val split")
    start = time.perf_counter()
    with forward_log("fedesm.training.centralized", echo, f"{prefix} "):
        rows = run_centralized(pooled, heldout["val"], backbone, arm_dir, t, s.lora, arm=arm.id, progress=False,
                               tensorboard=False, attention=s.model.attention)
    eps = _central_epsilon(t, len(pooled))
    held = []
    for r in rows[:-1] if heldout.get("test") else rows:
        row = metric_row(arm.id, r["round"], "val", r)
        if eps is not None:
            row["epsilon"] = eps(r["round"])
        held.append(row)
    if heldout.get("test"):  # the last model once more, for the tuned threshold and the test split
        m = evaluator.evaluate(arm_dir / results.LAST, heldout["val"], t.max_len, heldout["test"], curve=True)
        held.append(metric_row(arm.id, t.rounds, "val", m))
        if eps is not None:
            held[-1]["epsilon"] = eps(t.rounds)
        held.append(_final_test(arm.id, t.rounds, m, arm_dir))
    write_table(arm_dir / layout.HELDOUT_TABLE, held)
    final = held[-2] if heldout.get("test") else held[-1]
    echo(f"{prefix} done in {time.perf_counter() - start:.0f}s: held-out val F1 {_fmt(final.get('f1'))}, "
         f"precision {_fmt(final.get('precision'))}, recall {_fmt(final.get('recall'))}")
    return {"n_train": len(pooled)}


RUNNERS = {"federated": run_federated, "centralized": run_central}


def run_reference(exp: ExperimentSpec, exp_dir: Path, split_dir: Path, heldout: dict, seed: int, echo) -> dict:
    """The sequence-only reference on the experiment's pooled site training data: exp_dir/reference.json."""
    from fedesm.evaluation.reference import reference_scores

    pooled = pooled_site_training(split_dir)
    scores = reference_scores(pooled, heldout["val"], heldout["test"], seed=seed)
    write_json(exp_dir / layout.REFERENCE, scores)
    echo(f"  [{exp.id}/reference] {scores['model']}, {len(pooled)} pooled training chains: test AUROC "
         f"{scores['test_auroc']:.3f}, AUPRC {scores['test_auprc']:.3f}, F1 {scores['test_f1_tuned']:.3f} at the "
         f"held-out val's threshold {scores['threshold_tuned']:.3f}")
    return scores
