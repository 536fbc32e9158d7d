"""A sequence-only reference to read the model's numbers against.

Logistic regression (scikit-learn) on one-hot windows of +-7 residues around each residue: 15
positions x 21 symbols (20 amino acids + "other/outside the chain"), 315 sparse features. It sees
what a short motif says (e.g. ATP's P-loop GxxxxGK[ST]) and nothing else, so a fine-tuned pretrained
ESM-2 should beat it; a random-init backbone trained briefly cannot be expected to.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from fedesm.data.records import STANDARD_AA, Record
from fedesm.evaluation.scoring import score

HALF_WINDOW = 7
_SYMBOLS = len(STANDARD_AA) + 1  # index 20: any other residue, or a position outside the chain
_CODE = np.full(128, len(STANDARD_AA), dtype=np.int64)
for _i, _aa in enumerate(STANDARD_AA):
    _CODE[ord(_aa)] = _i


def window_features(sequence: str, half_window: int = HALF_WINDOW):
    """Sparse (len(sequence), (2w+1)*21) one-hot matrix: row i encodes residues i-w .. i+w."""
    from scipy.sparse import csr_matrix

    n = len(sequence)
    width = 2 * half_window + 1
    codes = _CODE[np.minimum(np.frombuffer(sequence.encode("ascii", "replace"), dtype=np.uint8), 127)]
    padded = np.concatenate([np.full(half_window, _SYMBOLS - 1), codes, np.full(half_window, _SYMBOLS - 1)])
    # column of (offset k, symbol s) = k*21 + s; row i looks at padded[i : i + width]
    idx = np.arange(n)[:, None] + np.arange(width)[None, :]
    cols = (np.arange(width)[None, :] * _SYMBOLS + padded[idx]).ravel()
    rows = np.repeat(np.arange(n), width)
    return csr_matrix((np.ones(n * width, dtype=np.float32), (rows, cols)), shape=(n, width * _SYMBOLS))


def _stack(sequences: Sequence[str], half_window: int):
    from scipy.sparse import vstack

    return vstack([window_features(s, half_window) for s in sequences]).tocsr()


@dataclass
class WindowLogReg:
    """Logistic regression on one-hot residue windows; `fit` on records, `predict_proba` per sequence."""

    half_window: int = HALF_WINDOW
    C: float = 1.0
    class_weight: Optional[str] = None  # None or "balanced"
    seed: int = 0

    def fit(self, records: Sequence[Record]) -> "WindowLogReg":
        from sklearn.linear_model import LogisticRegression

        if not records:
            raise ValueError("no training records for the reference model")
        x = _stack([r.sequence for r in records], self.half_window)
        y = np.concatenate([r.labels for r in records]).astype(np.int64)
        if y.min() == y.max():
            raise ValueError("the reference model needs both positive and negative residues in its training data")
        self.model_ = LogisticRegression(C=self.C, class_weight=self.class_weight, max_iter=2000,
                                         solver="lbfgs", random_state=self.seed)
        self.model_.fit(x, y)
        return self

    def predict_proba(self, sequences: Sequence[str]) -> list[np.ndarray]:
        if not sequences:
            return []
        p = self.model_.predict_proba(_stack(list(sequences), self.half_window))[:, 1]
        return np.split(p, np.cumsum([len(s) for s in sequences])[:-1])


def reference_scores(train: Sequence[Record], val: Sequence[Record], test: Sequence[Record], seed: int = 0) -> dict:
    """The window logistic regression trained on `train`, scored like the models (threshold from `val`)."""
    model = WindowLogReg(seed=seed).fit(train)
    out = score(val, model.predict_proba([r.sequence for r in val]), test,
                model.predict_proba([r.sequence for r in test]), curve=True)
    out.update(model=f"logistic regression on one-hot windows of +-{HALF_WINDOW} residues (scikit-learn)",
               train_sequences=len(train), train_residues=int(sum(len(r) for r in train)))
    return out
