"""The files of an experiment run folder (`fedesm experiment run CONFIG --out DIR`): written by
`run` and `arms`, read by `report`. Names are defined here only::

    DIR/run.json                        name, title, caption, plan, status, machine, wall time
    DIR/config.yaml                     the resolved config
    DIR/data/<split mode>/              val.fa, test.fa, site-N/{train,val}.fa, split.json
    DIR/backbone/<arch>.pt              the random-init checkpoint (model.backbone: random)
    DIR/<experiment>/experiment.json    id, title, split, job, arms
    DIR/<experiment>/reference.json     the sequence-only reference on the pooled site training data
    DIR/<experiment>/<arm>/arm.json             settings, status, wall time
    DIR/<experiment>/<arm>/metrics.jsonl|csv    per (round, site): the job's table, or the centralized run's
    DIR/<experiment>/<arm>/heldout.jsonl|csv    per round: the arm's model on the held-out val (and test) split
    DIR/<experiment>/<arm>/test_pr_curve.json   the final model's precision-recall curve on the test split
"""

from __future__ import annotations

from pathlib import Path

RUN = "run.json"
CONFIG = "config.yaml"
DATA = "data"
BACKBONE = "backbone"
SPLIT = "split.json"
EXPERIMENT = "experiment.json"
REFERENCE = "reference.json"
ARM = "arm.json"
METRICS = "metrics.jsonl"
HELDOUT_TABLE = "heldout.jsonl"
PR_CURVE = "test_pr_curve.json"
SUMMARY = "summary.json"
REPORT = "report.md"
PLOTS = "plots"

HELDOUT = "held-out"  # the `site` of rows that score a model on the global held-out split
CENTRAL = "centralized"  # the `site` of a centralized arm's rows in plots


def split_dir(out: Path, mode: str) -> Path:
    return Path(out) / DATA / mode


def arm_dir(out: Path, experiment: str, arm: str) -> Path:
    return Path(out) / experiment / arm
