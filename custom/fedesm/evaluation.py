"""Scoring saved models on held-out data the way the field reports it, beside the sequence-only baseline.

Used after a run (the demo, the experiments): the global model of each round is loaded from its
saved adapters and scored on a validation split held out from all training data, where the
F1-maximising threshold is chosen, and on the test split at 0.5 and at that threshold
(`fedesm.metrics.metrics_with_val_threshold`). The reference is `fedesm.baseline.WindowLogReg`
trained on the same training data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from fedesm.data.records import Record
from fedesm.metrics import metrics_with_val_threshold


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


class AdapterEvaluator:
    """One ESM-2 + LoRA model in memory; scores saved adapters (per-round global models, a centralized
    run's last/) exactly as sites score theirs (same windows, threshold rule and metrics)."""

    def __init__(self, backbone_source: str, lora, seed: int = 0, device: str = "auto"):
        import torch

        from fedesm.data.batching import Tokenizer
        from fedesm.model import build_lora_model, load_backbone
        from fedesm.train import resolve_device

        backbone = load_backbone(backbone_source)
        self.device = resolve_device(device)
        self.model = build_lora_model(backbone, lora, seed=seed).to(self.device)
        self.tokenizer = Tokenizer(backbone.alphabet)
        self.autocast = torch.bfloat16 if self.device.type == "cuda" else None

    def load(self, adapter_dir) -> None:
        from safetensors.torch import load_file

        from fedesm.model import set_exchanged_state

        set_exchanged_state(self.model, load_file(str(Path(adapter_dir) / "adapter_model.safetensors")))

    def probabilities(self, records: Sequence[Record], max_len: int) -> list[np.ndarray]:
        from fedesm.train import predict_proba

        return predict_proba(self.model, self.tokenizer, [r.sequence for r in records], max_len, self.device,
                             autocast_dtype=self.autocast)

    def evaluate(self, adapter_dir, val: Sequence[Record], max_len: int, test: Optional[Sequence[Record]] = None,
                 curve: bool = False) -> dict:
        self.load(adapter_dir)
        if test:
            return score(val, self.probabilities(val, max_len), test, self.probabilities(test, max_len), curve)
        return score(val, self.probabilities(val, max_len))


def baseline_scores(train: Sequence[Record], val: Sequence[Record], test: Sequence[Record], seed: int = 0) -> dict:
    """The window logistic regression trained on `train`, scored like the models (threshold from `val`)."""
    from fedesm.baseline import HALF_WINDOW, WindowLogReg

    model = WindowLogReg(seed=seed).fit(train)
    out = score(val, model.predict_proba([r.sequence for r in val]), test,
                model.predict_proba([r.sequence for r in test]), curve=True)
    out.update(model=f"logistic regression on one-hot windows of +-{HALF_WINDOW} residues (scikit-learn)",
               train_sequences=len(train), train_residues=int(sum(len(r) for r in train)))
    return out
