"""The files of an experiment run folder (`fedesm experiment run CONFIG --out DIR`): written by
`run` and `arms`, read by `report`. Names are defined here only. Everything random (the split, the
random-init backbone, the initial adapters, training) follows the seed, so each seed has its own::

    DIR/run.json                                 name, title, caption, plan, status, machine, wall time
    DIR/config.yaml                              the resolved config
    DIR/seed_<s>/data/<split mode>/              val.fa, test.fa, site-N/{train,val}.fa, split.json
    DIR/seed_<s>/backbone/<arch>.pt              the random-init checkpoint (model.backbone: random)
    DIR/seed_<s>/initial/                        the initial adapters + head every arm starts from
    DIR/<experiment>/experiment.json             id, title, split, job, arms
    DIR/<experiment>/seed_<s>/reference.json     the sequence-only reference on the pooled site training data
    DIR/<experiment>/<arm>/seed_<s>/arm.json            settings, status, wall time
    DIR/<experiment>/<arm>/seed_<s>/metrics.jsonl|csv   per (round, site): the job's table, or the centralized run's
    DIR/<experiment>/<arm>/seed_<s>/heldout.jsonl|csv   per round: the arm's model(s) on the held-out val (and test)
    DIR/<experiment>/<arm>/seed_<s>/test_pr_curve.json  the final model's precision-recall curve on the test split
"""

from __future__ import annotations

from pathlib import Path

RUN = "run.json"
CONFIG = "config.yaml"
DATA = "data"
BACKBONE = "backbone"
INITIAL = "initial"
SPLIT = "split.json"
EXPERIMENT = "experiment.json"
REFERENCE = "reference.json"
ARM = "arm.json"
METRICS = "metrics.jsonl"
HELDOUT_TABLE = "heldout.jsonl"
PR_CURVE = "test_pr_curve.json"
SUMMARY = "summary.json"
REPORT = "report.md"
FINDINGS = "findings.md"  # optional, written by whoever ran it: what the numbers mean; the report includes it
PLOTS = "plots"

HELDOUT = "held-out"  # the `site` of rows that score a model on the global held-out split
CENTRAL = "centralized"  # the `site` of a centralized arm's rows in plots


def seed_name(seed: int) -> str:
    return f"seed_{int(seed)}"


def seed_of(path) -> int:
    return int(Path(path).name.split("_", 1)[1])


def seed_dir(out: Path, seed: int) -> Path:
    return Path(out) / seed_name(seed)


def split_dir(out: Path, seed: int, mode: str) -> Path:
    return seed_dir(out, seed) / DATA / mode


def arm_dir(out: Path, experiment: str, arm: str, seed: int) -> Path:
    return Path(out) / experiment / arm / seed_name(seed)


def reference_path(out: Path, experiment: str, seed: int) -> Path:
    return Path(out) / experiment / seed_name(seed) / REFERENCE


def seed_dirs(parent) -> list[Path]:
    """The seed_<s> folders under `parent`, by seed."""
    return sorted((p for p in Path(parent).glob("seed_*") if p.is_dir()), key=seed_of)
