"""Residue-level metrics for binding-site prediction (padding and special tokens never counted)."""

from __future__ import annotations

import math

import numpy as np

METRIC_NAMES = ("accuracy", "precision", "recall", "f1", "mcc", "auroc", "auprc")


def binary_metrics(labels: np.ndarray, prob_positive: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """Accuracy, precision, recall, F1, MCC at `threshold`, plus threshold-free AUROC and AUPRC.

    Undefined ratios (e.g. precision with no predicted positive) are 0.0; AUROC/AUPRC are NaN when
    only one class is present.
    """
    y = np.asarray(labels).astype(bool).ravel()
    p = np.asarray(prob_positive, dtype=np.float64).ravel()
    if y.shape != p.shape:
        raise ValueError(f"labels {y.shape} and probabilities {p.shape} differ in shape")
    pred = p >= threshold
    tp = float(np.sum(pred & y))
    tn = float(np.sum(~pred & ~y))
    fp = float(np.sum(pred & ~y))
    fn = float(np.sum(~pred & y))
    n = tp + tn + fp + fn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    denom = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    mcc = (tp * tn - fp * fn) / denom if denom else 0.0
    auroc = auprc = float("nan")
    if 0 < y.sum() < y.size:
        from sklearn.metrics import average_precision_score, roc_auc_score

        auroc = float(roc_auc_score(y, p))
        auprc = float(average_precision_score(y, p))
    return {
        "accuracy": (tp + tn) / n if n else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "mcc": mcc,
        "auroc": auroc,
        "auprc": auprc,
        "residues": int(n),
        "positives": int(tp + fn),
        "threshold": float(threshold),
    }


def best_f1_threshold(labels: np.ndarray, prob_positive: np.ndarray) -> float:
    """The probability threshold that maximises F1 on (validation) data."""
    from sklearn.metrics import precision_recall_curve

    y = np.asarray(labels).astype(bool).ravel()
    if not 0 < y.sum() < y.size:
        return 0.5
    prec, rec, thr = precision_recall_curve(y, np.asarray(prob_positive).ravel())
    f1 = np.where(prec + rec > 0, 2 * prec * rec / np.maximum(prec + rec, 1e-12), 0.0)[:-1]
    return float(thr[int(np.argmax(f1))])
