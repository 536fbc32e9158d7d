"""Residue-level metrics for binding-site prediction (padding and special tokens never counted)."""

from __future__ import annotations

import math

import numpy as np

METRIC_NAMES = ("accuracy", "precision", "recall", "f1", "mcc", "auroc", "auprc")
TUNED_NAMES = ("precision", "recall", "f1", "mcc")  # reported again at the threshold chosen on validation data


def binary_metrics(labels: np.ndarray, prob_positive: np.ndarray, threshold: float = 0.5,
                   ranking: bool = True) -> dict[str, float]:
    """Accuracy, precision, recall, F1, MCC at `threshold`, plus threshold-free AUROC and AUPRC.

    Undefined ratios (e.g. precision with no predicted positive) are 0.0; AUROC/AUPRC are NaN when
    only one class is present (or when `ranking` is False: they do not depend on the threshold).
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
    if ranking and 0 < y.sum() < y.size:
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


def metrics_with_val_threshold(val_labels, val_probs, labels=None, probs=None, threshold: float = 0.5) -> dict:
    """The field's report for one model: metrics at `threshold` (0.5) and at a threshold tuned on validation.

    The tuned threshold maximises F1 on (`val_labels`, `val_probs`), data held out from training. For
    the validation data itself: metrics at `threshold` plus `threshold_tuned`. With (`labels`,
    `probs`) (a test split): `test_*` metrics at `threshold`, and `test_{precision,recall,f1,mcc}_tuned`
    at the tuned threshold (an honest estimate: the threshold never saw the test data).
    """
    tuned = best_f1_threshold(val_labels, val_probs)
    out = {k: v for k, v in binary_metrics(val_labels, val_probs, threshold).items() if k in METRIC_NAMES}
    out["threshold_tuned"] = tuned
    if labels is not None:
        test = binary_metrics(labels, probs, threshold)
        at_tuned = binary_metrics(labels, probs, tuned, ranking=False)
        out.update({f"test_{k}": test[k] for k in METRIC_NAMES})
        out.update({f"test_{k}_tuned": at_tuned[k] for k in TUNED_NAMES})
    return out
