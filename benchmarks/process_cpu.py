"""Where a command's CPU goes, by process: run it, sample every process on the machine, and print the CPU
seconds of the processes that started (or ran) meanwhile, grouped by command line.

    python benchmarks/process_cpu.py [--every 0.3] [--top 25] [--json OUT] -- make test

The suite's CPU is spread over Flower processes, Ray actors and nodes that detach from the test run, so
``time`` (which counts waited-for children) misses much of it. Sampling misses at most the last ``--every``
seconds of each process, and processes shorter than that.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import psutil

Key = tuple[int, float]  # pid, start time: a pid can be reused


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def command_kind(cmdline: list[str], name: str, words: int = 3) -> str:
    """A process's group: the first ``words`` words of its command line, each without its folder."""
    return " ".join(word.rsplit("/", 1)[-1] for word in (cmdline or [name])[:words])


def sample(command: list[str], every: float) -> tuple[dict[str, list[float]], float, int]:
    """Run ``command``; CPU seconds used meanwhile per process, by :func:`command_kind`; wall seconds; exit code."""
    before: dict[Key, float] = {}
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            before[(process.pid, process.create_time())] = cpu_seconds(process)
    seen: dict[Key, tuple[str, float]] = {}
    start = time.perf_counter()
    child = subprocess.Popen(command)
    while child.poll() is None:
        for process in psutil.process_iter(["name", "cmdline"]):
            with contextlib.suppress(psutil.Error):
                key = (process.pid, process.create_time())
                used = cpu_seconds(process) - before.get(key, 0.0)
                kind = seen[key][0] if key in seen and not process.info["cmdline"] else \
                    command_kind(process.info["cmdline"], process.info["name"])  # a zombie has no command line
                seen[key] = (kind, used)
        time.sleep(every)
    by_kind: dict[str, list[float]] = defaultdict(list)
    for kind, used in seen.values():
        if used > 0:
            by_kind[kind].append(used)
    return by_kind, time.perf_counter() - start, child.returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--every", type=float, default=0.3, help="seconds between samples")
    parser.add_argument("--top", type=int, default=25, help="groups to print, most CPU first")
    parser.add_argument("--json", type=Path, help="write every group's CPU seconds and count here")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --")
    by_kind, wall, code = sample(command, args.every)
    groups = sorted(((sum(cpu), len(cpu), kind) for kind, cpu in by_kind.items()), reverse=True)
    for total, count, kind in groups[:args.top]:
        print(f"{total:8.1f} CPU s  x{count:<4d} {kind}")
    print(f"{sum(g[0] for g in groups):8.1f} CPU s in all, {wall:.1f} s wall, exit {code}")
    if args.json:
        args.json.write_text(json.dumps({"wall_s": wall, "exit": code, "groups": [
            {"kind": kind, "cpu_s": round(total, 2), "processes": count} for total, count, kind in groups]}, indent=1))
    return code


if __name__ == "__main__":
    sys.exit(main())
