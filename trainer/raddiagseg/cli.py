"""`raddiagseg` command line.

Each subpackage owns its commands: it exposes `register(subparsers)` that adds them and
sets `func` on each parser. Modules listed here are imported at start-up, so they must keep
heavy imports (torch, transformers) inside the command functions.
"""

import argparse
import importlib
import logging
import sys

COMMAND_MODULES = (
    "raddiagseg.model.commands",  # describe
    "raddiagseg.data.commands",  # phantoms, build, stats
    "raddiagseg.training.commands",  # train, demo
    "raddiagseg.evaluation.commands",  # score, predict
    "raddiagseg.domain",  # domain-stats
)


class CommandError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


def build_parser():
    parser = argparse.ArgumentParser(prog="raddiagseg", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    try:
        result = args.func(args)
    except (CommandError, FileNotFoundError, ValueError) as exc:
        print(f"raddiagseg {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
