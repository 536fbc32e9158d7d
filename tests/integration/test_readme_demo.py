"""The README's `make demo` excerpt is what the demo prints: one real demo run (offline: random-init backbone,
GPSite ATP, the demo's settings), its table cut as `scripts/readme_demo_excerpt.py` cuts it."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def test_readme_demo_excerpt_equals_a_real_demo_run(tmp_path):
    from fedesm.experiments.demo import run_demo
    from fedesm.experiments.readme_excerpt import DATASET, demo_settings, excerpt_from_run, readme_block

    run_demo(tmp_path / "demo", dataset=DATASET, settings=demo_settings(), echo=lambda *a: None)
    excerpt = excerpt_from_run(tmp_path / "demo")
    assert readme_block((REPO / "README.md").read_text()) == excerpt, (
        "the README's demo excerpt is stale: run `.venv/bin/python scripts/readme_demo_excerpt.py`")
