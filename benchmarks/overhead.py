"""Orchestration overhead: the same client training through Flower's simulation vs a plain loop.

1. ``fl_offsite.ops.simulation.run_simulation_app`` (what ``fl-offsite simulate`` runs): SuperLink,
   ``flwr run``, Ray, the ServerApp (split, one-time emulator delivery, rounds, server-side
   evaluation) and the ClientApps. Every log line is time-stamped as it arrives, so the wall
   time splits into phases; ``metrics.jsonl`` gives each round's time and each client's own
   ``train_local`` seconds.
2. A plain sequential loop in this process doing the same client work: load the delivered
   emulator (the very folder the simulation wrote), tokenize each partition with the client
   app's own function, and for every round and client run ``train_local`` with the settings
   the client app uses (same seeds, steps, batch), then FedAvg the adapters.

The difference is what orchestration costs (start-up, messaging, per-process model loads);
the server-side evaluation is reported apart (the loop does none).

  .venv/bin/python benchmarks/overhead.py                  # tiny model, 4 clients, 3 rounds
  .venv/bin/python benchmarks/overhead.py --model smollm2-135m --rounds 2 --steps 4
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
import torch
from transformers.utils import logging as hf_logging

from fl_offsite.config.settings import Settings, validate
from fl_offsite.data.models import resolve_model_path
from fl_offsite.ops.flower_app import app_dir
from fl_offsite.ops.simulation import run_simulation_app
from fl_offsite.run.folder import RunFolder

if __package__:  # python -m benchmarks.overhead, or imported
    from .common import Stamped, fresh_node_cache, tiny_model_folder
else:  # python benchmarks/overhead.py: this folder is sys.path[0]
    from common import Stamped, fresh_node_cache, tiny_model_folder


def simulate(config: dict, clients: int, echo: bool) -> tuple[float, list[tuple[float, str]]]:
    start = time.perf_counter()
    out = Stamped(start, sys.stdout if echo else None)
    with contextlib.redirect_stdout(out):
        run_simulation_app(app_dir(), config, num_supernodes=clients)
    out.write("\n")
    return time.perf_counter() - start, out.lines


def sequential(config: dict, clients: int, split_dir: Path) -> dict[str, float]:
    """The clients' work in one process, one after the other (what the simulation distributes)."""
    from fl_offsite.app.node_cache import ExampleSource, NodeCache
    from fl_offsite.app.owner import lr_schedule
    from fl_offsite.data.encode import pad_id
    from fl_offsite.data.models import load_model
    from fl_offsite.learn.train import train_local
    from fl_offsite.surgery.payload import get_payload, set_payload
    from fl_offsite.surgery.split import load_adapter, read_plan
    from fl_offsite.surgery.tuning import tuned_names

    t0 = time.perf_counter()
    emulator_dir = str(split_dir / "emulator")
    model, tokenizer = load_model(emulator_dir)
    plan = read_plan(split_dir)
    settings = Settings.from_config(config)
    names = tuned_names(settings.tuning, model, plan)  # what the client app trains and sends (the adapter)
    adapter, _ = load_adapter(split_dir / "adapter.safetensors")
    t_model = time.perf_counter()
    cache = NodeCache()
    data = [cache.features(ExampleSource(None, settings.task, settings.seed, settings.data, clients, pid, "emulator"),
                           tokenizer) for pid in range(clients)]
    t_data = time.perf_counter()
    lr_at = lr_schedule(settings.train.lr, settings.lr_schedule, settings.num_rounds)
    train_s = agg_s = 0.0
    for rnd in range(1, settings.num_rounds + 1):
        updates = []
        for pid in range(clients):
            set_payload(model, adapter, names)
            stats = train_local(model, set(names.values()), data[pid], settings.train.for_round(rnd, pid, lr_at(rnd)),
                                pad_id(tokenizer))
            train_s += stats.seconds
            updates.append((get_payload(model, names), len(data[pid])))
        a = time.perf_counter()
        total = sum(n for _, n in updates)
        adapter = {k: sum(u[k] * (n / total) for u, n in updates) for k in adapter}
        agg_s += time.perf_counter() - a
    end = time.perf_counter()
    return {"total_s": end - t0, "model_load_s": t_model - t0, "data_s": t_data - t_model, "train_local_s": train_s,
            "aggregate_s": agg_s, "loop_other_s": end - t_data - train_s - agg_s}


def timeline(lines: list[tuple[float, str]], num_rounds: int, total: float) -> list[tuple[str, float]]:
    """(phase, seconds) from the time-stamped log lines: each marker is looked for after the previous one."""
    markers = [("start-up: SuperLink, flwr run submitted", r"Starting logstream for run_id"),
               ("ServerApp: model owner loads the model, splits, writes the emulator", r"Split \d+-\d+-\d+ of"),
               ("Ray start-up: nodes connect", r"Sending the model"),
               ("one-time emulator delivery to every node", r"Starting \w+ strategy"),
               ("round 0: server-side evaluation (zero-shot plug-in + emulator)", r"Initial global evaluation")]
    for rnd in range(1, num_rounds + 1):
        markers += [(f"round {rnd}: clients train (incl. messaging{', first model load' if rnd == 1 else ''})",
                     r"aggregate_train: Received"),
                    (f"round {rnd}: aggregation", r"Global evaluation"),
                    (f"round {rnd}: server-side evaluation + checkpoint", r"MetricRecord: \{")]
    markers += [("ServerApp: final adapter saved, run ends", r"Results in")]
    points, i = [("start", 0.0)], 0
    for label, pattern in markers:
        j = next((k for k in range(i, len(lines)) if re.search(pattern, lines[k][1])), None)
        if j is None:
            continue
        points.append((label, lines[j][0]))
        i = j + 1
    points.append(("launcher: run status, processes stopped", total))
    return [(label, t - prev) for (_, prev), (label, t) in zip(points, points[1:], strict=False)]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help="tiny (random 6-block Llama, smollm2 tokenizer), "
                        "smollm2-135m, or a model folder")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4, help="local steps per round")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--split", default=None, help="adapter-layers,emulator-layers e.g. 2,2:8")
    parser.add_argument("--eval-limit", type=int, default=8, help="held-out examples evaluated per round")
    parser.add_argument("--loop-threads", type=int, default=1,
                        help="torch threads of the loop (default 1, as each simulated client: Ray gives a 1-CPU "
                             "actor OMP_NUM_THREADS=1)")
    parser.add_argument("--overlap", choices=("on", "off", "both"), default="both",
                        help="eval.overlap of the simulation: scoring a round while the next one trains; both: "
                             "one simulation each, side by side in this run")
    parser.add_argument("--workdir", help="keep the results here (default: a temporary folder)")
    parser.add_argument("--echo", action="store_true", help="show Flower's log")
    parser.add_argument("--out", help="write the results as JSON here")
    return parser.parse_args(argv)


def build_config(args, root: Path) -> dict:
    """The run config of the simulation (and of the loop), results under ``root``."""
    model = str(tiny_model_folder(root / "tiny-model", 6)) if args.model == "tiny" else resolve_model_path(args.model)
    adapter_layers, k = (args.split.split(":") if args.split else
                         (("1,1", "2") if args.model == "tiny" else ("2,2", "8")))
    return validate({
        "model": model, "task": "bbc-news", "method": "offsite", "num-rounds": args.rounds,
        "split.adapter-layers": adapter_layers, "split.emulator-layers": int(k),
        "train.local-steps": args.steps, "train.batch-size": args.batch, "train.max-length": args.max_length,
        "eval.limit": args.eval_limit, "data.num-partitions": args.clients, "results.dir": str(root / "sim"),
        "results.resume": False, "strategy.min-train-nodes": args.clients,
        "strategy.min-available-nodes": args.clients})


Simulated = tuple[float, list[tuple[float, str]], list]  # seconds, time-stamped log lines, round records


def measure(args) -> tuple[dict[str, Simulated], dict[str, float]]:
    """The simulation (per eval.overlap setting), then the loop on the emulator it delivered."""
    overlaps = {"on": ["on"], "off": ["off"], "both": ["off", "on"]}[args.overlap]
    sims: dict[str, Simulated] = {}
    with tempfile.TemporaryDirectory(prefix="fl-offsite-overhead-") as tmp:
        root = Path(args.workdir or tmp).resolve()
        root.mkdir(parents=True, exist_ok=True)
        print(f"overhead: {args.model}, {args.clients} clients, {args.rounds} rounds x {args.steps} steps x batch "
              f"{args.batch} (max {args.max_length} tokens), bbc-news, {os.cpu_count()} CPUs", flush=True)
        for overlap in overlaps:
            config = {**build_config(args, root / overlap), "eval.overlap": overlap == "on"}
            fresh_node_cache(root / overlap / "cache")  # no node has the emulator yet: the delivery really happens
            sim_total, lines = simulate(config, args.clients, args.echo)
            if args.workdir:
                (root / overlap / "stamped.log").write_text("".join(f"{t:8.2f} {line}\n" for t, line in lines))
            results = Path(Settings.from_config(config).results.dir)
            sims[overlap] = sim_total, lines, RunFolder(results).rounds()
            print(f"simulation (eval.overlap {overlap}) done in {sim_total:.1f} s", flush=True)
        print(f"sequential loop ({args.loop_threads} torch thread(s))...", flush=True)
        torch.set_num_threads(args.loop_threads)
        seq = sequential(config, args.clients, results / "split")
    return sims, seq


def report(args, sim_total: float, lines, rounds, seq: dict[str, float]) -> dict:
    """Print the timeline, the rounds and the comparison; the JSON result."""
    trained = [r for r in rounds if r.round > 0]
    client_train = sum(c.train_seconds for r in trained for c in r.clients)
    phases = timeline(lines, args.rounds, sim_total)
    eval_s = sum(s for label, s in phases if "evaluation" in label)
    print_timeline(phases, trained)
    print("\n| | simulation | sequential loop |\n|---|---|---|")
    print(f"| wall time | {sim_total:.1f} s | {seq['total_s']:.1f} s |")
    print(f"| of which train_local (sum over clients) | {client_train:.1f} s | {seq['train_local_s']:.1f} s |")
    print(f"| server-side evaluation (plug-in + emulator, each round + round 0) | {eval_s:.1f} s | not done |")
    print(f"| model load + tokenization | in the clients' first round | {seq['model_load_s'] + seq['data_s']:.1f} s |")
    slots = max(1, min(args.clients, os.cpu_count() or 1))  # Ray runs one 1-CPU client actor per CPU
    train_phase = sum(s for label, s in phases if "clients train" in label)
    ideal = sum(sum(c.train_seconds for c in r.clients) / slots for r in trained)
    fixed = sum(s for label, s in phases if not label.startswith("round"))
    print(f"\nWhere the simulation's time goes: fixed {fixed:.1f} s (start-up, owner split, Ray, one-time delivery, "
          f"shutdown); client phases {train_phase:.1f} s for {ideal:.1f} s of train_local spread over {slots} "
          f"parallel actors, i.e. {train_phase - ideal:.1f} s of per-round overhead (messaging, the actors' model "
          f"loads and tokenization); server-side evaluation {eval_s:.1f} s")
    ratio = sim_total / seq["total_s"]
    ratio_noeval = (sim_total - eval_s) / seq["total_s"]
    print(f"\nwall-time ratio simulation / loop: {ratio:.2f}x ({ratio_noeval:.2f}x without the server's evaluation); "
          f"orchestration adds {sim_total - eval_s - seq['total_s']:.1f} s to {seq['total_s']:.1f} s of client work")
    return {"args": vars(args), "simulation_s": sim_total, "sequential": seq, "client_train_s": client_train,
            "eval_s": eval_s, "fixed_s": fixed, "client_phase_s": train_phase, "client_phase_ideal_s": ideal,
            "phases": phases, "log": lines,
            "rounds": [{"round": r.round, "seconds": r.seconds, "train_s": [c.train_seconds for c in r.clients]}
                       for r in trained]}


def print_timeline(phases: list[tuple[str, float]], trained: list[dict]) -> None:
    print("\nSimulation timeline (from time-stamped log lines):")
    for label, seconds in phases:
        print(f"  {seconds:7.1f} s  {label}")
    print("\nPer round (metrics.jsonl: round time = sending the adapters to the checkpoint after evaluation):")
    for r in trained:
        ct = [c.train_seconds for c in r.clients]
        print(f"  round {r.round}: {r.seconds:.1f} s; client train_local s: "
              + ", ".join(f"{t:.1f}" for t in ct) + f" (sum {sum(ct):.1f}, max {max(ct):.1f})")


def main(argv=None) -> int:
    hf_logging.disable_progress_bar()
    args = parse_args(argv)
    sims, seq = measure(args)
    result = {}
    for overlap, sim in sims.items():
        print(f"\n## eval.overlap {overlap}")
        result[overlap] = report(args, *sim, seq)
    if len(sims) == 2:
        print(f"\nside by side: simulation / loop {sims['off'][0] / seq['total_s']:.2f}x with eval.overlap off, "
              f"{sims['on'][0] / seq['total_s']:.2f}x on ({sims['off'][0]:.1f} s -> {sims['on'][0]:.1f} s; loop "
              f"{seq['total_s']:.1f} s)")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
