"""Where a deployed round's time goes: the same job in simulation and deployed, ClientApps cold and warm.

``.venv/bin/python benchmarks/deploy_round.py [--model smollm2-135m] [--out FILE.json]`` (tiny model: about
4 minutes on 2 cores). One run does, on the same config (2 data owners, 2 local steps x batch 4 per round):
the simulation (Ray, 2 nodes), then one loopback federation (TLS, node authentication) twice: its SuperNodes
starting each message's ClientApp cold (``--cold-clientapps``, Flower's default) and forked warm
(fl_offsite.ops.warm_superexec). Each node logs, per training message, how long its process took to reach the
handler, the imports, the model load, the examples and the training; the rest of the round is messaging and
polling.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from test_deploy import federation, tiny_run_config  # noqa: E402 - the tests' federation, as a user starts it

from fl_offsite.files import write_json  # noqa: E402
from fl_offsite.ops.deployment import run_app  # noqa: E402
from fl_offsite.ops.flower_app import app_dir  # noqa: E402
from fl_offsite.ops.simulation import run_simulation_app  # noqa: E402

if __package__:  # python -m benchmarks.deploy_round, or imported
    from .common import tiny_model_folder
else:  # python benchmarks/deploy_round.py: this folder is sys.path[0]
    from common import tiny_model_folder

PHASES = {"process to handler": r"handler ([\d.]+) s after its process started",
          "imports": r"imports took ([\d.]+) s",
          "model": r"before training: model ([\d.]+) s",
          "examples": r"examples ([\d.]+) s\)",
          "training": r"steps, ([\d.]+) s, "}


def round_seconds(results: Path) -> list[float]:
    rounds = [json.loads(line) for line in (results / "metrics.jsonl").read_text().splitlines()]
    return [round(r["seconds"], 1) for r in rounds if r["round"] > 0]


def node_phases(log: str) -> dict[str, list[float]]:
    """Seconds per training message and phase, from a node's log."""
    return {phase: [float(v) for v in re.findall(pattern, log)] for phase, pattern in PHASES.items()}


def deployed(root: Path, model: str, cold: bool) -> dict:
    flags = ("--cold-clientapps",) if cold else ()
    with federation(root, ["127.0.0.1", "localhost"], "--host", "127.0.0.1") as fed:
        for name in ("alice", "bob"):
            fed.owner(name, *flags)
        start = time.perf_counter()
        run_app(app_dir(), "fl-offsite-deploy", tiny_run_config(Path(model), root / "results"), env=fed.env,
                stream=False)
        wall = time.perf_counter() - start
        phases = {name: node_phases(fed.log(name)) for name in ("alice", "bob")}
    return {"run_seconds": round(wall, 1), "round_seconds": round_seconds(root / "results"), "node_phases": phases}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a model folder or offline alias (default: a tiny random Llama)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "measurements" / "deploy_round.json")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="fl-offsite-deploy-round-"))
    os.environ["FL_OFFSITE_CACHE"] = str(root / "cache")
    model = args.model or str(tiny_model_folder(root / "model", tokenizer="byte"))

    start = time.perf_counter()
    run_simulation_app(app_dir(), {**tiny_run_config(Path(model), root / "sim"), "data.num-partitions": 2},
                       num_supernodes=2, stream=False)
    results = {"simulation": {"run_seconds": round(time.perf_counter() - start, 1),
                              "round_seconds": round_seconds(root / "sim")}}
    for mode in ("cold", "warm"):
        (root / mode).mkdir()
        results[mode] = deployed(root / mode, model, cold=mode == "cold")

    print(f"{'':28}{'run':>8}  per round")
    for mode, found in results.items():
        print(f"{mode:28}{found['run_seconds']:7.1f}s  {found['round_seconds']}")
    print("per training message, mean over nodes and rounds (s):")
    for mode in ("cold", "warm"):
        means = {phase: statistics.mean(v for node in results[mode]["node_phases"].values() for v in node[phase])
                 for phase in PHASES}
        results[mode]["phase_means"] = {k: round(v, 2) for k, v in means.items()}
        print(f"  {mode}: " + ", ".join(f"{k} {v:.2f}" for k, v in means.items()))
    write_json(args.out, {"model": args.model or "tiny", "load_average": os.getloadavg(), **results})
    print(f"wrote {args.out}; files in {root}")


if __name__ == "__main__":
    main()
