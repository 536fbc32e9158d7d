"""The in-memory record every reader produces and every other part consumes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

# Residues ESM-2's alphabet accepts: the 20 standard amino acids plus X, B, Z, U, O.
STANDARD_AA = "ACDEFGHIKLMNPQRSTVWY"
ESM_RESIDUES = frozenset(STANDARD_AA + "XBZUO")


@dataclass(frozen=True)
class Record:
    """One protein chain with one 0/1 binding label per residue."""

    id: str
    sequence: str
    labels: np.ndarray  # uint8, shape (len(sequence),), values 0/1
    family: Optional[str] = None

    def __len__(self) -> int:
        return len(self.sequence)

    @property
    def n_positive(self) -> int:
        return int(self.labels.sum())
