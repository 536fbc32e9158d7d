"""The README's `make demo` excerpt, made from a real demo run (the demo is deterministic).

`scripts/readme_demo_excerpt.py` runs the demo as `make demo` does offline (random-init backbone) and writes
the excerpt into README.md between its marker and the code fence; `tests/integration/test_readme_demo.py`
runs the same demo once and checks that the README's block equals what the run gives.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

README_MARKER = "<!-- demo excerpt: written by scripts/readme_demo_excerpt.py, checked by tests/integration/test_readme_demo.py -->"
DATASET = "ATP"  # what `make demo` runs


def demo_settings():
    """`fedesm demo --backbone random`'s settings: the demo's, with its random-init backbone."""
    from fedesm.experiments.demo import DEMO

    return DEMO.replace(model=DEMO.model.replace(backbone=None))


def excerpt_from_run(out_dir) -> str:
    """The excerpt's lines from a finished demo's folder: round 0's global model, round 1's site-1 and global
    model, every model of the last round, and the reference."""
    from fedesm import results
    from fedesm.experiments.demo import demo_table
    from fedesm.tables import read_table

    out = Path(out_dir)
    summary = json.loads((out / "summary.json").read_text())
    site_rows = read_table(results.output_dir(Path(summary["result_dir"])) / results.METRICS)
    global_rows = read_table(out / "global_test.jsonl")
    last = summary["rounds"]
    lines = demo_table(site_rows, global_rows, summary["reference_test"]).splitlines()
    keep = [lines[1]]  # the header (not the caption, not the rule)
    for line in lines[3:]:
        m = re.match(r"\s*(\d+)\s+(\S+)", line)
        if m is None:
            keep.append(line)  # the reference
        elif (int(m.group(1)), m.group(2)) in ((0, "global"), (1, "site-1"), (1, "global")) or int(m.group(1)) == last:
            keep.append(line)
    return "\n".join(keep)


def readme_block(readme_text: str) -> str:
    """The code block after the README's marker."""
    at = readme_text.index(README_MARKER)
    m = re.search(r"```\n(.*?)\n```", readme_text[at:], re.S)
    return m.group(1)


def with_excerpt(readme_text: str, excerpt: str) -> str:
    at = readme_text.index(README_MARKER)
    m = re.search(r"```\n(.*?)\n```", readme_text[at:], re.S)
    return readme_text[:at + m.start(1)] + excerpt + readme_text[at + m.end(1):]
