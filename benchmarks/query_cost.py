"""CPU seconds a data owner spends per query message, as a SuperNode spends them: a fresh process per message.

Each child process imports the ClientApp of one source tree, answers one ``query.node_profile`` or
``query.model_status`` message, and exits; its user + system CPU time is measured from the parent.
Pass several ``--source`` trees (e.g. a worktree of an older commit and ``.``) to compare them side by side.

    python -m benchmarks.query_cost --source ../before --source . --repeats 5
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

QUERIES = ("query.node_profile", "query.model_status")

# Runs in the child: one message through the ClientApp, then which heavy modules the answer imported.
CHILD = """
import sys, uuid
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity  # what Flower's runtime sets before a message
from fl_offsite.app.client_app import app
TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 7
kind, cache = sys.argv[1], sys.argv[2]
content = {"query.node_profile": {"profile": ConfigRecord({})},
           "query.model_status": {"model": ConfigRecord({"digest": "0123456789abcdef"})}}[kind]
msg = Message(RecordDict(content), dst_node_id=7, message_type=kind)
msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())
context = Context(run_id=1, node_id=7, node_config={"partition-id": 0, "cache-dir": cache}, state=RecordDict(),
                  run_config={})
reply = app(msg, context)
assert not reply.has_error(), reply.error
print(",".join(m for m in ("torch", "transformers", "peft") if m in sys.modules))
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", action="append", required=True, help="a source tree holding fl_offsite/")
    parser.add_argument("--repeats", type=int, default=5, help="child processes per query and source")
    parser.add_argument("--json", help="write the measurements here")
    return parser.parse_args(argv)


def cpu_seconds(source: Path, kind: str, cache: str) -> tuple[float, str]:
    """One child's CPU seconds (user + system) for one query, and the heavy modules it imported."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    env = {**os.environ, "PYTHONPATH": str(source), "FLWR_TELEMETRY_ENABLED": "0"}
    done = subprocess.run([sys.executable, "-c", CHILD, kind, cache], cwd=source, env=env, check=True,
                          capture_output=True, text=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    seconds = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return seconds, done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""


def measure(sources: list[Path], repeats: int) -> dict[str, dict[str, dict]]:
    """Median CPU seconds per query and source; rounds alternate the sources so drift hits them alike."""
    samples: dict[str, dict[str, list[float]]] = {str(s): {k: [] for k in QUERIES} for s in sources}
    imported: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as cache:
        for _ in range(repeats):
            for source in sources:
                for kind in QUERIES:
                    seconds, modules = cpu_seconds(source, kind, cache)
                    samples[str(source)][kind].append(seconds)
                    imported[str(source)] = modules
    return {source: {kind: {"median_cpu_s": statistics.median(values), "samples": values,
                            "heavy_imports": imported[source]} for kind, values in by_kind.items()}
            for source, by_kind in samples.items()}


def report(results: dict[str, dict[str, dict]]) -> None:
    first = next(iter(results))
    print(f"{'source':<32} {'query':<20} {'CPU s (median)':>14} {'vs first':>9}  heavy imports")
    for source, by_kind in results.items():
        for kind, row in by_kind.items():
            ratio = row["median_cpu_s"] / results[first][kind]["median_cpu_s"]
            print(f"{source[-32:]:<32} {kind:<20} {row['median_cpu_s']:>14.2f} {ratio:>8.2f}x  "
                  f"{row['heavy_imports'] or '-'}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    results = measure([Path(s).resolve() for s in args.source], args.repeats)
    report(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
