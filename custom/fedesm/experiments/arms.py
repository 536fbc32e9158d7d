"""Running one arm of an experiment for one seed, and scoring it on the held-out data every arm shares.

Every arm of a seed starts from the same initial adapters and head (`Seed.initial`, what the
federated job's persistor builds as round 0):

* a federated arm exports the experiment's job with the arm's settings and runs it in `nvflare
  simulator`; each site reads its own split through a site config (`{site}` expands to its name);
  each round's global model is then scored on the held-out val split (and the last on test);
* a centralized arm trains the same model with the same settings on the pooled training data of the
  sites (`fedesm.centralized.run_centralized`), R rounds of N steps, scored the same way;
* a site-alone arm trains each site's model on that site's training data only, as the site would
  without federating, R rounds of N steps, each scored the same way (rows carry `model` = the site);
* the reference (logistic regression) is trained on the same pooled data and scored the same way.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from fedesm import results
from fedesm.experiments import layout
from fedesm.experiments.config import ArmSpec, ExperimentConfig, ExperimentSpec, arm_settings
from fedesm.experiments.prepare import pooled_site_training
from fedesm.fileio import atomic_write_text
from fedesm.settings import JobSettings, TrainConfig
from fedesm.tables import read_table, write_table

@dataclass
class Seed:
    """What every arm of one seed shares: the split, the backbone, the initial adapters, the held-out data."""

    seed: int
    split_dirs: dict  # split mode -> folder
    backbone: str
    initial: Path  # adapters + head every arm starts from
    heldout: dict  # {'val': records, 'test': records}
    evaluator: object  # fedesm.evaluation.scoring.AdapterEvaluator on this seed's backbone


METRIC_KEYS = ("accuracy", "precision", "recall", "f1", "mcc", "auroc", "auprc")
TUNED_KEYS = ("precision_tuned", "recall_tuned", "f1_tuned", "mcc_tuned")


def metric_row(arm_id: str, round_num: int, split: str, metrics: dict, model: Optional[str] = None) -> dict:
    """A held-out row: split "val" from plain metrics, split "test" from the `test_*` ones (at 0.5 and at
    the threshold tuned on the held-out val); `model` names which model of a site-alone arm it scores."""
    row = {"arm": arm_id, "site": layout.HELDOUT, "round": round_num, "split": split}
    if model:
        row["model"] = model
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


def _final_test(arm_id: str, round_num: int, metrics: dict, arm_dir: Path, model: Optional[str] = None) -> dict:
    """The test row of an arm's final model; its precision-recall curve goes to test_pr_curve.json."""
    if metrics.get("pr_curve"):
        write_json(arm_dir / (f"{model}_{layout.PR_CURVE}" if model else layout.PR_CURVE), metrics["pr_curve"])
    return metric_row(arm_id, round_num, "test", metrics, model)


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


def run_federated(cfg: ExperimentConfig, exp: ExperimentSpec, arm: ArmSpec, arm_dir: Path, shared: Seed,
                  echo: Callable[[str], None]) -> dict:
    from fedesm.errors import FedesmError
    from fedesm.launch.jobs import export_job
    from fedesm.launch.simulate import run_simulator
    from fedesm.model.cards import read_adapter_state
    from fedesm.site_config import write_site_config

    s = arm_settings(cfg, exp, arm, shared.seed, backbone=shared.backbone)
    t, heldout, evaluator = s.training, shared.heldout, shared.evaluator
    job = export_job(exp.job, arm_dir, job_name="job", settings=s)
    site_cfg = write_site_config(arm_dir / "site_config.yaml", shared.backbone, shared.split_dirs[exp.split],
                                 cfg.runtime["cpu_threads"], cfg.runtime["device"], per_site=arm.site_config)
    prefix = f"  [{exp.id}/{arm.id} seed {shared.seed}]"
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
    start_state, initial = read_adapter_state(results.round_dir(out, 0)), read_adapter_state(shared.initial)
    if set(start_state) != set(initial) or any(not start_state[k].equal(initial[k]) for k in initial):
        raise FedesmError(f"{exp.id}/{arm.id}: the job's round-0 adapters differ from the shared initial ones")
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
    return {"result_dir": str(result), "simulator_seconds": sim_seconds, "shared_start": True}


def _central_epsilon(t: TrainConfig, n: int):
    if not t.dp_noise_multiplier:
        return None
    from fedesm.training.privacy.accountant import compute_epsilon

    q = t.batch_size / n
    return lambda r: compute_epsilon(t.dp_noise_multiplier, q, r * t.steps_per_round, t.dp_delta)


def _train_and_score(s: JobSettings, arm: ArmSpec, arm_dir: Path, shared: Seed, train: list, echo, prefix: str,
                     model: Optional[str] = None) -> list[dict]:
    """One centralized-style run of the arm's settings `s` on `train` from the shared start; its held-out rows
    (val per round, and the final model on test with the threshold tuned on the held-out val)."""
    from fedesm.model.cards import read_adapter_state
    from fedesm.centralized import run_centralized

    heldout, evaluator, t = shared.heldout, shared.evaluator, s.training
    with forward_log("fedesm.centralized", echo, f"{prefix} "):
        rows = run_centralized(s, train, heldout["val"], arm_dir, arm=arm.id, progress=False, tensorboard=False,
                               initial_state=read_adapter_state(shared.initial))
    eps = _central_epsilon(t, len(train))
    held = []
    for r in rows[:-1] if heldout.get("test") else rows:
        row = metric_row(arm.id, r["round"], "val", r, model)
        if eps is not None:
            row["epsilon"] = eps(r["round"])
        held.append(row)
    if heldout.get("test"):  # the last model once more, for the tuned threshold and the test split
        m = evaluator.evaluate(arm_dir / results.LAST, heldout["val"], t.max_len, heldout["test"], curve=True)
        held.append(metric_row(arm.id, t.rounds, "val", m, model))
        if eps is not None:
            held[-1]["epsilon"] = eps(t.rounds)
        held.append(_final_test(arm.id, t.rounds, m, arm_dir.parent if model else arm_dir, model))
    return held


def run_central(cfg: ExperimentConfig, exp: ExperimentSpec, arm: ArmSpec, arm_dir: Path, shared: Seed,
                echo: Callable[[str], None]) -> dict:
    s = arm_settings(cfg, exp, arm, shared.seed, backbone=shared.backbone)
    t = s.training
    pooled = pooled_site_training(shared.split_dirs[exp.split])
    prefix = f"  [{exp.id}/{arm.id} seed {shared.seed}]"
    echo(f"{prefix} centralized: {len(pooled)} pooled training sequences, {t.rounds} rounds x "
         f"{t.steps_per_round} steps, evaluated on the held-out val split")
    start = time.perf_counter()
    held = _train_and_score(s, arm, arm_dir, shared, pooled, echo, prefix)
    write_table(arm_dir / layout.HELDOUT_TABLE, held)
    final = held[-2] if shared.heldout.get("test") else held[-1]
    echo(f"{prefix} done in {time.perf_counter() - start:.0f}s: held-out val AUPRC {_fmt(final.get('auprc'))}, "
         f"F1 {_fmt(final.get('f1'))}")
    return {"n_train": len(pooled), "shared_start": True}


def run_site_alone(cfg: ExperimentConfig, exp: ExperimentSpec, arm: ArmSpec, arm_dir: Path, shared: Seed,
                   echo: Callable[[str], None]) -> dict:
    """Each site trains on its own training split only (what a site gets without federating)."""
    from fedesm.data.validate import load_dataset

    s = arm_settings(cfg, exp, arm, shared.seed, backbone=shared.backbone)
    t = s.training
    split_dir = shared.split_dirs[exp.split]
    held, sizes = [], {}
    for site_dir in sorted(p for p in split_dir.iterdir() if p.is_dir() and (p / "train.fa").is_file()):
        site = site_dir.name
        train = load_dataset(site_dir / "train.fa")
        sizes[site] = len(train)
        prefix = f"  [{exp.id}/{arm.id} seed {shared.seed} {site}]"
        echo(f"{prefix} {site} alone: {len(train)} training sequences, {t.rounds} rounds x {t.steps_per_round} steps")
        held += _train_and_score(s, arm, arm_dir / site, shared, train, echo, prefix, model=site)
    write_table(arm_dir / layout.HELDOUT_TABLE, held)
    return {"n_train": sizes, "shared_start": True}


RUNNERS = {"federated": run_federated, "centralized": run_central, "site-alone": run_site_alone}


def run_reference(exp: ExperimentSpec, path: Path, shared: Seed, echo) -> dict:
    """The sequence-only reference on the experiment's pooled site training data (one seed's split)."""
    from fedesm.evaluation.reference import reference_scores

    pooled = pooled_site_training(shared.split_dirs[exp.split])
    scores = reference_scores(pooled, shared.heldout["val"], shared.heldout["test"], seed=shared.seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, scores)
    echo(f"  [{exp.id}/reference seed {shared.seed}] {scores['model']}, {len(pooled)} pooled training chains: test AUROC "
         f"{scores['test_auroc']:.3f}, AUPRC {scores['test_auprc']:.3f}, F1 {scores['test_f1_tuned']:.3f} at the "
         f"held-out val's threshold {scores['threshold_tuned']:.3f}")
    return scores
