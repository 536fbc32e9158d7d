"""The `fedesm` command. Each sub-module registers its subcommands; none holds logic of its own."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from fedesm import __version__
from fedesm.errors import FedesmError

# Sub-modules of fedesm.cli, each exposing register(subparsers).
_COMMAND_MODULES = ["model", "data", "train", "job", "demo", "experiment", "poc"]


class _Parser(argparse.ArgumentParser):
    """argparse's usage errors as one line (and exit 2), like every other fedesm error."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="fedesm",
        description="Federated LoRA fine-tuning of ESM-2 for per-residue binding-site prediction (NVIDIA FLARE).",
    )
    parser.add_argument("--version", action="version", version=f"fedesm {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        importlib.import_module(f"fedesm.cli.{name}").register(sub)
    return parser


def _command_parser(parser: argparse.ArgumentParser, argv) -> argparse.ArgumentParser:
    """The innermost subcommand's parser that `argv` names (`fedesm job export ...` -> export's)."""
    for token in argv:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if subs and token in subs[0].choices:
            parser = subs[0].choices[token]
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # the usage of the (sub)command that was given them, not the top-level one
        _command_parser(parser, sys.argv[1:] if argv is None else argv).error(
            f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    # NVFLARE's own INFO lines (admin sessions, provisioning) say nothing a user acts on; --verbose shows them
    logging.getLogger("nvflare").setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except FedesmError as e:
        if args.verbose:
            raise
        print(f"fedesm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedesm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
