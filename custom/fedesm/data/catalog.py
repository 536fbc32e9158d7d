"""The real binding-site sets shipped with fedesm, by name.

`data/gpsite/` in the repository holds the six GPSite benchmarks (BioLiP-derived, MIT licence, see
its SOURCE.md): per-residue binding sites for ATP, heme, DNA, RNA, peptide and protein partners,
each with the authors' train and low-identity test split. Anywhere fedesm takes a data path it also
takes a name:

    gpsite:ATP          the ATP training split (same as gpsite:ATP:train)
    gpsite:ATP:test     the ATP test split

The folder is found through FEDESM_DATA_DIR (a folder holding `gpsite/`) or, by default, the
repository the package was imported from. Names are public, shipped data: a site's
`allowed_prefixes` (which guard its private data) do not apply to them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from fedesm.errors import DataError
from fedesm.paths import repo_path

ENV_VAR = "FEDESM_DATA_DIR"
PREFIX = "gpsite:"
SPLITS = ("train", "test")


@dataclass(frozen=True)
class ShippedSet:
    name: str  # ATP, HEM, ...
    ligand: str

    def path(self, split: str = "train") -> Path:
        if split not in SPLITS:
            raise DataError(f"gpsite:{self.name}:{split}: unknown split (choose train or test)")
        return gpsite_dir() / f"{self.name}_{split}.txt.gz"


SETS = {s.name: s for s in (
    ShippedSet("ATP", "ATP"),
    ShippedSet("HEM", "heme"),
    ShippedSet("DNA", "DNA"),
    ShippedSet("RNA", "RNA"),
    ShippedSet("PEP", "peptide"),
    ShippedSet("PRO", "protein"),
)}


def data_dir() -> Path:
    """The folder holding `gpsite/`: $FEDESM_DATA_DIR, else `<repository>/data` (fedesm.paths)."""
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    return repo_path("data")


def gpsite_dir() -> Path:
    return data_dir() / "gpsite"


def is_shipped_name(value) -> bool:
    return isinstance(value, str) and value.lower().startswith(PREFIX)


def parse_name(name: str) -> tuple[ShippedSet, str]:
    """`gpsite:ATP[:train|:test]` -> (set, split); DataError naming the valid choices otherwise."""
    parts = name[len(PREFIX):].split(":")
    key = parts[0].upper()
    split = parts[1].lower() if len(parts) > 1 else "train"
    if key not in SETS or len(parts) > 2 or split not in SPLITS:
        raise DataError(f"{name}: unknown shipped set (choose one of "
                        f"{', '.join(f'gpsite:{k}' for k in SETS)}, optionally followed by :train or :test; "
                        f"`fedesm data list` shows them)")
    return SETS[key], split


def resolve(value):
    """A shipped set's file path for a `gpsite:` name; anything else is returned unchanged."""
    if not is_shipped_name(value):
        return value
    shipped, split = parse_name(value)
    path = shipped.path(split)
    if not path.is_file():
        raise DataError(f"{value}: shipped file {path} is missing (set {ENV_VAR} to the folder holding gpsite/, "
                        f"e.g. the repository's data/)")
    return path


def list_sets() -> list[dict]:
    """Name, ligand and file of every shipped split, in the order of SOURCE.md."""
    return [{"name": f"gpsite:{s.name}" + ("" if split == "train" else ":test"), "set": s.name, "ligand": s.ligand,
             "split": split, "path": str(s.path(split))}
            for s in SETS.values() for split in SPLITS]
