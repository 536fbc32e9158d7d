"""`fedesm experiment report DIR`: report.md, plots and summary.json from a run folder.

Reads only files (the numbers come from `fedesm.experiments.numbers`), so a report can be rebuilt at
any time, with another `--target-f1`, or into another folder (e.g. `docs/results/cpu`). Every arm ran
once per seed; every number is given as the mean and the spread (standard deviation) over seeds, and
comparisons between arms are paired by seed (the same split, backbone and initial adapters). A
difference smaller than the spread is called level.

Two yardsticks, kept apart in every table:
  held-out val / test  the global val and test splits: the same sequences for every arm, shared with no
                       site. A federated arm's rows are its global model after each round; a centralized
                       (or site-alone) arm's rows its own model after each round.
  site val             each site's own val split, from the job's metrics table: the global model the site
                       received (`global_*`) and the site's local model after its round of training.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Optional

from fedesm.experiments import layout
from fedesm.experiments.layout import CENTRAL, HELDOUT
from fedesm.experiments.numbers import (ArmResult, ExperimentResult, accounted_delta, arm_summary, comparison,
                                        final_epsilon, finite, load_run, mean, run_summary, spread, test_value,
                                        val_value)
from fedesm.fileio import atomic_write_text


# ---------------------------------------------------------------------------------------------
# Formatting
# ---------------------------------------------------------------------------------------------


def f3(v) -> str:
    return f"{v:.3f}" if isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v)) else "–"


def pm(values, digits: int = 3) -> str:
    """'mean ± sd' over seeds ('mean' alone for one seed)."""
    m, s = mean(values), spread(values)
    if m is None:
        return "–"
    return f"{m:.{digits}f}" if len(finite(values)) < 2 else f"{m:.{digits}f} ± {s:.{digits}f}"


def signed_pm(values, digits: int = 3) -> str:
    m, s = mean(values), spread(values)
    if m is None:
        return "–"
    return f"{m:+.{digits}f}" if len(finite(values)) < 2 else f"{m:+.{digits}f} ± {s:.{digits}f}"


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


def _rel(path: Path, base: Path) -> str:
    return os.path.relpath(path, base).replace(os.sep, "/")


def _seeds_text(arm: ArmResult) -> str:
    return f"{len(arm.seeds)}" if arm.seeds else "0"


def _steps(arm: ArmResult) -> Optional[int]:
    return arm.training.get("steps_per_round")


def _comparison_rows(exp: ExperimentResult) -> list[list[str]]:
    rows = []
    for arm in exp.arms:
        if arm.kind == "centralized" or not arm.done:
            continue
        for c in exp.comparators(arm):
            au, ap = comparison(arm, c, "auroc"), comparison(arm, c, "auprc")
            ratio = (_steps(c) or 0) / max(1, _steps(arm) or 1)
            rows.append([arm.label, f"{c.label} ({'equal steps' if ratio == 1 else f'{ratio:g}x the steps per round'})",
                         str(len(au["diffs"])), signed_pm(au["diffs"]), au["verdict"], signed_pm(ap["diffs"]),
                         ap["verdict"]])
    return rows


def _alone_rows(exp: ExperimentResult) -> list[list[str]]:
    """Federated arms against each site training alone (does federating pay for a site?)."""
    rows = []
    alone = [a for a in exp.arms if a.kind == "site-alone" and a.done]
    for arm in exp.arms:
        if not arm.federated or not arm.done:
            continue
        for a in alone:
            au, ap = comparison(arm, a, "auroc"), comparison(arm, a, "auprc")
            rows.append([arm.label, a.label, str(len(au["diffs"])), signed_pm(au["diffs"]), au["verdict"],
                         signed_pm(ap["diffs"]), ap["verdict"]])
    return rows


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------


def _mean_series(arm: ArmResult, metric: str) -> list[tuple[int, float, float]]:
    by_round: dict[int, list] = {}
    for s in arm.seeds:
        for r in arm.runs[s].heldout_series():
            if r.get(metric) is not None:
                by_round.setdefault(r["round"], []).append(r[metric])
    return [(n, mean(v), spread(v)) for n, v in sorted(by_round.items())]


def make_plots(exp: ExperimentResult, plots_dir: Path) -> dict[str, list[Path]]:
    """Per experiment: held-out AUPRC / AUROC / F1 per arm (mean and band over seeds) and the first seed's
    precision-recall curves on test; per federated arm (first seed): per-site accuracy, F1, precision-recall."""
    from fedesm.experiments.plots import plot_arms, plot_pr_curves, plot_run

    eid = exp.info["id"]
    out: dict[str, list[Path]] = {}
    done = [a for a in exp.arms if a.done]
    if not done:
        return out
    compare = []
    for metric in ("auprc", "auroc", "f1"):
        series = {(a.label if a.kind != "centralized" or a.label.startswith(CENTRAL) else f"{CENTRAL} ({a.label})"):
                  _mean_series(a, metric) for a in done}
        compare.append(plot_arms(series, metric, plots_dir / f"{eid}_arms_{metric}.png",
                                 f"{eid}: {metric.upper()} on the held-out val split"
                                 + (" (threshold 0.5)" if metric == "f1" else "")))
    seed0 = min(s for a in done for s in a.seeds)
    curves = {a.label: a.runs[seed0].pr_curve for a in done if seed0 in a.runs and a.runs[seed0].pr_curve}
    if curves:
        ref = exp.references.get(seed0)
        if ref:
            curves["reference (LR, ±7 window)"] = ref.get("pr_curve")
        compare.append(plot_pr_curves(curves, plots_dir / f"{eid}_test_pr_curves.png",
                                      f"{eid}: final models, precision-recall on test (seed {seed0})",
                                      prevalence=(ref or {}).get("test_positive_fraction")))
    out["_compare"] = compare
    central = next((a for a in done if a.kind == "centralized"), None)
    for arm in done:
        if arm.federated:
            first = arm.first()
            heldout = [{**r, "site": HELDOUT} for r in first.heldout_series()]
            c_rows = ([{**r, "site": CENTRAL} for r in central.runs[arm.seeds[0]].heldout_series()]
                      if central and arm.seeds[0] in central.runs else None)
            out[arm.id] = plot_run(first.site_rows, plots_dir, f"{eid}_{arm.id}", central_rows=c_rows,
                                   heldout_rows=heldout)
    return out


def _setup_section(run: dict, cfg: dict, run_dir: Path) -> list[str]:
    lines = ["## Setup", ""]
    if run.get("description"):
        lines += [run["description"], ""]
    lines += ["```"] + run.get("plan", []) + ["```", ""]
    splits = []
    for seed_dir in layout.seed_dirs(run_dir):
        for split_file in sorted((seed_dir / layout.DATA).glob(f"*/{layout.SPLIT}")):
            s = json.loads(split_file.read_text())
            parts = [f"held-out val {s['val']['sequences']} seqs ({s['val']['positive_fraction']:.1%} positive), "
                     f"test {s['test']['sequences']} seqs"]
            for name, v in s["sites"].items():
                parts.append(f"{name} {v['train']['sequences']} train ({v['train']['positive_fraction']:.1%} "
                             f"positive) / {v['val']['sequences']} val")
            if s.get("skew"):
                parts.append(f"skew: {s['skew']['rule']} (median positive fraction per chain "
                             f"{s['skew']['median_positive_fraction']:.1%})")
            splits.append([str(layout.seed_of(seed_dir)), s["mode"], "; ".join(parts)])
    if splits:
        lines += [md_table(["seed", "split", "sequences per part (token positive rate)"], splits), ""]
    m = run.get("machine") or {}
    where = (f"{m.get('machine', '?')} with {m.get('cpus', '?')} CPU cores" + (f" and a {m['gpu']}" if m.get("gpu")
             else "") + f" (torch {m.get('torch', '?')})") if m else "an unrecorded machine"
    lines += [f"Run {run.get('started', '?')} – {run.get('finished', '?')}, wall time {seconds(run.get('wall_seconds'))} "
              f"on {where}; reproduce with `fedesm experiment run {cfg.get('name', run.get('name'))} --out DIR`."
              + (f" {run['note']}." if run.get("note") else ""), ""]
    return lines


def build_report(run_dir, target_f1: float = 0.5, out_dir=None) -> Path:
    """Write `report.md` (+ `plots/`, `summary.json`) for a run folder; returns the report's path."""
    run_dir = Path(run_dir)
    run, cfg, experiments = load_run(run_dir)
    out = Path(out_dir) if out_dir else run_dir
    out.mkdir(parents=True, exist_ok=True)
    plots_dir = out / layout.PLOTS
    title = run.get("title") or run.get("name") or "fedesm experiments"
    seeds = cfg.get("seeds") or sorted({s for e in experiments for a in e.arms for s in a.seeds})
    lines = [f"# {title}", ""]
    if run.get("caption"):
        lines += [f"> **{run['caption'].strip()}**", ""]
    lines += [f"Config `{cfg.get('name', run.get('name'))}`; status **{run.get('status', '?')}**"
              + (f" ({'; '.join(run['failures'])})" if run.get("failures") else "")
              + f"; seeds {', '.join(map(str, seeds))}: every number is the mean ± standard deviation over seeds, "
              "and arms are compared seed by seed (same split, backbone and initial adapters).", ""]
    summary = {"name": run.get("name"), "target_f1": target_f1, "seeds": seeds, "wall_seconds": run.get("wall_seconds"),
               "experiments": {}}
    key_lines, body = [], []
    for exp in experiments:
        eid = exp.info["id"]
        sums = {a.id: arm_summary(a, target_f1) for a in exp.arms}
        summary["experiments"][eid] = {"title": exp.info.get("title"), "arms": sums,
                                       "comparisons": _comparisons_json(exp)}
        plots = make_plots(exp, plots_dir)
        body += [f"## {exp.info.get('title', eid)}", ""]
        if exp.info.get("description"):
            body += [exp.info["description"].strip(), ""]
        body += _test_table(exp)
        body += _comparison_section(exp)
        body += _heldout_table(exp, sums, target_f1)
        body += _site_table(exp)
        body += _round_table(exp)
        if plots.get("_compare"):
            body += ["Held-out val per round, all arms (mean over seeds, band ±1 sd), and the final models' "
                     "precision-recall curves on the test split (first seed):", ""]
            body += [" ".join(f"![{p.stem}]({_rel(p, out)})" for p in plots["_compare"]), ""]
        for arm in exp.arms:
            if arm.id in plots:
                body += [f"**{arm.label}** (`{eid}/{arm.id}`, seed {arm.seeds[0]}): per site = the site's local model "
                         "on its own val split; black = global model, mean over the sites' val splits; purple = "
                         "global model on the held-out val split; red dashed = centralized on the held-out val split.",
                         ""]
                body += [" ".join(f"![{p.stem}]({_rel(p, out)})" for p in plots[arm.id]), ""]
        key_lines += _key_results(exp)
    lines += ["## Key results", "", "All metrics are per residue. AUROC and AUPRC need no threshold; precision, "
              "recall, F1 and MCC are given at 0.5 and at the threshold that maximises F1 on the held-out val split "
              "(\"@thr\"), which no arm trains on. \"Test\" = each arm's final model on the test split, the same "
              "sequences for every arm. \"Level\" = the mean difference over seeds is within the spread of the arms "
              "over seeds.", ""] + key_lines + [""]
    findings = Path(run_dir) / layout.FINDINGS
    if findings.is_file():  # the run's interpretation, in its author's words (not generated)
        lines += ["## What the numbers say", "", findings.read_text().strip(), ""]
    lines += body
    lines += _notes(experiments)
    lines += _setup_section(run, cfg, run_dir)
    report = out / layout.REPORT
    atomic_write_text(report, "\n".join(lines).rstrip() + "\n")
    atomic_write_text(out / layout.SUMMARY, json.dumps(summary, indent=2) + "\n")
    return report


def _comparisons_json(exp: ExperimentResult) -> list[dict]:
    out = []
    for arm in exp.arms:
        if arm.kind == "centralized" or not arm.done:
            continue
        others = exp.comparators(arm) + ([a for a in exp.arms if a.kind == "site-alone" and a.done]
                                         if arm.federated else [])
        for c in others:
            out.append({"arm": arm.id, "against": c.id, **{k: comparison(arm, c, k) for k in ("auroc", "auprc")}})
    return out


def _reference_row(exp: ExperimentResult, cols) -> Optional[list[str]]:
    if not exp.references:
        return None
    refs = list(exp.references.values())
    return (["*reference: logistic regression, one-hot ±7 window*", str(len(refs))]
            + [pm([r.get(k if k == "threshold_tuned" else f"test_{k}") for r in refs]) for k, _ in cols]
            + [" / ".join(f3(r.get("test_auroc")) for _, r in sorted(exp.references.items()))])


def _test_table(exp: ExperimentResult) -> list[str]:
    """The final model of every arm on the test split (mean ± sd over seeds), the reference beside them."""
    cols = [("auroc", "AUROC"), ("auprc", "AUPRC"), ("f1_tuned", "F1@thr"), ("mcc_tuned", "MCC@thr"),
            ("precision_tuned", "precision@thr"), ("recall_tuned", "recall@thr"), ("f1", "F1@0.5")]
    rows = []
    for arm in exp.arms:
        if arm.done:
            per = {k: list(arm.per_seed(test_value(k)).values()) for k, _ in cols}
            if finite(per["auroc"]):
                rows.append([arm.label, _seeds_text(arm)] + [pm(per[k]) for k, _ in cols]
                            + [" / ".join(f3(v) for v in per["auroc"])])
    if not rows:
        return []
    ref = _reference_row(exp, cols)
    if ref:
        rows.append(ref)
    prevalence = mean(r.get("test_positive_fraction") for r in exp.references.values())
    note = f" Chance level: AUROC 0.5, AUPRC = the positive rate, {prevalence:.1%}." if prevalence else ""
    return ["**Test split** (final model of each arm, mean ± sd over seeds; thr = the F1-maximising threshold on "
            "the held-out val split; the reference is trained on the same pooled site training data)." + note, "",
            md_table(["arm", "seeds"] + [c for _, c in cols] + ["AUROC per seed"], rows), ""]


def _comparison_section(exp: ExperimentResult) -> list[str]:
    out = []
    rows = _comparison_rows(exp)
    if rows:
        out += ["**Against centralized** (test split, paired by seed: arm − centralized; level = within the "
                "spread over seeds):", "",
                md_table(["arm", "centralized arm", "seeds", "Δ AUROC", "AUROC", "Δ AUPRC", "AUPRC"], rows), ""]
    rows = _alone_rows(exp)
    if rows:
        out += ["**Against each site training alone** (does federating pay for a site? test split, paired by seed: "
                "federated − the site alone):", "",
                md_table(["federated arm", "site alone", "seeds", "Δ AUROC", "AUROC", "Δ AUPRC", "AUPRC"], rows), ""]
    return out


def _heldout_table(exp: ExperimentResult, sums: dict, target: float) -> list[str]:
    rows = []
    for arm in exp.arms:
        s = sums[arm.id]
        if not arm.done:
            failed = next((r for r in arm.runs.values() if not r.done), None)
            status = failed.info.get("status") if failed else "not run"
            rows.append([arm.label, f"**{status}**: {(failed.info.get('error', '') if failed else '')[:120]}"]
                        + ["–"] * 7)
            continue
        per = {k: list(arm.per_seed(val_value(k)).values()) for k in ("auprc", "auroc", "f1", "precision", "recall")}
        rt = [run_summary(arm.runs[x], target)["heldout_rounds_to_target_f1"] for x in arm.seeds]
        eps = s["epsilon"]
        rows.append([
            arm.label + (f" ({arm.info['strategy']})" if arm.federated and arm.info.get("strategy") not in
                         (None, arm.label) else ""),
            f"**{pm(per['auprc'])}**", pm(per["auroc"]), pm(per["f1"]), pm(per["precision"]), pm(per["recall"]),
            " / ".join(str(v) if v is not None else "–" for v in rt), seconds(s["wall_seconds"]),
            human_bytes(s.get("sent_bytes_per_site_per_round")) if arm.federated else "–",
            f"{eps:.2f} (δ={s['dp_delta']:g})" if eps is not None and s["dp_delta"] else "–",
        ])
    header = ["arm", "final AUPRC", "AUROC", "F1@0.5", "precision", "recall", f"rounds to F1 ≥ {target:g} per seed",
              "wall time per seed", "sent / site / round", "ε spent (worst site, mean)"]
    return ["**Held-out val** (the global val split, same sequences for every arm; federated = global model after "
            "the last round, centralized / site alone = its model after the last round; mean ± sd over seeds):", "",
            md_table(header, rows), ""]


def _site_table(exp: ExperimentResult) -> list[str]:
    rows = []
    for arm in exp.arms:
        if not arm.federated or not arm.done:
            continue
        sites = sorted({s for x in arm.seeds for s in arm.runs[x].sites()})
        for site in sites:
            per = [run_summary(arm.runs[x], 0.5)["sites"].get(site) or {} for x in arm.seeds]
            g = [(p.get("global_final") or {}).get("auprc") for p in per]
            lf = [(p.get("local_final") or {}).get("auprc") for p in per]
            rows.append([arm.label, site, f"**{pm(g)}**", pm(lf), human_bytes(mean(p.get("sent_bytes_per_round")
                                                                                  for p in per)),
                         f"{mean(p.get('sent_parameters_per_round') for p in per):,.0f}"
                         if mean(p.get("sent_parameters_per_round") for p in per) else "–",
                         pm([p.get("epsilon") for p in per], 2) if any(p.get("epsilon") for p in per) else "–"])
    if not rows:
        return []
    header = ["arm", "site", "global model AUPRC", "local model AUPRC", "sent / round", "parameters sent", "ε spent"]
    return ["**Site val** (each site's own val split, after the last round; global = the aggregated model, local = "
            "the site's model after its local steps; sent = serialized adapters + head per round):", "",
            md_table(header, rows), ""]


def _round_table(exp: ExperimentResult) -> list[str]:
    arms = [a for a in exp.arms if a.done]
    if not arms:
        return []
    series = {a.id: {n: m for n, m, _ in _mean_series(a, "auprc")} for a in arms}
    rounds = sorted({r for s in series.values() for r in s})
    rows = [[str(r)] + [f3(series[a.id].get(r)) for a in arms] for r in rounds]
    tsec = lambda v: f"{v:.1f} s" if v is not None else "–"  # noqa: E731 (a one-line formatter)
    secs = []
    for a in arms:
        per = [run_summary(a.runs[x], 0.5) for x in a.seeds]
        secs.append([a.label, tsec(mean(p["train_seconds_per_round"] for p in per)),
                     seconds(mean(p["round_seconds"] for p in per)) if a.federated else "–",
                     seconds(mean(p["wall_seconds"] for p in per))])
    return ["AUPRC on the held-out val split per round, mean over seeds (round 0 = the shared start):", "",
            md_table(["round"] + [a.label for a in arms], rows), "",
            "Time per arm and seed (training seconds per round: the slowest site's local steps, or the centralized "
            "steps; round = server-side round wall time incl. evaluation and aggregation; the machine was shared):",
            "", md_table(["arm", "training s / round", "round wall time", "arm wall time (incl. start-up)"], secs), ""]


def _relation(v: str) -> str:
    return {"level": "level with", "ahead": "ahead of", "behind": "behind"}.get(v, v)


def _key_results(exp: ExperimentResult) -> list[str]:
    eid = exp.info["id"]
    lines = [f"- **{exp.info.get('title', eid)}**"]
    for arm in exp.arms:
        if not arm.done:
            lines.append(f"  - {arm.label}: not done")
            continue
        au = list(arm.per_seed(test_value("auroc")).values())
        ap = list(arm.per_seed(test_value("auprc")).values())
        text = f"  - {arm.label}: test AUROC **{pm(au)}**, AUPRC **{pm(ap)}** ({len(arm.seeds)} seeds)"
        if arm.kind != "centralized":
            for c in exp.comparators(arm):
                cmp_ = comparison(arm, c, "auroc")
                text += f"; {_relation(cmp_['verdict'])} {c.label} (Δ AUROC {signed_pm(cmp_['diffs'])})"
        eps = mean(final_epsilon(arm.runs[s]) for s in arm.seeds)
        if eps is not None and arm.training.get("dp_noise_multiplier"):
            deltas = [d for d in (accounted_delta(arm.runs[s]) for s in arm.seeds) if d is not None]
            text += f"; ε = {eps:.2f} per site at δ={min(deltas) if deltas else arm.training.get('dp_delta'):g}"
        lines.append(text)
    if exp.references:
        refs = list(exp.references.values())
        lines.append(f"  - reference, {refs[0].get('model', 'logistic regression')}: test AUROC "
                     f"{pm([r.get('test_auroc') for r in refs])}, AUPRC {pm([r.get('test_auprc') for r in refs])}")
    return lines


def _notes(experiments: list[ExperimentResult]) -> list[str]:
    noise = any(a.training.get("grad_noise_std") for e in experiments for a in e.arms)
    dp = [a for e in experiments for a in e.arms if a.training.get("dp_noise_multiplier")]
    lines = ["## Notes", "",
             "- Same start: every arm of a seed starts from the same initial adapters and head (the federated job's "
             "round-0 state, written once per seed); each seed draws its own split, random-init backbone, initial "
             "adapters and training streams. Each site's batches, crops and dropout come from its own stream "
             "(derived from the seed and the site's name).",
             "- Steps: each site runs N local steps per round (the sites at the same time); a centralized arm with the "
             "same N takes as many sequential steps as one site (equal steps per round, the paper's comparison), one "
             "with 2N as many as the sites together (equal compute).",
             "- Wall times include each run's start-up (the NVFLARE simulator takes tens of seconds) and the "
             "per-round evaluations; the machine may have been shared, so they are indicative."]
    if noise:
        lines.append("- Gradient noise (the paper's DP mode, `grad_noise_std`) adds N(0, std²) to the batch "
                     "gradient; without per-sample clipping it has no (ε, δ) guarantee, so no ε is shown for it.")
    if dp:
        t = dp[0].training
        lines.append(f"- DP-SGD (`fedesm.training.privacy.dpsgd`): Poisson sampling with q = batch size / site training "
                     f"sequences, per-sample clipping of the LoRA + head gradient to C = {t['dp_max_grad_norm']:g}, "
                     f"Gaussian noise σ·C with σ = {t['dp_noise_multiplier']:g}; ε per site from an RDP accountant "
                     f"(checked against Opacus') at the stricter of the job's δ = {t['dp_delta']:g} and the site's own "
                     "target_delta (default 1e-5), counting every local step so far. Each "
                     "site's guarantee covers its own sequences; the backbone is public and frozen.")
    return lines + [""]
