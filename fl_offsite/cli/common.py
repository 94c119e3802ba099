"""What the sub-commands share: help texts, argument types, the user-input guard."""
from __future__ import annotations

import argparse
import functools
import logging
import sys
from collections.abc import Callable

from fl_offsite.config import sections
from fl_offsite.errors import UserError

log = logging.getLogger("fl_offsite")
TASK_HELP = "bbc-news, a suite task (piqa, siqa, boolq, ...), jsonl:<folder>, bigbench:<task>, hf:<name>"
RAY_ADDRESS_HELP = ("run the clients on this running Ray cluster (its head node, from `ray start --head`) instead "
                    "of a private Ray instance on this machine (docs/deployment.md)")
CPUS_HELP = ("CPUs of each simulated client (default: the file's compare.cpus-per-client, else 1); "
             "clients with 2 CPUs on a 2-core machine train one at a time on 2 threads")


def pair(text: str) -> tuple[int, int]:
    """``--adapter-layers``'s ``L,R``, parsed as ``split.adapter-layers`` is (an argparse error otherwise)."""
    try:
        return sections.pair(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def megabytes(tensors) -> float:
    """Size of the distinct storages (tied weights counted once)."""
    unique = {t.data_ptr(): t.numel() * t.element_size() for t in tensors}
    return sum(unique.values()) / 1e6


def user_input(func, *args, **kwargs):
    """Call ``func``; its ValueErrors come from user input (an unknown task, say)."""
    try:
        return func(*args, **kwargs)
    except ValueError as err:
        raise UserError(str(err)) from err


def stoppable(command: Callable[[argparse.Namespace], None]) -> Callable[[argparse.Namespace], None]:
    """A run command that Ctrl-C or SIGTERM stops (the launcher stops every process it started first): exit
    status 130 and how to resume, not a traceback."""
    @functools.wraps(command)
    def run(args: argparse.Namespace) -> None:
        try:
            command(args)
        except KeyboardInterrupt:
            print(f"fl-offsite {args.command}: stopped; every process it started has ended. The same command "
                  "resumes after the last finished round (results.resume = true)", file=sys.stderr)
            sys.exit(130)
    return run
