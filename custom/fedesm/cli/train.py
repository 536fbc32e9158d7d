"""`fedesm train` (centralized fine-tuning) and `fedesm predict`."""

from __future__ import annotations

import csv
import shutil
import sys
import time
from pathlib import Path

from fedesm.cli._common import (CARD, add_lora_args, add_model_args, add_train_args, job_settings_from_args,
                                load_data, model_from_args, train_config_from_args)
from fedesm.errors import FedesmError
from fedesm.fileio import atomic_path


def register(sub) -> None:
    p = sub.add_parser("train", help="centralized LoRA fine-tuning (what the federated arms are compared with)",
                       description="Fine-tune ESM-2 with LoRA on one machine: R rounds of N optimizer steps, each "
                       "step a batch drawn at random from the training data (the same loop every federated site "
                       "runs). Evaluates on the validation set after every round; writes metrics.jsonl/.csv, "
                       "TensorBoard events (tb/), and the best/ and last/ adapters in PEFT's layout.")
    p.add_argument("--train", required=True, help="training data: FASTA (3-line), CSV, TSV, Parquet, JSONL, s3://, or a shipped set "
                   "(gpsite:ATP; `fedesm data list`)")
    p.add_argument("--val", required=True, help="validation data (same formats)")
    p.add_argument("--out", required=True, help="output folder (refused when it holds a run, unless --force)")
    p.add_argument("--force", action="store_true", help="replace the run an existing --out holds (its metrics, tb/, "
                   "best/ and last/ are deleted first)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_model_args(p)
    add_lora_args(p)
    add_train_args(p)
    p.set_defaults(func=_train)

    p = sub.add_parser("predict", help="per-residue binding probabilities for new sequences",
                       description="Predict binding sites: writes one CSV row per residue (id, position, "
                       "residue, probability, call). --model is a trained model folder (from `fedesm train`, a "
                       "federated job result, or its best/ folder) or a merged checkpoint from `fedesm export`. "
                       "When the input carries labels (3-line FASTA or a table with labels, e.g. gpsite:ATP:test), "
                       "also prints AUROC, AUPRC and precision/recall/F1/MCC at the threshold.")
    p.add_argument("--model", required=True, help="model folder or merged .pt checkpoint")
    p.add_argument("--input", required=True,
                   help="sequences: FASTA (2- or 3-line), a table with id,sequence, or a shipped set (gpsite:ATP:test)")
    p.add_argument("--out", required=True, help="output CSV")
    add_model_args(p, only=("backbone", "attention"), defaults_from={"backbone": CARD})
    add_train_args(p, only=("threshold", "max_len", "device"), defaults_from={"threshold": CARD, "max_len": CARD},
                   title="prediction")
    p.set_defaults(func=_predict)


def _train(args) -> int:
    from fedesm.data.validate import check_site_data
    from fedesm.centralized import run_centralized

    settings = job_settings_from_args(args)  # bad settings: one line before any read
    out = Path(args.out)
    held = _run_entries(out)
    if held and not args.force:
        raise FedesmError(f"{out} holds a run ({', '.join(p.name for p in held)}); pass --force to replace it, "
                          "or choose another --out")
    train = load_data(args.train)
    val = load_data(args.val)
    for note in check_site_data(train, val, args.train, args.val, settings.training.max_len):
        print(f"fedesm: note: {note}", file=sys.stderr)
    for entry in held:  # --force: the old run goes only once the new one's settings and data are known good
        shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    created = not out.exists()
    try:
        rows = run_centralized(settings, train, val, args.out, progress=not args.no_progress)
    except BaseException:
        if not _finished_a_round(out):  # failed before its first round: leave nothing behind
            if created:
                shutil.rmtree(out, ignore_errors=True)
            else:
                for entry in _run_entries(out):
                    shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
        raise
    fmt = lambda v: f"{v:6.3f}" if isinstance(v, float) and v == v else f"{'-':>6}"  # noqa: E731
    best = max(rows[1:], key=lambda r: (r["auprc"] if r["auprc"] == r["auprc"] else -1, r["f1"]))
    print("validation metrics per round (precision/recall/F1 at 0.5; thr = the F1-maximising threshold)")
    print(f"{'round':>5} {'loss':>8} {'AUROC':>6} {'AUPRC':>6} {'acc':>6} {'prec':>6} {'rec':>6} {'F1':>6} {'thr':>6}")
    for r in rows:
        loss = f"{r['train_loss']:.4f}" if r.get("train_loss") is not None else "-"
        print(f"{r['round']:>5} {loss:>8} {fmt(r['auroc'])} {fmt(r['auprc'])} {fmt(r['accuracy'])} "
              f"{fmt(r['precision'])} {fmt(r['recall'])} {fmt(r['f1'])} {fmt(r['threshold_tuned'])}")
    print(f"best round {best['round']} (val AUPRC {best['auprc']:.3f}, calls at {best['threshold_tuned']:.3f}); "
          f"adapters in {Path(args.out) / 'best'} and {Path(args.out) / 'last'}")
    return 0


RUN_ENTRIES = ("metrics.jsonl", "metrics.csv", "tb", "best", "last")


def _run_entries(out: Path) -> list[Path]:
    """What of a previous `fedesm train` run `out` holds (none when it is absent or holds other things)."""
    if out.exists() and not out.is_dir():
        raise FedesmError(f"--out {out} is a file, not a folder")
    return [out / name for name in RUN_ENTRIES if (out / name).exists()]


def _finished_a_round(out: Path) -> bool:
    import json

    try:
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return False
    return any(isinstance(r, dict) and isinstance(r.get("round"), int) and r["round"] >= 1 for r in rows)


def _predict(args) -> int:
    from fedesm.data.batching import Tokenizer
    from fedesm.data.catalog import resolve
    from fedesm.training.inference import predict_proba, resolve_device

    given = train_config_from_args(args)  # bad flags: one line (training.threshold ...) before any model loads
    model_settings = model_from_args(args)
    model_path = Path(args.model)
    if model_path.is_file():
        from fedesm.model.export import load_exported

        model, alphabet, card = load_exported(model_path)
        threshold, max_len = card["threshold"], card["max_len"]
    else:
        from fedesm.model.cards import find_model_dir, load_trained_model

        model, alphabet, card = load_trained_model(find_model_dir(model_path),
                                                   backbone_source=model_settings.backbone)
        threshold, max_len = card.threshold, card.max_len
    from fedesm.model.esm2 import set_attention

    set_attention(model, model_settings.attention)
    threshold = given.threshold if args.threshold is not None else threshold
    max_len = given.max_len if args.max_len is not None else max_len
    labelled = _read_labelled(args.input)
    seqs = [(r.id, r.sequence) for r in labelled] if labelled is not None else _read_unlabelled(resolve(args.input))
    device = resolve_device(given.device)
    model.to(device)
    print(f"predicting {len(seqs)} sequences ({sum(len(s) for _, s in seqs):,} residues) on {device} ...",
          file=sys.stderr, flush=True)  # minutes on a CPU for a few hundred chains: say so before it starts
    started = time.perf_counter()
    probs = predict_proba(model, Tokenizer(alphabet), [s for _, s in seqs], max_len, device)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    n_pos = 0
    with atomic_path(out) as tmp, tmp.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "position", "residue", "probability", "binding"])
        for (rid, seq), p in zip(seqs, probs):
            calls = (p >= threshold).astype(int)
            n_pos += int(calls.sum())
            for i, (aa, pi, c) in enumerate(zip(seq, p, calls), 1):
                w.writerow([rid, i, aa, f"{pi:.4f}", c])
    total = sum(len(s) for _, s in seqs)
    print(f"wrote {out}: {len(seqs)} sequences, {total} residues, {n_pos} called binding (threshold {threshold:.2f}); "
          f"{time.perf_counter() - started:.0f}s")
    if labelled:
        import numpy as np

        from fedesm.evaluation.metrics import binary_metrics

        m = binary_metrics(np.concatenate([r.labels for r in labelled]), np.concatenate(probs), threshold)
        print(f"labelled input ({m['positives']:,} binding residues): AUROC {m['auroc']:.3f}, AUPRC {m['auprc']:.3f}; "
              f"at threshold {threshold:.2f}: precision {m['precision']:.3f}, recall {m['recall']:.3f}, "
              f"F1 {m['f1']:.3f}, MCC {m['mcc']:.3f}")
    return 0


def _read_labelled(path: str):
    """The input's labelled, valid records, or None when it carries no labels (a 2-line FASTA); the same
    checks as training (`load_dataset`). An input that carries labels (a table, a FASTA with label lines)
    whose labels or records are wrong is refused with that problem: its labels are never silently dropped."""
    from fedesm.data.catalog import resolve
    from fedesm.data.readers import detect_format
    from fedesm.data.validate import load_dataset
    from fedesm.errors import DataError

    try:
        return load_dataset(path)
    except DataError as problem:
        local = resolve(path)
        label_lines: list = []
        if detect_format(local)[0] != "fasta":
            raise  # a table always has a labels column: its problem is the input's problem
        _read_unlabelled(local, label_lines)  # its own problems first: empty, no such file, a directory, ids
        if label_lines:  # some records carry labels: report what is wrong with them instead of predicting
            raise problem
        return None


def _read_unlabelled(path, label_lines=None):
    from fedesm.data.readers import read_sequences

    return read_sequences(path, label_lines)
