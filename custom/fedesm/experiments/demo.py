"""`make demo`: a complete federated run on real binding-site data, CPU only, in a few minutes.

A shipped GPSite set (ATP by default: BioLiP-derived, MIT licence) is split at random between two
sites, after a validation split is held out from the training file for choosing the call threshold;
the set's own low-identity test split is every site's test split. The backbone is pretrained ESM-2
8M when its weights are in the fair-esm/torch hub cache or can be downloaded (`choose_backbone`),
else a tiny random-init ESM-2 in fair-esm's format, said in one line with how to get the real ones
(`--backbone random` skips the check); the real `esm2_fra_lora` job is
exported with small settings and run by `nvflare simulator`. Then each round's global model is
scored on the test split, beside a sequence-only logistic-regression reference trained on the same
training data, and a table and plots are written.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from fedesm import results
from fedesm.data.split import split_records, write_split
from fedesm.launch.jobs import export_job
from fedesm.launch.simulate import run_simulator
from fedesm.settings import FederationSettings, JobSettings, LoraSettings, ModelSettings, TrainConfig
from fedesm.site_config import write_site_config
from fedesm.tables import SERVER_ROW, read_table, write_table

log = logging.getLogger(__name__)

SYNTHETIC = "synthetic"  # dataset name for the synthetic-motif variant (tests)

# What `make demo` runs: a tiny random-init ESM-2, 2 sites x 4 rounds x 80 steps, minutes on 2 CPU cores.
DEMO = JobSettings(model=ModelSettings(arch="esm2_t2_tiny"), lora=LoraSettings(r=8, alpha=16),
                   training=TrainConfig(rounds=4, steps_per_round=80, lr=3e-3, max_len=512),
                   # the demo scores every round's global model on the test split itself ([5/5]): the sites
                   # score it on their val only (best-model choice), not the test split a second and third time
                   federation=FederationSettings(min_clients=2, evaluate_global_test=False))


PRETRAINED = "esm2_t6_8M_UR50D"  # the demo's pretrained backbone when one can be had: the smallest ESM-2
RANDOM = "random"  # --backbone random: the random init of the demo's architecture, as before real weights
AUTO = "auto"


def choose_backbone(choice: str | None, arch: str, fetch=None) -> tuple[str, str | None, str]:
    """(arch, backbone source or None for a random init, the one line that says which and why) for the demo's
    --backbone: auto (pretrained ESM-2 weights from the fair-esm/torch hub cache or a download: `arch`'s when it
    is published, else ESM-2 8M; a random init of `arch` otherwise), random, or any backbone source."""
    from fedesm.errors import FedesmError
    from fedesm.architectures import ARCHITECTURES
    from fedesm.model.backbone import HUB_URL, fetch_hub_checkpoint

    if choice not in (None, AUTO):
        if choice == RANDOM:
            return arch, None, f"random-init ESM-2 ({arch}), as asked (--backbone random)"
        return arch, choice, f"{choice} ({arch})"
    name = arch if ARCHITECTURES[arch].on_hub else PRETRAINED
    try:
        path = (fetch or fetch_hub_checkpoint)(name)
    except FedesmError as e:
        return arch, None, (f"random-init ESM-2 ({arch}): no pretrained weights, {e}; for real ones download "
                            f"{HUB_URL.format(name=name)} to that path or pass --backbone (a checkpoint, a Hugging "
                            "Face folder, hf:ID); --backbone random skips this check")
    return name, str(path), f"pretrained ESM-2 {name} from {path}"


def _records(dataset: str, n_sequences: int, seed: int):
    """(training records, test records or None, a description) for a shipped set or synthetic data."""
    from fedesm.data.validate import load_dataset

    if dataset == SYNTHETIC:
        from fedesm.data.synth import synth_records

        return synth_records(n=n_sequences, n_families=30, pos_rate=0.1, min_len=60, max_len=300, seed=seed), None, \
            f"{n_sequences} SYNTHETIC sequences (planted motifs)"
    name = dataset if dataset.startswith("gpsite:") else f"gpsite:{dataset}"
    train, test = load_dataset(name), load_dataset(f"{name}:test")
    return train, test, f"{name} (GPSite, BioLiP-derived, MIT): {len(train)} training chains, {len(test)} test chains"


def run_demo(out_dir, dataset: str = "ATP", settings: JobSettings = DEMO, n_sequences: int = 600,
             echo=print, backbone_line: str | None = None) -> dict:
    """Split over `settings.federation.min_clients` sites, train federated in the simulator, score per round on
    the test split; returns the summary. `settings.model.backbone` None = a random-init checkpoint of the arch;
    `backbone_line` (from `choose_backbone`) is what the backbone step reports."""
    from fedesm.evaluation.reference import reference_scores
    from fedesm.evaluation.scoring import AdapterEvaluator
    from fedesm.model.checkpoint import make_random_checkpoint

    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    t, arch, backbone = settings.training, settings.model.arch, settings.model.backbone
    seed, sites, rounds = t.seed, settings.federation.min_clients, t.rounds
    records, test, what = _records(dataset, n_sequences, seed)
    split = split_records(records, "iid", sites, val_frac=0.1, test_frac=0.0 if test else 0.1, seed=seed,
                          site_val_frac=0.1)
    if test:
        split.test = list(test)
    write_split(split, out / "data", fmt="fasta", overwrite=True)
    pooled = [r for site in split.sites.values() for r in site]
    echo(f"[1/5] data: {what}; iid split over {sites} sites "
         + ", ".join(f"{n} {len(v)} train / {len(split.site_val[n])} val" for n, v in split.sites.items())
         + f"; held-out val {len(split.val)} chains (picks the call threshold); test {len(split.test)} chains "
         f"-> {out / 'data'}")
    base = reference_scores(pooled, split.val, split.test, seed=seed)
    echo(f"[2/5] reference, {base['model']} on the same {len(pooled)} training chains: test AUROC "
         f"{base['test_auroc']:.3f}, AUPRC {base['test_auprc']:.3f}, F1 {base['test_f1_tuned']:.3f} "
         f"(threshold {base['threshold_tuned']:.3f} from the held-out val)")
    if backbone is None:
        backbone = str(make_random_checkpoint(arch, out / f"{arch}.pt", seed=seed))
        echo(f"[3/5] backbone: {backbone_line or f'random-init ESM-2 ({arch})'}; written to {backbone} (random "
             "weights: expect the reference to win)")
    else:
        echo(f"[3/5] backbone: {backbone_line or f'{backbone} ({arch})'}")
    site_cfg = write_site_config(out / "site_config.yaml", backbone, out / "data", test=out / "data" / "test.fa")
    settings = settings.replace(model=settings.model.replace(backbone=backbone))
    job = export_job("esm2_fra_lora", out / "jobs", settings=settings)
    echo(f"[4/5] job {job}: `nvflare simulator`, {sites} sites x {rounds} rounds x {t.steps_per_round} steps "
         f"(log: {out / 'simulator.log'})")

    def on_round(n, rows):
        parts = [f"{r['site']} test AUROC {r.get('test_auroc', float('nan')):.3f} AUPRC "
                 f"{r.get('test_auprc', float('nan')):.3f} F1 {r.get('test_f1_tuned', float('nan')):.3f}"
                 for r in sorted(rows, key=lambda r: r["site"]) if r.get("test_auroc") is not None]
        echo(f"      round {n}/{rounds} ({time.perf_counter() - t0:.0f}s): local models: {'; '.join(parts)}")

    result = run_simulator(job, out / "workspace", n_clients=sites, site_config=site_cfg,
                           log_path=out / "simulator.log", on_round=on_round)
    site_rows = read_table(results.output_dir(result) / results.METRICS)
    echo("[5/5] scoring each round's global model on the test split (threshold from the held-out val)")
    evaluator = AdapterEvaluator(backbone, settings.lora, seed=seed, attention=settings.model.attention,
                                 progress=True)
    global_rows = []
    round_dirs = results.round_dirs(results.output_dir(result))
    for rd in round_dirs:
        m = evaluator.evaluate(rd, split.val, t.max_len, split.test, curve=rd == round_dirs[-1])
        global_rows.append({"round": results.round_number(rd), "site": "global", **m})
    final = global_rows[-1]
    table = demo_table(site_rows, global_rows, base)
    echo(table)
    plots = demo_plots(site_rows, global_rows, base, out / "plots")
    summary = {
        "dataset": what, "rounds": rounds, "steps_per_round": t.steps_per_round, "sites": sites, "backbone": backbone,
        "global_final_test": {k: v for k, v in final.items() if k != "pr_curve"},
        "global_round0_test": {k: v for k, v in global_rows[0].items() if k != "pr_curve"},
        "reference_test": {k: v for k, v in base.items() if k != "pr_curve"},
        "site_final_test": {r["site"]: {k: r.get(k) for k in ("test_auroc", "test_auprc", "test_f1_tuned")}
                            for r in site_rows if r["round"] == rounds and r.get("test_auroc") is not None},
        **timing(site_rows),
        "wall_seconds": time.perf_counter() - t0, "result_dir": str(result), "plots": [str(p) for p in plots],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    write_table(out / "global_test.jsonl", [{k: v for k, v in r.items() if k != "pr_curve"} for r in global_rows])
    echo(f"final global model on the test split ({len(split.test)} chains): AUROC {final['test_auroc']:.3f}, "
         f"AUPRC {final['test_auprc']:.3f}, F1 {final['test_f1_tuned']:.3f}, MCC {final['test_mcc_tuned']:.3f} "
         f"(threshold {final['threshold_tuned']:.3f}); reference AUROC {base['test_auroc']:.3f}, AUPRC "
         f"{base['test_auprc']:.3f}, F1 {base['test_f1_tuned']:.3f}")
    echo(f"round wall time {summary['mean_round_seconds']:.1f}s = local training {summary['mean_train_seconds']:.1f}s "
         f"+ evaluation and everything else {summary['mean_overhead_seconds']:.1f}s")
    echo(f"adapters: {results.output_dir(result) / results.BEST} (predict with `fedesm predict --model {result} --input FASTA "
         f"--out preds.csv`)")
    echo(f"plots: {out / 'plots'}; total {summary['wall_seconds']:.0f}s")
    return summary


COLUMNS = (("test_auroc", "AUROC"), ("test_auprc", "AUPRC"), ("test_f1", "F1@0.5"), ("test_f1_tuned", "F1@thr"),
           ("test_mcc_tuned", "MCC@thr"), ("test_precision_tuned", "prec@thr"), ("test_recall_tuned", "rec@thr"),
           ("threshold_tuned", "thr"))


def demo_table(site_rows: list[dict], global_rows: list[dict], reference: dict) -> str:
    """Per round: each site's local model and the global model on the test split; the reference last."""
    head = f"{'round':>5}  {'model':<16}" + "".join(f"{label:>9}" for _, label in COLUMNS)
    fmt = lambda v: f"{v:9.3f}" if isinstance(v, (int, float)) else f"{'-':>9}"  # noqa: E731
    lines = ["metrics on the test split (thr = F1-maximising threshold on the model's validation split: the "
             "site's own val for local models, the held-out val for the global model and the reference)",
             head, "-" * len(head)]
    by_round: dict[int, list[tuple[str, dict]]] = {}
    for r in site_rows:
        if r.get("test_auroc") is not None and r.get("site") != SERVER_ROW:
            by_round.setdefault(r["round"], []).append((f"{r['site']} (local)", r))
    for r in global_rows:
        by_round.setdefault(r["round"], []).append(("global", r))
    for rnd in sorted(by_round):
        for name, r in sorted(by_round[rnd], key=lambda x: (x[0] == "global", x[0])):
            lines.append(f"{rnd:>5}  {name:<16}" + "".join(fmt(r.get(k)) for k, _ in COLUMNS))
    lines.append(f"{'':>5}  {'reference (LR)':<16}" + "".join(fmt(reference.get(k)) for k, _ in COLUMNS))
    return "\n".join(lines)


def demo_plots(site_rows: list[dict], global_rows: list[dict], reference: dict, out_dir: Path) -> list[Path]:
    from fedesm.experiments.plots import plot_pr_curves, plot_test_metric

    out = []
    for metric in ("test_auroc", "test_auprc", "test_f1_tuned"):
        out.append(plot_test_metric(site_rows, global_rows, metric, out_dir / f"demo_{metric}.png",
                                    reference=reference.get(metric)))
    curves = {"global model (last round)": global_rows[-1].get("pr_curve"), "reference (LR, ±7 window)":
              reference.get("pr_curve")}
    out.append(plot_pr_curves(curves, out_dir / "demo_pr_curve.png", "demo: precision-recall on the test split",
                              prevalence=reference.get("test_positive_fraction")))
    return out


def timing(rows: list[dict]) -> dict:
    """Round wall time split into the slowest site's training and everything else (NaN when absent)."""
    from fedesm.experiments.numbers import mean_round_seconds, slowest_site_train_seconds

    nan = float("nan")
    round_s = mean_round_seconds(rows)
    train_s = slowest_site_train_seconds(rows)
    round_s, train_s = (nan if round_s is None else round_s), (nan if train_s is None else train_s)
    return {"mean_round_seconds": round_s, "mean_train_seconds": train_s, "mean_overhead_seconds": round_s - train_s}
