"""Shared fixtures: tiny random-init ESM-2 checkpoints in fair-esm's format, made once per session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("MPLBACKEND", "Agg")

TINY_ARCH = "esm2_t2_tiny"  # 2 layers, 64-dim, 4 heads


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A random-init 2-layer 64-dim ESM-2 written by fedesm in fair-esm's own format."""
    from fedesm.model.checkpoint import make_random_checkpoint

    return make_random_checkpoint(TINY_ARCH, tmp_path_factory.mktemp("ckpt") / f"{TINY_ARCH}.pt", seed=0)


@pytest.fixture(scope="session")
def synth_data():
    """(train, val) synthetic records with planted motifs: learnable by a tiny model in a few hundred steps."""
    from fedesm.data.synth import synth_records

    import numpy as np

    records = synth_records(n=240, n_families=12, pos_rate=0.1, min_len=60, max_len=200, seed=0)
    order = np.random.default_rng(0).permutation(len(records))  # val shares families with train
    records = [records[i] for i in order]
    return records[:200], records[200:]
