"""Where the repository's own files are (`data/`, `jobs/`, `helm/`, `provisioning/`): one place knows.

Installed editable (`pip install -e .`), fedesm runs from `<repository>/custom/fedesm/`, so the repository is
two folders above this package. An image that installs fedesm as a plain package has no repository around
it: it sets FEDESM_REPO_DIR to the folder that holds those files (read when a module asks, or at import for
the modules that keep a constant). FEDESM_DATA_DIR and FEDESM_JOBS_DIR still move `data/` and `jobs/` alone.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "FEDESM_REPO_DIR"


def repo_root() -> Path:
    """$FEDESM_REPO_DIR, else the repository this package was installed from (editable)."""
    env = os.environ.get(ENV_VAR)
    return Path(env).expanduser() if env else Path(__file__).resolve().parents[2]


def repo_path(*parts: str) -> Path:
    """A file or folder of the repository: `repo_path("provisioning", "project.yml")`."""
    return repo_root().joinpath(*parts)
