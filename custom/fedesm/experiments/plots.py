"""Figures like the paper's: a metric per site per round against centralized, and precision vs recall.

Input rows are the tidy metrics table (`round`, `site`, metrics...): a federated run's rows (local
metrics per site, `global_*` for the global model) and optionally a centralized run's rows
(`site == "centralized"`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from fedesm.experiments.layout import CENTRAL, HELDOUT  # noqa: E402
from fedesm.fileio import atomic_path  # noqa: E402
from fedesm.tables import SERVER_ROW  # noqa: E402


def _series(rows, site: str, metric: str):
    pts = sorted((r["round"], r[metric]) for r in rows if r.get("site") == site and r.get(metric) is not None)
    return [p[0] for p in pts], [p[1] for p in pts]


def _global_mean(rows, metric: str):
    by_round: dict[int, list] = {}
    for r in rows:
        v = r.get(f"global_{metric}")
        if v is not None and r.get("site") not in (SERVER_ROW, CENTRAL):
            by_round.setdefault(r["round"], []).append(v)
    xs = sorted(by_round)
    return xs, [sum(by_round[x]) / len(by_round[x]) for x in xs]


def sites_of(rows) -> list[str]:
    return sorted({r["site"] for r in rows if r.get("site") not in (SERVER_ROW, CENTRAL)})


def plot_metric(rows: Sequence[dict], metric: str, out_path, title: str,
                central_rows: Optional[Sequence[dict]] = None, heldout_rows: Optional[Sequence[dict]] = None) -> Path:
    """One line per site (its local model), the global model (mean over sites) and centralized.

    `heldout_rows` (site == "held-out"): the global model on the held-out val split, the data the
    centralized model is evaluated on."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    for site in sites_of(rows):
        xs, ys = _series(rows, site, metric)
        ax.plot(xs, ys, marker="o", ms=3, label=f"{site} (local model)")
    xs, ys = _global_mean(rows, metric)
    if xs:
        ax.plot(xs, ys, color="black", lw=2, marker="s", ms=3, label="global model (mean over sites)")
    if heldout_rows:
        xs, ys = _series(heldout_rows, HELDOUT, metric)
        ax.plot(xs, ys, color="tab:purple", lw=2, marker="D", ms=3, label="global model (held-out val)")
    if central_rows:
        xs, ys = _series(central_rows, CENTRAL, metric)
        ax.plot(xs, ys, color="tab:red", ls="--", marker="^", ms=3,
                label="centralized (held-out val)" if heldout_rows else "centralized")
    return _save_round_plot(fig, ax, metric, title, out_path)


def plot_precision_recall(rows: Sequence[dict], out_path, title: str,
                          central_rows: Optional[Sequence[dict]] = None,
                          heldout_rows: Optional[Sequence[dict]] = None) -> Path:
    """Precision against recall as a trajectory over rounds (first and last round marked)."""
    fig, ax = plt.subplots(figsize=(5.6, 5.0), dpi=110)
    lines = [(site, rows, site) for site in sites_of(rows)]
    if heldout_rows:
        lines.append((HELDOUT, heldout_rows, "global model (held-out val)"))
    if central_rows:
        lines.append((CENTRAL, central_rows, CENTRAL))
    for site, source, label in lines:
        _, rec = _series(source, site, "recall")
        _, prec = _series(source, site, "precision")
        if not rec:
            continue
        style = dict(ls="--", color="tab:red") if site == CENTRAL else {}
        (line,) = ax.plot(rec, prec, marker="o", ms=3, label=label, **style)
        ax.annotate("start", (rec[0], prec[0]), fontsize=7, color=line.get_color())
        ax.plot(rec[-1], prec[-1], marker="*", ms=12, color=line.get_color())
    return _save_pr_plot(fig, ax, title, out_path, legend_title="* = last round")


def _save_pr_plot(fig, ax, title: str, out_path, legend_title: Optional[str] = None) -> Path:
    """Shared finish of the precision-recall figures: unit axes, labels, grid, legend."""
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, title=legend_title, title_fontsize=7)
    return _save(fig, out_path)


_METRIC_NAMES = {"auroc": "AUROC", "auprc": "AUPRC", "f1": "F1", "mcc": "MCC", "accuracy": "accuracy",
                 "precision": "precision", "recall": "recall", "threshold": "F1-maximising threshold",
                 "train_loss": "training loss", "loss": "loss"}


def metric_label(metric: str) -> str:
    """An axis label for a table key: `test_f1_tuned` -> `F1 at the val-tuned threshold (test split)`."""
    key, where = metric, []
    if key.startswith("global_"):
        key, where = key[len("global_"):], ["global model"]
    if key.startswith("test_"):
        key, where = key[len("test_"):], where + ["test split"]
    tuned = key.endswith("_tuned") and key != "threshold_tuned"
    key = key[:-len("_tuned")] if key.endswith("_tuned") else key
    label = _METRIC_NAMES.get(key, key.replace("_", " "))
    if tuned:
        label += " at the val-tuned threshold"
    return label + (f" ({', '.join(where)})" if where else "")


def _save_round_plot(fig, ax, metric: str, title: str, out_path) -> Path:
    """Shared finish of every metric-per-round figure: integer rounds, labels, grid, and the legend below the
    axes, where it cannot hide a line (a reference line near the top or bottom, say)."""
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(metric_label(metric))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    handles = ax.get_legend_handles_labels()[0]
    if handles:
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
        fig.set_figheight(fig.get_figheight() + 0.25 * ((len(handles) + 1) // 2))
    return _save(fig, out_path)


def _save(fig, out_path) -> Path:
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    with atomic_path(out_path, suffix=".png") as tmp:
        fig.savefig(tmp)
    plt.close(fig)
    return out_path


def plot_run(rows: Sequence[dict], out_dir, name: str, central_rows: Optional[Sequence[dict]] = None,
             heldout_rows: Optional[Sequence[dict]] = None) -> list[Path]:
    """The standard set for one run: accuracy, F1, precision-recall."""
    out_dir = Path(out_dir)
    return [
        plot_metric(rows, "accuracy", out_dir / f"{name}_accuracy.png", f"{name}: accuracy per round", central_rows,
                    heldout_rows),
        plot_metric(rows, "f1", out_dir / f"{name}_f1.png", f"{name}: F1 per round", central_rows, heldout_rows),
        plot_precision_recall(rows, out_dir / f"{name}_precision_recall.png", f"{name}: precision vs recall",
                              central_rows, heldout_rows),
    ]


def plot_test_metric(site_rows: Sequence[dict], global_rows: Sequence[dict], metric: str, out_path,
                     reference: Optional[float] = None, title: Optional[str] = None) -> Path:
    """A test-split metric per round: each site's local model, the global model, the reference as a line."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    for site in sites_of(site_rows):
        xs, ys = _series(site_rows, site, metric)
        if xs:
            ax.plot(xs, ys, marker="o", ms=3, label=f"{site} (local model)")
    pts = sorted((r["round"], r[metric]) for r in global_rows if r.get(metric) is not None)
    if pts:
        ax.plot(*zip(*pts), color="black", lw=2, marker="s", ms=3, label="global model")
    if reference is not None:
        ax.axhline(reference, color="tab:gray", ls=":", lw=1.5, label="reference (LR on ±7 windows)")
    return _save_round_plot(fig, ax, metric, title or metric_label(metric), out_path)


# centralized arms: red and dashed, one shade and dash pattern each, so two of them never look alike
_CENTRAL_STYLES = [dict(color="tab:red", ls="--"), dict(color="darkred", ls="-."), dict(color="salmon", ls=":"),
                   dict(color="tab:pink", ls="--")]


def plot_pr_curves(curves: dict, out_path, title: str, prevalence: Optional[float] = None) -> Path:
    """Precision-recall curves (name -> {"precision": [...], "recall": [...]}) of final models on test."""
    fig, ax = plt.subplots(figsize=(5.6, 5.0), dpi=110)
    colors = iter([f"C{i}" for i in range(10) if i != 3] * 3)  # C3 (red) is the centralized arm's, as in plot_arms
    central = iter(_CENTRAL_STYLES * 3)
    for name, c in curves.items():
        if not c or not c.get("recall"):
            continue
        if name.startswith("reference"):
            style = dict(color="tab:gray", ls=":")
        elif name.startswith(CENTRAL):
            style = dict(next(central))
        else:
            style = dict(color=next(colors))
        ax.plot(c["recall"], c["precision"], lw=1.6, label=name, **style)
    if prevalence is not None:
        ax.axhline(prevalence, color="k", lw=0.8, ls="--", label=f"chance (positive rate {prevalence:.1%})")
    return _save_pr_plot(fig, ax, title, out_path)


def plot_arms(series: dict[str, Sequence[tuple]], metric: str, out_path, title: str) -> Path:
    """One line per arm of an experiment: `series` maps an arm's label to (round, mean) or (round, mean,
    spread) points; the spread over seeds is drawn as a band (mean +- one standard deviation)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    colors = iter([f"C{i}" for i in range(10) if i != 3] * 3)  # C3 (red) is the centralized arm's
    central = iter(_CENTRAL_STYLES * 3)
    for label, points in series.items():
        if not points:
            continue
        points = sorted(points)
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        style = (dict(next(central), marker="^") if label.startswith(CENTRAL)
                 else dict(marker="o", color=next(colors)))
        ax.plot(xs, ys, ms=3, label=label, **style)
        if all(len(p) > 2 and p[2] is not None for p in points) and any(p[2] for p in points):
            lo = [p[1] - p[2] for p in points]
            hi = [p[1] + p[2] for p in points]
            ax.fill_between(xs, lo, hi, color=style["color"], alpha=0.15, lw=0)
    return _save_round_plot(fig, ax, metric, title + (" (band: +-1 sd over seeds)" if any(
        len(p) > 2 for pts in series.values() for p in pts) else ""), out_path)
