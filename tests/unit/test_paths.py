"""One module knows where the repository's files are (fedesm.paths), and one variable points it elsewhere."""

import json
import os
import subprocess
import sys
from pathlib import Path

from fedesm import paths

REPO = Path(__file__).resolve().parents[2]

_PROBE = """
import json
from fedesm.data import catalog
from fedesm.experiments import config
from fedesm.launch import jobs, network, policy
print(json.dumps({"data": str(catalog.data_dir()), "jobs": str(jobs.jobs_root()), "charts": str(policy.CHARTS_DIR),
                  "project": str(network.DEFAULT_PROJECT_FILE), "root": str(config.REPO_ROOT)}))
"""


def _where(env_root=None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in (paths.ENV_VAR, "FEDESM_DATA_DIR", "FEDESM_JOBS_DIR")}
    if env_root is not None:
        env[paths.ENV_VAR] = str(env_root)
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_editable_install_finds_the_repository_and_the_variable_moves_every_path(tmp_path):
    default = _where()
    assert default == {"data": str(REPO / "data"), "jobs": str(REPO / "jobs"), "charts": str(REPO / "helm"),
                       "project": str(REPO / "provisioning" / "project.yml"), "root": str(REPO)}
    assert (REPO / "provisioning" / "project.yml").is_file() and (REPO / "helm").is_dir()
    moved = _where(tmp_path)
    assert moved == {"data": str(tmp_path / "data"), "jobs": str(tmp_path / "jobs"), "charts": str(tmp_path / "helm"),
                     "project": str(tmp_path / "provisioning" / "project.yml"), "root": str(tmp_path)}


def test_no_module_but_paths_climbs_to_the_repository():
    """`parents[2]` from custom/fedesm/x.py or `parents[3]` from a subpackage: the repository, computed by hand."""
    package = REPO / "custom" / "fedesm"
    offenders = [str(p.relative_to(package)) for p in package.rglob("*.py")
                 if p.name != "paths.py" and ("parents[3]" in p.read_text() or "parents[2]" in p.read_text())]
    assert offenders == []
