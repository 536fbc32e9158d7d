"""Run the `loss` preset on several binding-site sets and say which class weighting wins where.

    .venv/bin/python scripts/class_weight_study.py --out experiments_out/loss --docs docs/results/loss

Each set: the preset's three centralized arms (balanced, sqrt, plain CE) over its seeds, chosen on the
held-out VALIDATION AUPRC (mean over seeds); test numbers are shown, never used to choose. The default
kept is the weighting with the best mean rank over the sets.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fedesm.experiments.config import load_config
from fedesm.experiments.report import build_report
from fedesm.experiments.run import run_experiments

SETS = {  # name -> --set overrides
    "ATP (3.9%)": ["data.path=gpsite:ATP", "data.test_path=gpsite:ATP:test"],
    "PEP (5.4%)": ["data.path=gpsite:PEP", "data.test_path=gpsite:PEP:test"],
    "HEM (8.5%)": ["data.path=gpsite:HEM", "data.test_path=gpsite:HEM:test"],
    "PRO (15.6%)": ["data.path=gpsite:PRO", "data.test_path=gpsite:PRO:test"],
    "synthetic (1.5%)": ["data.path=null", "data.test_path=null", "data.test_frac=0.15",
                         "data.synthetic={n: 500, families: 25, pos_rate: 0.015, min_len: 80, max_len: 400}"],
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="experiments_out/loss", help="run folders, one per set")
    p.add_argument("--docs", default=None, help="also write the study's report.md + study.json here")
    p.add_argument("--sets", nargs="*", default=list(SETS), help="which sets (default: all)")
    p.add_argument("--resume", action="store_true", help="continue runs already started")
    args = p.parse_args(argv)
    rows = {}
    for name in args.sets:
        out = Path(args.out) / name.split()[0].lower()
        cfg = load_config("loss", SETS[name])
        if not (args.resume and (out / "summary.json").is_file()):
            run_experiments(cfg, out, resume=args.resume, force=not args.resume, report=False)
        build_report(out)
        arms = json.loads((out / "summary.json").read_text())["experiments"]["loss"]["arms"]
        rows[name] = {a: {"val_auprc": v["heldout_val"]["auprc"], "test_auprc": v["test"]["auprc"],
                          "test_auroc": v["test"]["auroc"], "label": v["label"],
                          "val_per_seed": [s["heldout_val_final"]["auprc"] for s in v["per_seed"].values()]}
                      for a, v in arms.items()}
    ranks: dict[str, list[int]] = {}
    for name, arms in rows.items():
        order = sorted(arms, key=lambda a: -(arms[a]["val_auprc"]["mean"] or 0))
        for rank, a in enumerate(order, 1):
            ranks.setdefault(a, []).append(rank)
            arms[a]["rank"] = rank
    winner = min(ranks, key=lambda a: (sum(ranks[a]) / len(ranks[a]), a))
    lines = ["# Which loss weighting? (held-out validation AUPRC chooses; test shown only)", "",
             "Centralized runs of the `loss` preset (tiny RANDOM-INIT ESM-2, 6 x 50 steps, 3 seeds), per set: "
             "mean ± sd over seeds. Rank = by mean validation AUPRC within the set.", "",
             "| set | weighting | val AUPRC | rank | test AUPRC | test AUROC |", "|---|---|---|---|---|---|"]
    fmt = lambda m: f"{m['mean']:.3f} ± {m['sd']:.3f}"  # noqa: E731
    for name, arms in rows.items():
        for a in sorted(arms, key=lambda a: arms[a]["rank"]):
            r = arms[a]
            lines.append(f"| {name} | {r['label']} | {fmt(r['val_auprc'])} | {r['rank']} | {fmt(r['test_auprc'])} | "
                         f"{fmt(r['test_auroc'])} |")
    lines += ["", "Mean rank over the sets: " + ", ".join(f"{a} {sum(v) / len(v):.2f}" for a, v in sorted(
        ranks.items(), key=lambda kv: sum(kv[1]))) + f"; kept as the default: **{winner}**.", ""]
    text = "\n".join(lines)
    print(text)
    study = {"sets": rows, "mean_rank": {a: sum(v) / len(v) for a, v in ranks.items()}, "winner": winner}
    for folder in [Path(args.out)] + ([Path(args.docs)] if args.docs else []):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "report.md").write_text(text)
        (folder / "study.json").write_text(json.dumps(study, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
