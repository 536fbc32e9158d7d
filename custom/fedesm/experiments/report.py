"""`fedesm experiment report DIR`: report.md, plots and summary.json from a run folder.

Reads only files (`fedesm.experiments.layout`), so a report can be rebuilt at any
time, with another `--target-f1`, or into another folder (e.g. `docs/results/cpu`).

Two yardsticks, kept apart in every table:
  held-out val  the global val split: the same sequences for every arm, shared with no site. A
                federated arm's row is its global model after each round; a centralized arm's row
                its own model after each round.
  site val      each site's own val split, from the job's metrics table: the global model the site
                received (`global_*`) and the site's local model after its round of training.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from fedesm.errors import FedesmError
from fedesm.experiments import layout
from fedesm.experiments.layout import CENTRAL, HELDOUT
from fedesm.fileio import atomic_write_text
from fedesm.tables import SERVER_ROW, read_table

TUNED = ("f1_tuned", "mcc_tuned", "precision_tuned", "recall_tuned")


@dataclass
class ArmResult:
    """One arm's files, and the numbers the report shows."""

    info: dict
    site_rows: list[dict]  # the job's table (federated) or the centralized run's rows
    heldout_rows: list[dict]  # split val per round (+ test for the final model)
    pr_curve: Optional[dict] = None  # the final model's precision-recall curve on the test split

    @property
    def id(self) -> str:
        return self.info["id"]

    @property
    def label(self) -> str:
        return self.info.get("label") or self.id

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


def load_arm(arm_dir: Path) -> ArmResult:
    info = json.loads((arm_dir / layout.ARM).read_text())
    arm = ArmResult(info, read_table(arm_dir / layout.METRICS), read_table(arm_dir / layout.HELDOUT_TABLE))
    curve = arm_dir / layout.PR_CURVE
    arm.pr_curve = json.loads(curve.read_text()) if curve.is_file() else None
    return arm


# ---------------------------------------------------------------------------------------------
# Numbers
# ---------------------------------------------------------------------------------------------


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


def mean(values) -> Optional[float]:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(values) / len(values) if values else None


def sent_per_round(arm: ArmResult, site: Optional[str] = None, key: str = "sent_bytes") -> Optional[float]:
    """Mean over rounds of what one site (or each site, on average) sent the server per round."""
    sites = [site] if site else arm.sites()
    return mean(r.get(key) for s in sites for r in arm.site_series(s))


def final_epsilon(arm: ArmResult, site: Optional[str] = None) -> Optional[float]:
    """A site's epsilon after the last round (the largest over sites when `site` is None)."""
    if not arm.federated:
        row = final_row(arm.heldout_series(), "epsilon")
        return row["epsilon"] if row else None
    values = []
    for s in [site] if site else arm.sites():
        row = final_row(arm.site_series(s), "epsilon")
        if row:
            values.append(row["epsilon"])
    return max(values) if values else None


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


def train_seconds_per_round(arm: ArmResult) -> Optional[float]:
    """Local training time per round: the slowest site's, or the centralized run's."""
    if not arm.federated:
        return mean(r.get("train_seconds") for r in arm.site_rows)
    return slowest_site_train_seconds(arm.site_rows)


def round_seconds(arm: ArmResult) -> Optional[float]:
    return mean_round_seconds(arm.site_rows)


def arm_summary(arm: ArmResult, target: float) -> dict:
    """The numbers of one arm (what summary.json holds)."""
    val = arm.heldout_series("val")
    fin, best = final_row(val), best_row(val)
    test = final_row(arm.heldout_series("test"))
    out = {
        "id": arm.id, "label": arm.label, "kind": arm.info.get("kind"), "strategy": arm.info.get("strategy"),
        "status": arm.info.get("status"), "wall_seconds": arm.info.get("wall_seconds"),
        "heldout_val_final": {k: fin.get(k) for k in ("round", "f1", "precision", "recall", "accuracy", "auroc",
                                                       "auprc", "threshold_tuned")} if fin else None,
        "heldout_val_best": {"round": best["round"], "f1": best["f1"]} if best else None,
        "heldout_rounds_to_target_f1": rounds_to_target(val, target),
        "test_final": {k: test.get(k) for k in ("round", "auroc", "auprc", "f1", "mcc", "precision", "recall",
                                                "accuracy", *TUNED, "threshold_tuned")} if test else None,
        "train_seconds_per_round": train_seconds_per_round(arm),
        "round_seconds": round_seconds(arm),
        "epsilon": final_epsilon(arm),
        "dp_delta": arm.info.get("training", {}).get("dp_delta") if arm.info.get("training", {}).get(
            "dp_noise_multiplier") else None,
    }
    if arm.federated:
        out["sites"] = {}
        for s in arm.sites():
            rows = arm.site_series(s)
            g, lf = final_row(rows, "global_f1"), final_row(rows, "f1")
            gb = best_row(rows, "global_f1")
            out["sites"][s] = {
                "global_final": {k: g.get(f"global_{k}") for k in ("f1", "precision", "recall", "accuracy", "auprc")}
                | {"round": g["round"]} if g else None,
                "global_best": {"round": gb["round"], "f1": gb["global_f1"]} if gb else None,
                "global_rounds_to_target_f1": rounds_to_target(rows, target, "global_f1"),
                "local_final_f1": lf.get("f1") if lf else None,
                "sent_bytes_per_round": sent_per_round(arm, s),
                "sent_parameters_per_round": sent_per_round(arm, s, "sent_parameters"),
                "epsilon": final_epsilon(arm, s),
            }
        out["sent_bytes_per_site_per_round"] = sent_per_round(arm)
    return out


# ---------------------------------------------------------------------------------------------
# Formatting
# ---------------------------------------------------------------------------------------------


def f3(v) -> str:
    return f"{v:.3f}" if isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v)) else "–"


def human_bytes(n) -> str:
    if n is None:
        return "–"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n}"


def seconds(v) -> str:
    if v is None:
        return "–"
    return f"{v:.0f} s" if v < 600 else f"{v / 60:.1f} min"


def md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _eps(arm_sum: dict) -> str:
    if arm_sum["epsilon"] is None:
        return "–"
    return f"{arm_sum['epsilon']:.2f} (δ={arm_sum['dp_delta']:g})"


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------


@dataclass
class ExperimentResult:
    info: dict
    arms: list[ArmResult] = field(default_factory=list)
    reference: Optional[dict] = None  # reference.json: the sequence-only reference on the same training data


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
        arm_dirs = [d / a for a in arm_order if (d / a / layout.ARM).is_file()]
        arm_dirs += sorted(p.parent for p in d.glob(f"*/{layout.ARM}") if p.parent not in arm_dirs)
        exp.arms = [load_arm(a) for a in arm_dirs]
        if (d / layout.REFERENCE).is_file():
            exp.reference = json.loads((d / layout.REFERENCE).read_text())
        experiments.append(exp)
    return run, cfg, experiments


def _central_rows(exp: ExperimentResult) -> Optional[list[dict]]:
    """The (first) centralized arm's held-out rows, as plots.py expects them (site 'centralized')."""
    for arm in exp.arms:
        if not arm.federated and arm.done:
            return [{**r, "site": CENTRAL} for r in arm.heldout_series("val")]
    return None


def make_plots(exp: ExperimentResult, plots_dir: Path) -> dict[str, list[Path]]:
    """Per experiment: held-out F1 and accuracy per arm; per federated arm: accuracy, F1, precision-recall."""
    from fedesm.experiments.plots import plot_arms, plot_run

    eid = exp.info["id"]
    out: dict[str, list[Path]] = {}
    done = [a for a in exp.arms if a.done]
    if not done:
        return out
    compare = []
    for metric in ("auprc", "auroc", "f1"):
        series = {(a.label if a.federated else f"{CENTRAL}" + ("" if a.label == CENTRAL else f" ({a.label})")):
                  [(r["round"], r[metric]) for r in a.heldout_series() if r.get(metric) is not None] for a in done}
        compare.append(plot_arms(series, metric, plots_dir / f"{eid}_arms_{metric}.png",
                                 f"{eid}: {metric.upper()} on the held-out val split"
                                 + (" (threshold 0.5)" if metric == "f1" else "")))
    curves = {a.label: a.pr_curve for a in done if a.pr_curve}
    if curves:
        from fedesm.experiments.plots import plot_pr_curves

        if exp.reference:
            curves["reference (LR, ±7 window)"] = exp.reference.get("pr_curve")
        compare.append(plot_pr_curves(curves, plots_dir / f"{eid}_test_pr_curves.png",
                                      f"{eid}: final models, precision-recall on test",
                                      prevalence=(exp.reference or {}).get("test_positive_fraction")))
    out["_compare"] = compare
    central = _central_rows(exp)
    for arm in done:
        if arm.federated:
            heldout = [{**r, "site": HELDOUT} for r in arm.heldout_series()]
            out[arm.id] = plot_run(arm.site_rows, plots_dir, f"{eid}_{arm.id}", central_rows=central,
                                   heldout_rows=heldout)
    return out


def _rel(path: Path, base: Path) -> str:
    return os.path.relpath(path, base).replace(os.sep, "/")


def _setup_section(run: dict, cfg: dict, run_dir: Path) -> list[str]:
    lines = ["## Setup", ""]
    if run.get("description"):
        lines += [run["description"], ""]
    lines += ["```"] + run.get("plan", []) + ["```", ""]
    splits = []
    for mode_dir in sorted((run_dir / layout.DATA).glob(f"*/{layout.SPLIT}")):
        s = json.loads(mode_dir.read_text())
        parts = [f"held-out val {s['val']['sequences']} seqs ({s['val']['positive_fraction']:.1%} positive), "
                 f"test {s['test']['sequences']} seqs"]
        for name, v in s["sites"].items():
            parts.append(f"{name} {v['train']['sequences']} train ({v['train']['positive_fraction']:.1%} positive) "
                         f"/ {v['val']['sequences']} val")
        if s.get("skew"):
            parts.append(f"skew: {s['skew']['rule']} (median positive fraction per chain "
                         f"{s['skew']['median_positive_fraction']:.1%})")
        splits.append([s["mode"], "; ".join(parts)])
    if splits:
        lines += [md_table(["split", "sequences per part (token positive rate)"], splits), ""]
    m = run.get("machine") or {}
    where = (f"{m.get('machine', '?')} with {m.get('cpus', '?')} CPU cores" + (f" and a {m['gpu']}" if m.get("gpu")
             else "") + f" (torch {m.get('torch', '?')})") if m else "an unrecorded machine"
    lines += [f"Run {run.get('started', '?')} – {run.get('finished', '?')}, wall time {seconds(run.get('wall_seconds'))} "
              f"on {where}; reproduce with `fedesm experiment run {cfg.get('name', run.get('name'))} --out DIR`.", ""]
    return lines


def build_report(run_dir, target_f1: float = 0.5, out_dir=None) -> Path:
    """Write `report.md` (+ `plots/`, `summary.json`) for a run folder; returns the report's path."""
    run_dir = Path(run_dir)
    run, cfg, experiments = load_run(run_dir)
    out = Path(out_dir) if out_dir else run_dir
    out.mkdir(parents=True, exist_ok=True)
    plots_dir = out / layout.PLOTS
    title = run.get("title") or run.get("name") or "fedesm experiments"
    lines = [f"# {title}", ""]
    if run.get("caption"):
        lines += [f"> **{run['caption'].strip()}**", ""]
    lines += [f"Config `{cfg.get('name', run.get('name'))}`; status **{run.get('status', '?')}**"
              + (f" ({'; '.join(run['failures'])})" if run.get("failures") else "") + ".", ""]
    summary = {"name": run.get("name"), "target_f1": target_f1, "wall_seconds": run.get("wall_seconds"),
               "experiments": {}}
    key_lines = []
    body = []
    for exp in experiments:
        eid = exp.info["id"]
        sums = {a.id: arm_summary(a, target_f1) for a in exp.arms}
        summary["experiments"][eid] = {"title": exp.info.get("title"), "arms": sums}
        plots = make_plots(exp, plots_dir)
        body += [f"## {exp.info.get('title', eid)}", ""]
        if exp.info.get("description"):
            body += [exp.info["description"].strip(), ""]
        body += _test_table(exp, sums)
        body += _heldout_table(exp, sums, target_f1)
        body += _site_table(exp, sums, target_f1)
        body += _round_table(exp)
        if plots.get("_compare"):
            body += ["Held-out val per round, all arms, and the final models' precision-recall curves on the test "
                     "split:", ""]
            body += [" ".join(f"![{p.stem}]({_rel(p, out)})" for p in plots["_compare"]), ""]
        for arm in exp.arms:
            if arm.id in plots:
                body += [f"**{arm.label}** (`{eid}/{arm.id}`): per site = the site's local model on its own val "
                         "split; black = global model, mean over the sites' val splits; purple = global model on "
                         "the held-out val split; red dashed = centralized on the held-out val split.", ""]
                body += [" ".join(f"![{p.stem}]({_rel(p, out)})" for p in plots[arm.id]), ""]
        key_lines += _key_results(exp, sums, target_f1)
    lines += ["## Key results", "", "All metrics are per residue. AUROC and AUPRC need no threshold; precision, "
              "recall, F1 and MCC are given at 0.5 and at the threshold that maximises F1 on the held-out val split "
              "(\"@thr\"), which no arm trains on. \"Held-out val\" = the global val split, the same sequences for "
              "every arm and shared with no site: the federated arms' global model vs the centralized model. "
              "\"Test\" = the final model of each arm on the test split.", ""] + key_lines + [""]
    lines += body
    lines += _notes(experiments)
    lines += _setup_section(run, cfg, run_dir)
    report = out / layout.REPORT
    atomic_write_text(report, "\n".join(lines).rstrip() + "\n")
    atomic_write_text(out / layout.SUMMARY, json.dumps(summary, indent=2) + "\n")
    return report


def _test_table(exp: ExperimentResult, sums: dict) -> list[str]:
    """The final model of every arm on the test split, and the sequence-only reference beside them."""
    cols = [("auroc", "AUROC"), ("auprc", "AUPRC"), ("f1_tuned", "F1@thr"), ("mcc_tuned", "MCC@thr"),
            ("precision_tuned", "precision@thr"), ("recall_tuned", "recall@thr"), ("threshold_tuned", "thr"),
            ("f1", "F1@0.5"), ("mcc", "MCC@0.5")]
    rows = []
    for arm in exp.arms:
        t = sums[arm.id].get("test_final") or {}
        if arm.done and t:
            rows.append([arm.label] + [f3(t.get(k)) for k, _ in cols])
    if not rows:
        return []
    if exp.reference:
        b = exp.reference
        rows.append(["*reference: logistic regression, one-hot ±7 window*"]
                    + [f3(b.get(k if k == "threshold_tuned" else f"test_{k}")) for k, _ in cols])
    prevalence = (exp.reference or {}).get("test_positive_fraction")
    note = f" Chance level: AUROC 0.5, AUPRC = the positive rate, {prevalence:.1%}." if prevalence else ""
    return ["**Test split** (final model of each arm; thr = the F1-maximising threshold on the held-out val "
            "split; the reference is trained on the same pooled site training data)." + note, "",
            md_table(["arm"] + [c for _, c in cols], rows), ""]


def _heldout_table(exp: ExperimentResult, sums: dict, target: float) -> list[str]:
    rows = []
    for arm in exp.arms:
        s = sums[arm.id]
        if not arm.done:
            rows.append([arm.label, f"**{arm.info.get('status')}**: {arm.info.get('error', '')[:120]}"]
                        + ["–"] * 11)
            continue
        fin, best, test = s["heldout_val_final"] or {}, s["heldout_val_best"] or {}, s["test_final"] or {}
        rt = s["heldout_rounds_to_target_f1"]
        rows.append([
            f"{arm.label}" + (f" ({arm.info['strategy']})" if arm.federated and arm.info.get("strategy") != arm.label
                              else ""),
            f"**{f3(fin.get('f1'))}**", f"{f3(best.get('f1'))} (r{best.get('round', '–')})",
            f3(fin.get("precision")), f3(fin.get("recall")), f3(fin.get("accuracy")), f3(fin.get("auroc")),
            f3(fin.get("auprc")),
            str(rt) if rt is not None else "not reached", f3(test.get("f1")),
            seconds(s["wall_seconds"]),
            human_bytes(s.get("sent_bytes_per_site_per_round")) if arm.federated else "–",
            _eps(s),
        ])
    header = ["arm", "final F1", "best F1 (round)", "precision", "recall", "accuracy", "AUROC", "AUPRC",
              f"rounds to F1 ≥ {target:g}", "test F1", "wall time", "sent / site / round", "ε spent (worst site)"]
    return ["**Held-out val** (the global val split, same sequences for every arm; federated = global model after "
            "each round, centralized = its model after each round; final = after the last round; F1, precision, "
            "recall at 0.5; test F1 = final model on the test split at 0.5):", "", md_table(header, rows), ""]


def _site_table(exp: ExperimentResult, sums: dict, target: float) -> list[str]:
    rows = []
    for arm in exp.arms:
        if not arm.federated or not arm.done:
            continue
        for site, s in sums[arm.id]["sites"].items():
            g, gb = s["global_final"] or {}, s["global_best"] or {}
            rt = s["global_rounds_to_target_f1"]
            rows.append([arm.label, site, f"**{f3(g.get('f1'))}**", f"{f3(gb.get('f1'))} (r{gb.get('round', '–')})",
                         f3(g.get("precision")), f3(g.get("recall")), f3(g.get("accuracy")), f3(g.get("auprc")),
                         str(rt) if rt is not None else "not reached", f3(s["local_final_f1"]),
                         human_bytes(s["sent_bytes_per_round"]),
                         f"{s['sent_parameters_per_round']:,.0f}" if s["sent_parameters_per_round"] else "–",
                         f"{s['epsilon']:.2f}" if s["epsilon"] is not None else "–"])
    if not rows:
        return []
    header = ["arm", "site", "global F1 final", "best (round)", "precision", "recall", "accuracy", "AUPRC",
              f"rounds to F1 ≥ {target:g}", "local model F1 final", "sent / round", "parameters sent", "ε spent"]
    return ["**Site val** (each site's own val split; global = the aggregated model, local = the site's model "
            "after its local steps in the last round; sent = serialized adapters + head per round, mean over "
            "rounds):", "", md_table(header, rows), ""]


def _round_table(exp: ExperimentResult) -> list[str]:
    arms = [a for a in exp.arms if a.done]
    if not arms:
        return []
    series = {a.id: {r["round"]: r.get("auprc") for r in a.heldout_series()} for a in arms}
    rounds = sorted({r for s in series.values() for r in s})
    rows = [[str(r)] + [f3(series[a.id].get(r)) for a in arms] for r in rounds]
    extra = []
    tsec = lambda v: f"{v:.1f} s" if v is not None else "–"  # noqa: E731 (a one-line formatter)
    secs = [[a.label, tsec(train_seconds_per_round(a)), seconds(round_seconds(a))
             if a.federated else "–", seconds(a.info.get("wall_seconds"))] for a in arms]
    extra = ["", "Time per arm (training seconds per round: the slowest site's local steps, or the centralized "
             "steps; round = server-side round wall time incl. evaluation and aggregation):", "",
             md_table(["arm", "training s / round", "round wall time", "arm wall time (incl. start-up)"], secs)]
    return ["AUPRC on the held-out val split per round (round 0 = before training):", "",
            md_table(["round"] + [a.label for a in arms], rows)] + extra + [""]


def _key_results(exp: ExperimentResult, sums: dict, target: float) -> list[str]:
    eid = exp.info["id"]
    lines = [f"- **{exp.info.get('title', eid)}**"]
    central = next((sums[a.id] for a in exp.arms if not a.federated and a.done), None)
    c_f1 = (central or {}).get("heldout_val_final", {}) or {}
    for arm in exp.arms:
        s = sums[arm.id]
        if not arm.done:
            lines.append(f"  - {arm.label}: {arm.info.get('status')}")
            continue
        fin = s["heldout_val_final"] or {}
        test = s.get("test_final") or {}
        if test:
            text = (f"  - {arm.label}: test AUROC **{f3(test.get('auroc'))}**, AUPRC **{f3(test.get('auprc'))}**, "
                    f"F1@thr {f3(test.get('f1_tuned'))}, MCC@thr {f3(test.get('mcc_tuned'))}")
            c_test = (central or {}).get("test_final") or {}
            if arm.federated and c_test.get("auprc") is not None and test.get("auprc") is not None:
                text += f" (AUPRC {test['auprc'] - c_test['auprc']:+.3f} vs centralized)"
            text += f"; held-out val AUPRC {f3(fin.get('auprc'))} after {fin.get('round')} rounds"
        else:
            text = f"  - {arm.label}: held-out val F1 **{f3(fin.get('f1'))}** after {fin.get('round')} rounds"
            if arm.federated and c_f1.get("f1") is not None and fin.get("f1") is not None:
                text += f" ({fin['f1'] - c_f1['f1']:+.3f} vs centralized)"
        if arm.federated:
            g = [v["global_final"]["f1"] for v in s["sites"].values() if v.get("global_final")]
            if g:
                text += f"; global model on the sites' val splits {', '.join(f3(x) for x in g)}"
        text += f"; wall time {seconds(s['wall_seconds'])}"
        if s["epsilon"] is not None:
            per_site = ", ".join(f"{k} {v['epsilon']:.2f}" for k, v in s.get("sites", {}).items()
                                 if v.get("epsilon") is not None)
            text += f"; ε = {per_site or f3(s['epsilon'])} at δ={s['dp_delta']:g}"
        lines.append(text)
    if exp.reference:
        b = exp.reference
        lines.append(f"  - reference, {b.get('model', 'logistic regression')}: test AUROC {f3(b.get('test_auroc'))}, AUPRC "
                     f"{f3(b.get('test_auprc'))}, F1@thr {f3(b.get('test_f1_tuned'))}, MCC@thr "
                     f"{f3(b.get('test_mcc_tuned'))}")
    return lines


def _notes(experiments: list[ExperimentResult]) -> list[str]:
    noise = any(a.info.get("training", {}).get("grad_noise_std") for e in experiments for a in e.arms)
    dp = [a for e in experiments for a in e.arms if a.info.get("training", {}).get("dp_noise_multiplier")]
    lines = ["## Notes", "",
             "- Same steps per round: each site runs N local steps per round (the sites at the same time), the "
             "centralized arm N steps per round on the pooled site training data, with the same model, LoRA rank, "
             "learning-rate schedule, batch size and seed.",
             "- Wall times include each run's start-up (the NVFLARE simulator takes tens of seconds) and the "
             "per-round evaluations; the machine may have been shared, so they are indicative."]
    if noise:
        lines.append("- Gradient noise (the paper's DP mode, `grad_noise_std`) adds N(0, std²) to the batch "
                     "gradient; without per-sample clipping it has no (ε, δ) guarantee, so no ε is shown for it.")
    if dp:
        t = dp[0].info["training"]
        lines.append(f"- DP-SGD (`fedesm.training.privacy.dpsgd`): Poisson sampling with q = batch size / site training sequences, "
                     f"per-sample clipping of the LoRA + head gradient to C = {t['dp_max_grad_norm']:g}, Gaussian "
                     f"noise σ·C with σ = {t['dp_noise_multiplier']:g}; ε per site from an RDP accountant (checked "
                     f"against Opacus') at δ = {t['dp_delta']:g}, counting every local step so far. Each site's "
                     "guarantee covers its own sequences; the backbone is public and frozen.")
    return lines + [""]
