"""The numbers of an experiment run folder, read back from its files (`fedesm.experiments.layout`).

One arm ran once per seed: `RunResult` is one arm and seed (its tables), `ArmResult` one arm over its
seeds (a site-alone arm becomes one ArmResult per site). Statistics over seeds are the mean and the
spread (sample standard deviation); comparisons between arms are paired by seed, and a difference
within the spread is called level (`verdict`). `report` turns these into markdown and plots.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import yaml

from fedesm.errors import FedesmError
from fedesm.experiments import layout
from fedesm.experiments.layout import CENTRAL, HELDOUT
from fedesm.tables import SERVER_ROW, read_table

TUNED = ("f1_tuned", "mcc_tuned", "precision_tuned", "recall_tuned")
TEST_KEYS = ("round", "auroc", "auprc", "f1", "mcc", "precision", "recall", "accuracy", *TUNED, "threshold_tuned")


# ---------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------


def finite(values) -> list[float]:
    return [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]


def mean(values) -> Optional[float]:
    values = finite(values)
    return sum(values) / len(values) if values else None


def spread(values) -> Optional[float]:
    """Sample standard deviation over seeds (0 for a single value, None for none)."""
    values = finite(values)
    if not values:
        return None
    return statistics.stdev(values) if len(values) > 1 else 0.0


def verdict(diffs: list[float], spread_a: Optional[float], spread_b: Optional[float]) -> str:
    """'ahead' / 'level' / 'behind' for paired differences a - b over seeds: level unless the mean
    difference is larger than the spread of either arm over seeds."""
    d = mean(diffs)
    if d is None:
        return "–"
    limit = max(v for v in (spread_a, spread_b, 0.0) if v is not None)
    if abs(d) <= limit:
        return "level"
    return "ahead" if d > 0 else "behind"


# ---------------------------------------------------------------------------------------------
# One arm, one seed
# ---------------------------------------------------------------------------------------------


@dataclass
class RunResult:
    """One arm's files for one seed."""

    info: dict
    site_rows: list[dict]  # the job's table (federated) or the centralized run's rows
    heldout_rows: list[dict]  # split val per round (+ test for the final model)
    pr_curve: Optional[dict] = None  # the final model's precision-recall curve on the test split

    @property
    def id(self) -> str:
        return self.info["id"]

    @property
    def federated(self) -> bool:
        return self.info.get("kind", "federated") == "federated"

    @property
    def done(self) -> bool:
        return self.info.get("status") == "done"

    def heldout_series(self, split: str = "val") -> list[dict]:
        return sorted((r for r in self.heldout_rows if r.get("split", "val") == split), key=lambda r: r["round"])

    def sites(self) -> list[str]:
        return sorted({r["site"] for r in self.site_rows if r.get("site") not in (SERVER_ROW, CENTRAL, HELDOUT)}
                      - ({self.id} if not self.federated else set()))

    def site_series(self, site: str) -> list[dict]:
        return sorted((r for r in self.site_rows if r.get("site") == site), key=lambda r: r["round"])


def final_row(rows: list[dict], key: str = "f1") -> Optional[dict]:
    """The row of the last round that has `key`."""
    rows = [r for r in rows if r.get(key) is not None]
    return max(rows, key=lambda r: r["round"]) if rows else None


def best_row(rows: list[dict], key: str = "f1") -> Optional[dict]:
    """The row with the highest `key`; the earliest round on ties."""
    rows = [r for r in rows if r.get(key) is not None]
    return max(rows, key=lambda r: (r[key], -r["round"])) if rows else None


def rounds_to_target(rows: list[dict], target: float, key: str = "f1") -> Optional[int]:
    """The first round whose `key` is >= target (None: never reached)."""
    hits = [r["round"] for r in rows if r.get(key) is not None and r[key] >= target]
    return min(hits) if hits else None


def sent_per_round(run: RunResult, site: Optional[str] = None, key: str = "sent_bytes") -> Optional[float]:
    """Mean over rounds of what one site (or each site, on average) sent the server per round."""
    sites = [site] if site else run.sites()
    return mean(r.get(key) for s in sites for r in run.site_series(s))


def final_epsilon(run: RunResult, site: Optional[str] = None) -> Optional[float]:
    """A site's epsilon after the last round (the largest over sites when `site` is None)."""
    if not run.federated:
        row = final_row(run.heldout_series(), "epsilon")
        return row["epsilon"] if row else None
    values = []
    for s in [site] if site else run.sites():
        row = final_row(run.site_series(s), "epsilon")
        if row:
            values.append(row["epsilon"])
    return max(values) if values else None


def accounted_delta(run: RunResult) -> Optional[float]:
    """The delta the sites accounted their epsilon at (the stricter of the job's and each site's policy)."""
    rows = [final_row(run.site_series(s), "dp_delta") for s in run.sites()] if run.federated else []
    values = [r["dp_delta"] for r in rows if r]
    return min(values) if values else None


def slowest_site_train_seconds(rows: list[dict]) -> Optional[float]:
    """Mean over rounds of the slowest site's local training seconds (sites train at the same time),
    from a federated run's metrics table."""
    by_round: dict[int, list] = {}
    for r in rows:
        if r.get("site") not in (SERVER_ROW, CENTRAL, HELDOUT) and r.get("train_seconds") is not None:
            by_round.setdefault(r["round"], []).append(r["train_seconds"])
    return mean(max(v) for v in by_round.values())


def mean_round_seconds(rows: list[dict]) -> Optional[float]:
    """Mean server-side round wall time, from a federated run's metrics table."""
    return mean(r.get("round_seconds") for r in rows if r.get("site") == SERVER_ROW)


def run_summary(run: RunResult, target: float) -> dict:
    """The numbers of one arm for one seed (what summary.json holds per seed)."""
    val = run.heldout_series("val")
    fin, best = final_row(val, "auprc") or final_row(val), best_row(val)
    test = final_row(run.heldout_series("test"), "auroc")
    out = {
        "seed": run.info.get("seed"), "status": run.info.get("status"), "wall_seconds": run.info.get("wall_seconds"),
        "heldout_val_final": {k: fin.get(k) for k in ("round", "f1", "precision", "recall", "accuracy", "auroc",
                                                       "auprc", "threshold_tuned")} if fin else None,
        "heldout_val_best_f1": {"round": best["round"], "f1": best["f1"]} if best else None,
        "heldout_rounds_to_target_f1": rounds_to_target(val, target),
        "test_final": {k: test.get(k) for k in TEST_KEYS} if test else None,
        "train_seconds_per_round": (slowest_site_train_seconds(run.site_rows) if run.federated
                                    else mean(r.get("train_seconds") for r in run.site_rows)),
        "round_seconds": mean_round_seconds(run.site_rows) if run.federated else None,
        "epsilon": final_epsilon(run),
    }
    if run.federated:
        out["sites"] = {}
        for s in run.sites():
            rows = run.site_series(s)
            g, lf = final_row(rows, "global_auprc") or final_row(rows, "global_f1"), final_row(rows, "auprc")
            out["sites"][s] = {
                "global_final": {k: g.get(f"global_{k}") for k in ("auprc", "auroc", "f1", "precision", "recall")}
                | {"round": g["round"]} if g else None,
                "local_final": {k: lf.get(k) for k in ("auprc", "auroc", "f1")} if lf else None,
                "sent_bytes_per_round": sent_per_round(run, s),
                "sent_parameters_per_round": sent_per_round(run, s, "sent_parameters"),
                "epsilon": final_epsilon(run, s),
            }
        out["sent_bytes_per_site_per_round"] = sent_per_round(run)
    return out


# ---------------------------------------------------------------------------------------------
# One arm over seeds
# ---------------------------------------------------------------------------------------------


@dataclass
class ArmResult:
    """One arm (or one site's model of a site-alone arm) over its seeds."""

    id: str
    label: str
    kind: str
    info: dict  # the first seed's arm.json
    runs: dict[int, RunResult] = field(default_factory=dict)

    @property
    def federated(self) -> bool:
        return self.kind == "federated"

    @property
    def seeds(self) -> list[int]:
        return sorted(s for s, r in self.runs.items() if r.done)

    @property
    def done(self) -> bool:
        return bool(self.seeds)

    @property
    def training(self) -> dict:
        return self.info.get("training", {})

    def first(self) -> Optional[RunResult]:
        return self.runs[self.seeds[0]] if self.seeds else None

    def per_seed(self, fn: Callable[[RunResult], Optional[float]]) -> dict[int, Optional[float]]:
        return {s: fn(self.runs[s]) for s in self.seeds}


def test_value(key: str) -> Callable[[RunResult], Optional[float]]:
    def get(run: RunResult):
        row = final_row(run.heldout_series("test"), "auroc")
        return row.get(key) if row else None

    return get


def val_value(key: str) -> Callable[[RunResult], Optional[float]]:
    def get(run: RunResult):
        row = final_row(run.heldout_series("val"), "auprc") or final_row(run.heldout_series("val"))
        return row.get(key) if row else None

    return get


def _read_run(run_dir: Path, model: Optional[str] = None) -> RunResult:
    info = json.loads((run_dir / layout.ARM).read_text())
    held = read_table(run_dir / layout.HELDOUT_TABLE)
    if model:
        held = [r for r in held if r.get("model") == model]
    curve = run_dir / (f"{model}_{layout.PR_CURVE}" if model else layout.PR_CURVE)
    site_rows = read_table(run_dir / model / layout.METRICS) if model else read_table(run_dir / layout.METRICS)
    return RunResult(info, site_rows, held, json.loads(curve.read_text()) if curve.is_file() else None)


def load_arms(arm_dir: Path) -> list[ArmResult]:
    """The arm's results over its seed folders; a site-alone arm becomes one ArmResult per site."""
    seed_dirs = [d for d in layout.seed_dirs(arm_dir) if (d / layout.ARM).is_file()]
    if not seed_dirs:
        return []
    info = json.loads((seed_dirs[0] / layout.ARM).read_text())
    kind = info.get("kind", "federated")
    if kind != "site-alone":
        arm = ArmResult(info["id"], info.get("label") or info["id"], kind, info)
        arm.runs = {layout.seed_of(d): _read_run(d) for d in seed_dirs}
        return [arm]
    models = sorted({r["model"] for d in seed_dirs for r in read_table(d / layout.HELDOUT_TABLE) if r.get("model")})
    if not models:  # not run yet (or failed before any site finished): one row that says so
        arm = ArmResult(info["id"], info.get("label") or info["id"], kind, info)
        arm.runs = {layout.seed_of(d): _read_run(d) for d in seed_dirs}
        return [arm]
    out = []
    for m in models:
        arm = ArmResult(f"{info['id']}:{m}", f"{m} alone", kind, info)
        arm.runs = {layout.seed_of(d): _read_run(d, m) for d in seed_dirs}
        out.append(arm)
    return out


@dataclass
class ExperimentResult:
    info: dict
    arms: list[ArmResult] = field(default_factory=list)
    references: dict[int, dict] = field(default_factory=dict)  # seed -> reference.json (logistic regression)

    def comparators(self, arm: ArmResult) -> list[ArmResult]:
        """The centralized arms `arm` is compared with: same loss and privacy settings, any step count."""
        keys = ("class_weights", "focal_gamma", "grad_noise_std", "dp_noise_multiplier")
        return [c for c in self.arms if c.kind == "centralized" and c.done and c is not arm
                and all(c.training.get(k) == arm.training.get(k) for k in keys)]


def load_run(run_dir: Path) -> tuple[dict, dict, list[ExperimentResult]]:
    run_dir = Path(run_dir)
    if not (run_dir / layout.RUN).is_file():
        raise FedesmError(f"{run_dir}: not an experiment run folder (no run.json)")
    run = json.loads((run_dir / layout.RUN).read_text())
    cfg = yaml.safe_load((run_dir / layout.CONFIG).read_text()) if (run_dir / layout.CONFIG).is_file() else {}
    order = [e["id"] for e in cfg.get("experiments", [])]
    exp_dirs = [run_dir / e for e in order if (run_dir / e / layout.EXPERIMENT).is_file()]
    exp_dirs += sorted(p.parent for p in run_dir.glob(f"*/{layout.EXPERIMENT}") if p.parent not in exp_dirs)
    experiments = []
    for d in exp_dirs:
        info = json.loads((d / layout.EXPERIMENT).read_text())
        exp = ExperimentResult(info)
        arm_order = info.get("arms") or []
        arm_dirs = [d / a for a in arm_order if (d / a).is_dir()]
        arm_dirs += sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith("seed_")
                           and p not in arm_dirs)
        exp.arms = [a for ad in arm_dirs for a in load_arms(ad)]
        for sd in layout.seed_dirs(d):
            if (sd / layout.REFERENCE).is_file():
                exp.references[layout.seed_of(sd)] = json.loads((sd / layout.REFERENCE).read_text())
        experiments.append(exp)
    return run, cfg, experiments


def arm_summary(arm: ArmResult, target: float) -> dict:
    """The numbers of one arm: per seed, and mean / spread over seeds (what summary.json holds)."""
    out = {"id": arm.id, "label": arm.label, "kind": arm.kind, "strategy": arm.info.get("strategy"),
           "seeds": arm.seeds, "per_seed": {s: run_summary(arm.runs[s], target) for s in arm.seeds}}
    for name, fn in (("test", test_value), ("heldout_val", val_value)):
        out[name] = {}
        for key in ("auroc", "auprc", "f1", "mcc") + (TUNED if name == "test" else ("f1",)):
            values = list(arm.per_seed(fn(key)).values())
            out[name][key] = {"mean": mean(values), "sd": spread(values)}
    out["wall_seconds"] = mean(r.info.get("wall_seconds") for r in arm.runs.values())
    out["epsilon"] = mean(final_epsilon(arm.runs[s]) for s in arm.seeds)
    if arm.training.get("dp_noise_multiplier"):
        accounted = [d for d in (accounted_delta(arm.runs[s]) for s in arm.seeds) if d is not None]
        out["dp_delta"] = min(accounted) if accounted else arm.training.get("dp_delta")
    else:
        out["dp_delta"] = None
    if arm.federated:
        out["sent_bytes_per_site_per_round"] = mean(sent_per_round(arm.runs[s]) for s in arm.seeds)
    return out


# ---------------------------------------------------------------------------------------------
# Comparisons
# ---------------------------------------------------------------------------------------------


def paired(arm: ArmResult, other: ArmResult, fn) -> list[float]:
    """arm - other per seed both ran."""
    a, b = arm.per_seed(fn), other.per_seed(fn)
    return [a[s] - b[s] for s in a if s in b and a[s] is not None and b[s] is not None]


def comparison(arm: ArmResult, other: ArmResult, key: str = "auroc") -> dict:
    fn = test_value(key)
    diffs = paired(arm, other, fn)
    return {"diffs": diffs, "verdict": verdict(diffs, spread(arm.per_seed(fn).values()),
                                               spread(other.per_seed(fn).values()))}
