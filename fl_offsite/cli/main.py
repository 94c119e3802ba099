"""The ``fl-offsite`` command line: every sub-command, from its module (models, runs, deploy)."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable

from fl_offsite.cli import deploy, models, runs
from fl_offsite.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fl-offsite", description="Federated offsite-tuning on Flower: split, "
                                     "distill, evaluate, simulate, compare and deploy.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for commands in (models, runs, deploy):
        commands.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ours, flower = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = build_parser()
    args = parser.parse_args(ours)
    if flower and args.command not in deploy.FLOWER_FLAGS:
        parser.error(f"flags after -- ({' '.join(flower)}) are Flower's: only "
                     f"{' and '.join(f'`fl-offsite {name}`' for name in deploy.FLOWER_FLAGS)} take them")
    args.flower_args = flower
    if not args.verbose:  # an unreachable hub is retried for a minute, a warning each time: our error says it once
        os.environ.setdefault("HF_HUB_VERBOSITY", "error")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    func: Callable[[argparse.Namespace], None] = args.func
    try:
        func(args)
    except UserError as err:  # one line, whatever the message holds
        message = " ".join(line.strip() for line in str(err).splitlines())
        print(f"fl-offsite {args.command}: error: {message}", file=sys.stderr)
        return 2
    return 0
