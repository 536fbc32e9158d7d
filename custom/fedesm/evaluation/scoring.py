"""Scoring a model's predictions the way the field reports them.

`score` turns one model's probabilities on a validation split (and optionally a test split) into
the report of `fedesm.evaluation.metrics.metrics_with_val_threshold`: metrics at 0.5, the
F1-maximising threshold of the validation split, and the test metrics at both. The same function
serves a model in memory (`score_trainer`: a site every round, the centralized run) and saved
adapters (`AdapterEvaluator`: each round's global model in the demo and the experiments), so all
of them are scored alike.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from fedesm.data.batching import Tokenizer
from fedesm.data.records import Record
from fedesm.evaluation.metrics import binary_metrics, metrics_with_val_threshold
from fedesm.model.adapters import build_lora_model, set_exchanged_state
from fedesm.model.backbone import load_backbone
from fedesm.model.cards import read_adapter_state
from fedesm.training.inference import autocast_dtype, predict_proba, resolve_device


def labels_of(records: Sequence[Record]) -> np.ndarray:
    return np.concatenate([r.labels for r in records]) if records else np.zeros(0, np.uint8)


def _cat(probs) -> np.ndarray:
    return np.concatenate(probs) if len(probs) else np.zeros(0)


def pr_curve(labels: np.ndarray, probs: np.ndarray, max_points: int = 400) -> dict:
    """Precision-recall curve (scikit-learn), thinned to at most `max_points` points for storing."""
    from sklearn.metrics import precision_recall_curve

    if not 0 < labels.sum() < labels.size:
        return {"precision": [], "recall": []}
    prec, rec, _ = precision_recall_curve(labels, probs)
    keep = np.unique(np.linspace(0, len(prec) - 1, min(max_points, len(prec))).round().astype(int))
    return {"precision": [round(float(x), 5) for x in prec[keep]], "recall": [round(float(x), 5) for x in rec[keep]]}


def score(val: Sequence[Record], val_probs, test: Optional[Sequence[Record]] = None, test_probs=None,
          curve: bool = False) -> dict:
    """Metrics for one model's predictions (`metrics_with_val_threshold`); with `curve`, also what a plot
    of the test split needs: its precision-recall curve and its positive rate (chance AUPRC)."""
    if not test:
        return metrics_with_val_threshold(labels_of(val), _cat(val_probs))
    out = metrics_with_val_threshold(labels_of(val), _cat(val_probs), labels_of(test), _cat(test_probs))
    if curve:
        out["test_positive_fraction"] = float(labels_of(test).mean())
        out["pr_curve"] = pr_curve(labels_of(test), _cat(test_probs))
    return out


def evaluate_probabilities(records: Sequence[Record], probs: Sequence[np.ndarray], threshold: float = 0.5) -> dict:
    """Metrics at one fixed threshold (no tuning)."""
    return binary_metrics(labels_of(records), _cat(probs), threshold)


def score_trainer(trainer, val: Sequence[Record], test: Optional[Sequence[Record]] = None) -> dict:
    """`score` for the model in a `LocalTrainer`: validation metrics, and test metrics when `test` is given."""
    def probs(records):
        return trainer.predict_proba([r.sequence for r in records]) if records else []

    return score(val, probs(val), test, probs(test) if test else None)


class AdapterEvaluator:
    """One ESM-2 + LoRA model in memory; scores saved adapters (per-round global models, a centralized
    run's last/) exactly as sites score theirs (same windows, threshold rule and metrics)."""

    def __init__(self, backbone_source: str, lora, seed: int = 0, device: str = "auto",
                 attention: Optional[str] = None, progress: bool = False):
        backbone = load_backbone(backbone_source)
        self.device = resolve_device(device)
        self.model = build_lora_model(backbone, lora, seed=seed, attention=attention).to(self.device)
        self.tokenizer = Tokenizer(backbone.alphabet)
        self.autocast = autocast_dtype(self.device)
        self.progress = progress  # a bar over each pass (the demo's and the experiments' long ones)

    def load(self, adapter_dir) -> None:
        set_exchanged_state(self.model, read_adapter_state(Path(adapter_dir)))

    def probabilities(self, records: Sequence[Record], max_len: int) -> list[np.ndarray]:
        return predict_proba(self.model, self.tokenizer, [r.sequence for r in records], max_len, self.device,
                             autocast=self.autocast, progress=self.progress, desc="score")

    def evaluate(self, adapter_dir, val: Sequence[Record], max_len: int, test: Optional[Sequence[Record]] = None,
                 curve: bool = False) -> dict:
        self.load(adapter_dir)
        if test:
            return score(val, self.probabilities(val, max_len), test, self.probabilities(test, max_len), curve)
        return score(val, self.probabilities(val, max_len))
