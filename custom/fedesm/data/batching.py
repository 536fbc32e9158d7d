"""Tokenised batches: random crops for training, overlapping tiles for evaluation.

Sequences longer than the context (`max_len` residues, 1000 by default as in the paper; ESM-2 takes
at most 1,022) are random-cropped in training and covered by overlapping windows in evaluation and
prediction, each residue scored exactly once (by the window that gives it the most context), so no
residue drops out of the metrics or counts twice. Labels of special and padding tokens are IGNORE_INDEX.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch

from fedesm.data.records import Record

IGNORE_INDEX = -100


class Tokenizer:
    """Maps residues to ESM-2 token ids, adding <cls> and <eos> as fair-esm's batch converter does."""

    def __init__(self, alphabet):
        self.padding_idx = alphabet.padding_idx
        self.cls_idx = alphabet.cls_idx
        self.eos_idx = alphabet.eos_idx
        table = np.full(128, alphabet.unk_idx, dtype=np.int64)
        for ch in "ACDEFGHIKLMNPQRSTVWYXBZUO":
            table[ord(ch)] = alphabet.get_idx(ch)
        self._table = table

    def encode(self, sequence: str) -> np.ndarray:
        codes = np.frombuffer(sequence.encode("ascii", "replace"), dtype=np.uint8)
        return self._table[np.minimum(codes, 127)]

    def collate(self, pieces: Sequence[tuple[str, np.ndarray | None]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens, labels) for a list of (sequence, labels-or-None); shape (B, 2 + longest)."""
        width = max(len(s) for s, _ in pieces) + 2
        tokens = np.full((len(pieces), width), self.padding_idx, dtype=np.int64)
        labels = np.full((len(pieces), width), IGNORE_INDEX, dtype=np.int64)
        for i, (seq, lab) in enumerate(pieces):
            n = len(seq)
            tokens[i, 0] = self.cls_idx
            tokens[i, 1 : n + 1] = self.encode(seq)
            tokens[i, n + 1] = self.eos_idx
            if lab is not None:
                labels[i, 1 : n + 1] = lab
        return torch.from_numpy(tokens), torch.from_numpy(labels)


class RandomBatchSampler:
    """Batches drawn at random from local data ("samples drawn at random", as in the paper).

    With `bucket=True` (default on CUDA) a batch is an anchor drawn at random plus its neighbours in
    length order, which cuts padding while every record keeps the same chance to be drawn.
    """

    def __init__(self, records: Sequence[Record], tokenizer: Tokenizer, batch_size: int, max_len: int,
                 seed: int = 0, bucket: bool = False):
        if not records:
            raise ValueError("no training records")
        self.records = list(records)
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_len = max_len
        self.bucket = bucket
        self.rng = np.random.default_rng(seed)
        self._by_length = np.argsort([len(r) for r in self.records], kind="stable")
        self._rank = np.empty_like(self._by_length)
        self._rank[self._by_length] = np.arange(len(self.records))

    def _indices(self) -> np.ndarray:
        n = len(self.records)
        if not self.bucket or n <= self.batch_size:
            return self.rng.integers(0, n, size=self.batch_size)
        anchor = self._rank[self.rng.integers(0, n)]
        lo = int(np.clip(anchor - self.batch_size // 2, 0, n - self.batch_size))
        return self._by_length[lo : lo + self.batch_size]

    def crop(self, record: Record) -> tuple[str, np.ndarray]:
        n = len(record)
        if n <= self.max_len:
            return record.sequence, record.labels
        start = int(self.rng.integers(0, n - self.max_len + 1))
        return record.sequence[start : start + self.max_len], record.labels[start : start + self.max_len]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tokenizer.collate([self.crop(self.records[i]) for i in self._indices()])


ESM2_MAX_RESIDUES = 1022  # ESM-2 was trained on 1,024 tokens: <cls> + 1,022 residues + <eos>


@dataclass(frozen=True)
class Window:
    """A slice [start, end) of one sequence fed to the model; it scores only its core [keep_start, keep_end)."""

    record: int  # index into the record list
    start: int  # residue offset of the window
    end: int
    keep_start: int  # the residues this window scores: its core, the middle of its overlaps
    keep_end: int


def tile_windows(lengths: Sequence[int], max_len: int, overlap: int | None = None) -> list[Window]:
    """Overlapping windows over every sequence; their cores partition it, so every residue is scored once.

    A sequence that fits is one window. A longer one gets windows of `max_len` residues that overlap
    by at least `overlap` (default max_len // 4); neighbouring windows split their overlap in the
    middle, so each residue is scored by the window that gives it the most context on both sides.
    """
    overlap = max_len // 4 if overlap is None else overlap
    if not 0 <= overlap < max_len:
        raise ValueError("overlap must be in [0, max_len)")
    stride = max_len - overlap
    windows = []
    for i, n in enumerate(lengths):
        if n <= max_len:
            windows.append(Window(i, 0, n, 0, n))
            continue
        starts = list(range(0, n - max_len, stride)) + [n - max_len]
        cuts = [0] + [(b + a + max_len) // 2 for a, b in zip(starts, starts[1:])] + [n]
        windows.extend(Window(i, s, s + max_len, cuts[k], cuts[k + 1]) for k, s in enumerate(starts))
    return windows


def eval_batches(records: Sequence[Record] | Sequence[str], tokenizer: Tokenizer, max_len: int,
                 batch_tokens: int = 8192) -> Iterator[tuple[list[Window], torch.Tensor]]:
    """Windows grouped by length into batches of at most ~`batch_tokens` tokens."""
    seqs = [r if isinstance(r, str) else r.sequence for r in records]
    windows = sorted(tile_windows([len(s) for s in seqs], max_len), key=lambda w: w.end - w.start)
    batch: list[Window] = []
    for w in windows:
        width = w.end - w.start + 2
        if batch and width * (len(batch) + 1) > batch_tokens:
            yield batch, tokenizer.collate([(seqs[b.record][b.start : b.end], None) for b in batch])[0]
            batch = []
        batch.append(w)
    if batch:
        yield batch, tokenizer.collate([(seqs[b.record][b.start : b.end], None) for b in batch])[0]
