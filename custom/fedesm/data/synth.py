"""SYNTHETIC binding-site sets: protein-like sequences with planted, labelled binding motifs.

For demos and tests without real data. Background residues follow natural amino-acid frequencies
(UniProtKB/Swiss-Prot composition); binding residues are those of classic local motifs, so a small
model can learn them from sequence context:

- P-loop (Walker A) ``GxxxxGK[ST]``: all 8 loop residues bind the nucleotide phosphates.
- C2H2 zinc finger ``CxxC x12 HxxxH`` (PROSITE PS00028 spacing): the two Cys and two His.
- EF-hand loop ``DxDxDGxIxxxE``: the Ca2+ ligands at loop positions 1, 3, 5, 7 (backbone O), 12.
- Heme ``CxxCH`` (c-type cytochrome): both Cys and the His.

Sequences come in families: a family is a base sequence with its own motif types at its own
positions; members are the base with random substitutions (motif key residues kept), so a
family-disjoint split is meaningful. Families differ in binding density (0.3x to 1.7x the wanted
rate); the number of motifs per family is chosen to hit the wanted overall positive-residue rate,
carrying the rounding error from family to family.
Ids are ``synth_0001``..., families ``synth_fam01``...; files carry a SYNTHETIC comment.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from fedesm.data.records import Record
from fedesm.errors import FedesmError

logger = logging.getLogger(__name__)

# UniProtKB/Swiss-Prot amino-acid composition (%), normalised below.
_BACKGROUND = {
    "A": 8.25, "R": 5.53, "N": 4.06, "D": 5.46, "C": 1.38, "Q": 3.93, "E": 6.72, "G": 7.07, "H": 2.27, "I": 5.92,
    "L": 9.65, "K": 5.80, "M": 2.41, "F": 3.86, "P": 4.74, "S": 6.64, "T": 5.36, "W": 1.10, "Y": 2.92, "V": 6.86,
}
_AA = np.array(list(_BACKGROUND))
_P = np.array(list(_BACKGROUND.values())) / sum(_BACKGROUND.values())

MIN_GAP = 3  # background residues at least between two motifs


@dataclass(frozen=True)
class Motif:
    """A motif as one token per residue: a fixed residue, a set like "ST", or "x" (background)."""

    name: str
    tokens: tuple[str, ...]
    binding: tuple[int, ...]  # 0-based positions labelled 1

    def __len__(self) -> int:
        return len(self.tokens)


def _motif(name: str, pattern: str, binding: tuple[int, ...]) -> Motif:
    tokens, i = [], 0
    while i < len(pattern):
        if pattern[i] == "[":
            j = pattern.index("]", i)
            tokens.append(pattern[i + 1 : j])
            i = j + 1
        else:
            tokens.append(pattern[i])
            i += 1
    return Motif(name, tuple(tokens), binding)


MOTIFS = (
    _motif("p_loop", "GxxxxGK[ST]", tuple(range(8))),
    _motif("zinc_finger_c2h2", "CxxC" + "x" * 12 + "HxxxH", (0, 3, 16, 20)),
    _motif("ef_hand", "DxDxDGxIxxxE", (0, 2, 4, 6, 11)),
    _motif("heme_cxxch", "CxxCH", (0, 3, 4)),
)


def synth_comment(n, n_families, pos_rate, min_len, max_len, seed) -> str:
    """The SYNTHETIC notice written at the top of a synthetic file."""
    return (
        f"SYNTHETIC binding-site data from `fedesm data synth` (n={n}, families={n_families}, pos_rate={pos_rate}, "
        f"lengths {min_len}-{max_len}, seed={seed}).\n"
        "Not real proteins: random background with planted P-loop, C2H2 zinc-finger, EF-hand and CxxCH heme motifs."
    )


def synth_records(
    n: int = 200,
    n_families: int = 10,
    pos_rate: float = 0.1,
    min_len: int = 60,
    max_len: int = 300,
    seed: int = 0,
    mutation_rate: float = 0.1,
) -> list[Record]:
    """n synthetic records in n_families families, about pos_rate of residues labelled 1."""
    _check_args(n, n_families, pos_rate, min_len, max_len, mutation_rate)
    rng = np.random.default_rng(seed)
    sizes = [len(part) for part in np.array_split(np.arange(n), n_families)]
    id_width = max(4, len(str(n)))
    fam_width = max(2, len(str(n_families)))
    records: list[Record] = []
    lengths = rng.integers(min_len, max_len + 1, size=n_families)
    # Families differ in binding density (as real proteins do: label-skewed splits need that);
    # the weights are scaled so the residue-weighted mean rate is pos_rate.
    # A family's target stays at or above its smallest possible motif (3 binding residues), so short
    # sequences at low rates are not forced far over target.
    weights = rng.uniform(0.3, 1.7, size=n_families)
    residues = lengths * np.array(sizes)
    floor = np.minimum(3.0 / (pos_rate * lengths), 1.0)
    for _ in range(10):
        weights = np.maximum(weights, floor)
        weights *= residues.sum() / (weights * residues).sum()
    carry = 0.0  # positive residues still owed, summed over all members so far
    for f, size in enumerate(sizes):
        length = int(lengths[f])
        n_types = int(rng.integers(1, 3))
        types = [MOTIFS[k] for k in rng.choice(len(MOTIFS), size=n_types, replace=False)]
        target = pos_rate * weights[f] * length + carry / size
        base, fixed, labels = _family_base(length, types, target, rng)
        carry = (target - int(labels.sum())) * size
        family = f"synth_fam{f + 1:0{fam_width}d}"
        mutable = np.flatnonzero(~fixed)
        mutable = mutable[mutable > 0]  # keep the initial Met
        for _ in range(size):
            seq = base.copy()
            hit = mutable[rng.random(len(mutable)) < mutation_rate]
            seq[hit] = rng.choice(_AA, size=len(hit), p=_P)
            rid = f"synth_{len(records) + 1:0{id_width}d}"
            records.append(Record(id=rid, sequence="".join(seq), labels=labels.copy(), family=family))
    achieved = sum(r.n_positive for r in records) / sum(len(r) for r in records)
    if abs(achieved - pos_rate) > 0.1 * pos_rate:  # whole motifs per family: small sets round coarsely
        logger.warning("positive rate %.3f is off the wanted %s: use more or longer sequences, or a lower rate",
                       achieved, pos_rate)
    return records


def _family_base(length: int, types: list[Motif], target: float, rng) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A base sequence with motifs planted: (residues, key-residue mask, labels)."""
    chosen: list[Motif] = []
    used, positives = 1, 0  # position 0 is the initial Met
    while True:
        # Add one of the family's motif types that fits and brings the count closer to target.
        fits = [m for m in types if used + len(m) + MIN_GAP <= length]
        closer = [m for m in fits if abs(positives + len(m.binding) - target) < abs(positives - target)]
        if not chosen and not closer:  # every family binds: at least the smallest motif that fits
            closer = [m for m in sorted(MOTIFS, key=lambda m: len(m.binding)) if used + len(m) + MIN_GAP <= length][:1]
        if not closer:
            break
        m = closer[int(rng.integers(len(closer)))]
        chosen.append(m)
        used += len(m) + MIN_GAP
        positives += len(m.binding)
    order = rng.permutation(len(chosen))
    chosen = [chosen[i] for i in order]

    seq = rng.choice(_AA, size=length, p=_P)
    seq[0] = "M"
    fixed = np.zeros(length, dtype=bool)
    labels = np.zeros(length, dtype=np.uint8)
    slack = length - used
    offsets = np.sort(rng.integers(0, slack + 1, size=len(chosen)))
    start = 1 + MIN_GAP // 2
    for m, off in zip(chosen, offsets):
        pos = start + int(off)
        for k, tok in enumerate(m.tokens):
            if tok != "x":
                seq[pos + k] = tok if len(tok) == 1 else tok[int(rng.integers(len(tok)))]
                fixed[pos + k] = True
        labels[pos + np.array(m.binding)] = 1
        start += len(m) + MIN_GAP
    return seq, fixed, labels


def _check_args(n, n_families, pos_rate, min_len, max_len, mutation_rate) -> None:
    if n < 1:
        raise FedesmError(f"--n must be at least 1, got {n}")
    if not 1 <= n_families <= n:
        raise FedesmError(f"--families must be between 1 and --n ({n}), got {n_families}")
    if not 0 < pos_rate <= 0.3:
        raise FedesmError(f"--pos-rate must be in (0, 0.3], got {pos_rate}")
    if min_len < 40 or max_len < min_len:
        raise FedesmError(f"need 40 <= --min-len <= --max-len, got {min_len}, {max_len}")
    if not 0 <= mutation_rate < 1:
        raise FedesmError(f"mutation rate must be in [0, 1), got {mutation_rate}")
