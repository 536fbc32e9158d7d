"""Rewrite the README's `make demo` excerpt from a real demo run.

    .venv/bin/python scripts/readme_demo_excerpt.py            # runs the demo (random-init backbone) in demo_readme/
    .venv/bin/python scripts/readme_demo_excerpt.py --from DIR  # a finished `fedesm demo --backbone random --out DIR`
    ... --check                                                # print the difference, change nothing (exit 1 if any)

Re-run it after any change that moves the demo's numbers; tests/integration/test_readme_demo.py fails until then.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    from fedesm.experiments.readme_excerpt import DATASET, demo_settings, excerpt_from_run, readme_block, with_excerpt

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from", dest="run", default=None, help="a finished demo's output folder (default: run one)")
    p.add_argument("--out", default=str(REPO / "demo_readme"), help="where to run the demo (default demo_readme/)")
    p.add_argument("--check", action="store_true", help="compare only; exit 1 when the README differs")
    args = p.parse_args(argv)
    run = args.run
    if run is None:
        from fedesm.experiments.demo import run_demo

        run_demo(args.out, dataset=DATASET, settings=demo_settings())
        run = args.out
    excerpt = excerpt_from_run(run)
    readme = REPO / "README.md"
    text = readme.read_text()
    if readme_block(text) == excerpt:
        print("README demo excerpt is up to date")
        return 0
    print(f"README block:\n{readme_block(text)}\n\nthis run:\n{excerpt}")
    if args.check:
        return 1
    readme.write_text(with_excerpt(text, excerpt))
    print(f"rewrote the demo excerpt in {readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
