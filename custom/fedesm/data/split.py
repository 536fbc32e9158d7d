"""Split one labelled set into held-out val/test sets and N federated sites.

Held-out ``val`` and ``test`` are taken first (for the centralized baseline and the report); the
rest is shared among sites ``site-1..site-N`` (NVFLARE's default simulator client names), and each
site keeps ``site_val_frac`` of its share as a site-local validation set. Records are grouped by
family (a record without a family is its own group) and the held-out sets are cut between groups,
so val and test share no family with each other or with any site. A site's local val is cut
between families too where the site has enough of them; otherwise (e.g. a site holding one big
family) it is a random sample of the site's records: it tracks local fitting, while generalisation
to unseen families is measured on the global test set.

Modes for sharing the training pool among sites:

- ``iid``: random, near-equal sequence counts.
- ``family``: no family in two sites; greedy balance by residue count (largest family first, to the
  site with the fewest residues).
- ``skew``: the paper's experiment 2, exactly 2 sites. Sequences sorted by positive-label fraction
  and cut at the median; site-1 gets 80% of the above-median sequences and 20% of those below,
  site-2 the rest, so site-1's token label ratio is clearly higher.
- ``dirichlet``: N sites; each of the two buckets (above/below median positive fraction) is shared
  with proportions drawn from Dirichlet(alpha): small alpha = strongly non-IID label ratios.

Everything is deterministic for a seed. ``write_split`` builds the output in a temp folder beside
the target and renames it into place, so a failure leaves no partial output.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from fedesm.data.readers import FORMAT_EXTENSION, PathLike, write_records
from fedesm.data.records import Record
from fedesm.data.stats import label_counts
from fedesm.errors import FedesmError

MODES = ("iid", "family", "skew", "dirichlet")
SKEW_MAJORITY = 0.8  # share of the above-median sequences site-1 gets in skew mode


def site_name(i: int) -> str:
    """Name of site i (1-based), matching NVFLARE's simulator clients."""
    return f"site-{i}"


@dataclass
class SplitResult:
    """Records per destination. ``sites`` holds each site's training records."""

    sites: dict[str, list[Record]]
    site_val: dict[str, list[Record]]
    val: list[Record]
    test: list[Record]
    mode: str = "iid"
    seed: int = 0
    params: dict = field(default_factory=dict)

    def summary(self) -> dict:
        """What split.json holds: parameters, and counts and token label ratio per part."""
        return {
            "mode": self.mode,
            "seed": self.seed,
            **self.params,
            "n_sites": len(self.sites),
            "val": label_counts(self.val),
            "test": label_counts(self.test),
            "sites": {
                name: {"train": label_counts(self.sites[name]), "val": label_counts(self.site_val[name])}
                for name in self.sites
            },
        }


def split_records(
    records: Sequence[Record],
    mode: str = "iid",
    n_sites: int = 2,
    val_frac: float = 0.1,
    test_frac: float = 0.1,
    seed: int = 0,
    alpha: float = 0.5,
    site_val_frac: float = 0.1,
) -> SplitResult:
    """Split records into global val/test and per-site train/val (see the module docstring)."""
    _check_args(records, mode, n_sites, val_frac, test_frac, alpha, site_val_frac)
    rng = np.random.default_rng(seed)
    n = len(records)
    groups = _groups(records)
    rng.shuffle(groups)

    val_groups, groups = _take_groups(groups, round(val_frac * n))
    test_groups, pool_groups = _take_groups(groups, round(test_frac * n))
    pool = [r for g in pool_groups for r in g]
    if len(pool) < n_sites:
        raise FedesmError(f"only {len(pool)} sequences left for training after val/test: need at least one per site "
                          f"({n_sites} sites)")

    if mode == "iid":
        shares = _share_iid(pool, n_sites, rng)
    elif mode == "family":
        shares = _share_family(pool_groups, n_sites)
    elif mode == "skew":
        shares = _share_skew(pool, rng)
    else:
        shares = _share_dirichlet(pool, n_sites, alpha, rng)

    sites, site_val = {}, {}
    for i, share in enumerate(shares, start=1):
        site_groups = _groups(share)
        rng.shuffle(site_groups)
        target = round(site_val_frac * len(share))
        if site_val_frac > 0 and len(share) >= 2:
            target = max(target, 1)
        val_g, train_g = _take_groups(site_groups, target)
        if (target > 0 and not val_g) or not train_g:
            # Too few families at this site for a family-disjoint local val: sample records instead.
            val_g, train_g = _take_groups([[r] for r in _flatten(site_groups)], target)
        sites[site_name(i)] = _flatten(train_g)
        site_val[site_name(i)] = _flatten(val_g)

    params = {"val_frac": val_frac, "test_frac": test_frac, "site_val_frac": site_val_frac}
    if mode == "dirichlet":
        params["alpha"] = alpha
    if mode == "skew":
        params["skew"] = {
            "rule": (f"training chains sorted by their fraction of positive residues and cut at the median; site-1 "
                     f"gets {SKEW_MAJORITY:.0%} of the chains above the median and {1 - SKEW_MAJORITY:.0%} of those "
                     f"below, site-2 the rest ({1 - SKEW_MAJORITY:.0%} / {SKEW_MAJORITY:.0%})"),
            "median_positive_fraction": float(np.median([_positive_fraction(r) for r in pool])),
        }
    return SplitResult(sites=sites, site_val=site_val, val=_flatten(val_groups), test=_flatten(test_groups),
                       mode=mode, seed=seed, params=params)


def write_split(result: SplitResult, out_dir: PathLike, fmt: str = "fasta", overwrite: bool = False) -> Path:
    """Write DIR/{val,test}.<ext>, DIR/site-i/{train,val}.<ext> and DIR/split.json, all or nothing.

    An existing DIR is an error, unless it is empty, or ``overwrite`` is set and it holds a
    previous split (a split.json): other folders are never deleted.
    """
    if fmt not in FORMAT_EXTENSION:
        raise FedesmError(f"unknown format {fmt!r} (choose from {', '.join(FORMAT_EXTENSION)})")
    ext = FORMAT_EXTENSION[fmt]
    out = Path(out_dir)
    if out.exists():
        if not out.is_dir():
            raise FedesmError(f"{out}: exists and is not a directory")
        if any(out.iterdir()):
            if not overwrite:
                raise FedesmError(f"{out}: output directory exists and is not empty (use --force to replace a previous split)")
            if not (out / "split.json").is_file():
                raise FedesmError(f"{out}: not a previous split (no split.json); refusing to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        write_records(result.val, tmp / f"val.{ext}")
        write_records(result.test, tmp / f"test.{ext}")
        for name in result.sites:
            (tmp / name).mkdir()
            write_records(result.sites[name], tmp / name / f"train.{ext}")
            write_records(result.site_val[name], tmp / name / f"val.{ext}")
        summary = {**result.summary(), "format": fmt}
        (tmp / "split.json").write_text(json.dumps(summary, indent=2) + "\n")
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _replace_dir(tmp: Path, out: Path) -> None:
    if not out.exists():
        os.rename(tmp, out)
        return
    # Move the old folder aside first, so a failure in between leaves the old split intact.
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
    os.rmdir(old)
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------------------ helpers


def _check_args(records, mode, n_sites, val_frac, test_frac, alpha, site_val_frac) -> None:
    if mode not in MODES:
        raise FedesmError(f"unknown split mode {mode!r} (choose from {', '.join(MODES)})")
    if n_sites < 1:
        raise FedesmError(f"need at least one site, got {n_sites}")
    if mode == "skew" and n_sites != 2:
        raise FedesmError(f"skew mode splits between exactly 2 sites, got {n_sites} (use dirichlet for more)")
    for name, v in (("val fraction", val_frac), ("test fraction", test_frac), ("site val fraction", site_val_frac)):
        if not 0 <= v < 1:
            raise FedesmError(f"{name} must be in [0, 1), got {v}")
    if val_frac + test_frac >= 1:
        raise FedesmError(f"val + test fractions must leave data for training, got {val_frac} + {test_frac}")
    if mode == "dirichlet" and not alpha > 0:
        raise FedesmError(f"Dirichlet alpha must be > 0, got {alpha}")
    if not records:
        raise FedesmError("no records to split")
    ids = set()
    for r in records:
        if r.id in ids:
            raise FedesmError(f"duplicate record id {r.id!r}: validate the input first (fedesm data validate)")
        ids.add(r.id)


def _groups(records: Sequence[Record]) -> list[list[Record]]:
    """Records grouped by family, in first-seen order; a record without a family is its own group."""
    by_key: dict[str, list[Record]] = {}
    for r in records:
        key = f"family:{r.family}" if r.family is not None else f"id:{r.id}"
        by_key.setdefault(key, []).append(r)
    return list(by_key.values())


def _take_groups(groups: list, target: int) -> tuple[list, list]:
    """Take whole groups (in the given, shuffled order) while that brings the count closer to target."""
    taken, rest, count = [], [], 0
    for g in groups:
        if abs(count + len(g) - target) < abs(count - target):
            taken.append(g)
            count += len(g)
        else:
            rest.append(g)
    return taken, rest


def _flatten(groups) -> list[Record]:
    return [r for g in groups for r in g]


def _share_iid(pool: list[Record], n_sites: int, rng) -> list[list[Record]]:
    order = rng.permutation(len(pool))
    return [[pool[i] for i in part] for part in np.array_split(order, n_sites)]


def _share_family(groups: list[list[Record]], n_sites: int) -> list[list[Record]]:
    if len(groups) < n_sites:
        raise FedesmError(f"family mode needs at least as many families as sites: {len(groups)} families, {n_sites} sites")
    # Largest family first to the lightest site; ties keep the (seeded, shuffled) group order.
    order = sorted(range(len(groups)), key=lambda k: -sum(len(r) for r in groups[k]))
    shares: list[list[Record]] = [[] for _ in range(n_sites)]
    load = [0] * n_sites
    for k in order:
        s = min(range(n_sites), key=lambda j: (load[j], j))
        shares[s].extend(groups[k])
        load[s] += sum(len(r) for r in groups[k])
    return shares


def _positive_fraction(r: Record) -> float:
    return r.n_positive / len(r) if len(r) else 0.0


def _buckets(pool: list[Record], rng) -> tuple[list[Record], list[Record]]:
    """(below, above) the median positive fraction; ties broken at random (seeded)."""
    tiebreak = rng.permutation(len(pool))
    order = sorted(range(len(pool)), key=lambda i: (_positive_fraction(pool[i]), tiebreak[i]))
    half = len(pool) // 2
    return [pool[i] for i in order[:half]], [pool[i] for i in order[half:]]


def _share_skew(pool: list[Record], rng) -> list[list[Record]]:
    below, above = _buckets(pool, rng)
    above = [above[i] for i in rng.permutation(len(above))]
    below = [below[i] for i in rng.permutation(len(below))]
    n_above = round(SKEW_MAJORITY * len(above))
    n_below = round((1 - SKEW_MAJORITY) * len(below))
    site1 = above[:n_above] + below[:n_below]
    site2 = above[n_above:] + below[n_below:]
    return [site1, site2]


def _share_dirichlet(pool: list[Record], n_sites: int, alpha: float, rng, max_tries: int = 1000) -> list[list[Record]]:
    below, above = _buckets(pool, rng)
    for _ in range(max_tries):
        shares: list[list[Record]] = [[] for _ in range(n_sites)]
        for bucket in (above, below):
            order = rng.permutation(len(bucket))
            p = rng.dirichlet([alpha] * n_sites)
            cuts = np.round(np.cumsum(p)[:-1] * len(bucket)).astype(int)
            for s, part in enumerate(np.split(order, cuts)):
                shares[s].extend(bucket[i] for i in part)
        if all(shares):  # redraw until no site is empty
            return shares
    raise FedesmError(f"Dirichlet(alpha={alpha}) left a site empty in {max_tries} draws: "
                      f"use a larger alpha or fewer sites than {n_sites}")
