"""Scale: many data owners on one machine; memory must stay flat round after round.

1. A Flower simulation (``fl_offsite.ops.simulation``) with ``--clients`` simulated nodes (one data
   partition each, IID), ``--sampled`` of them trained per round (``strategy.fraction-train``),
   on a tiny random model. A sampler thread reads, every ``--interval`` seconds, the memory
   of every process of the launch (found by the launch's ``FL_OFFSITE_LAUNCH`` environment tag,
   plus their children): RSS and PSS (proportional set size: shared pages such as torch's
   libraries divided among the processes that map them, so the sum does not double count)
   from ``/proc/PID/smaps_rollup``. Samples are mapped to rounds by the time-stamped
   ``round N: sent`` log lines; the table shows each round's peak and the growth per round.
2. Server aggregation memory vs the number of replies, in this process: FedAvg's
   ``aggregate_train`` wrapped by the project's ``OffsiteStrategy`` (as the ServerApp runs it)
   on N replies of an adapter-sized ArrayRecord, with ``tracemalloc`` measuring the peak
   *extra* memory of the call (numpy and Python allocations) beyond the replies themselves.

  .venv/bin/python benchmarks/scale.py                       # 100 nodes, 10 per round, 12 rounds
  .venv/bin/python benchmarks/scale.py --clients 20 --sampled 4 --rounds 3
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path

import psutil

from fl_offsite.config.settings import validate
from fl_offsite.ops.flower_app import app_dir
from fl_offsite.ops.flower_cli import tagged_processes
from fl_offsite.ops.simulation import run_simulation_app
from fl_offsite.run.folder import RunFolder

if __package__:  # python -m benchmarks.scale, or imported
    from .common import Stamped, fresh_node_cache, in_fresh_process, status_kb, tiny_model_folder
else:  # python benchmarks/scale.py: this folder is sys.path[0]
    from common import Stamped, fresh_node_cache, in_fresh_process, status_kb, tiny_model_folder

GROUPS = [("flwr-simulation", "ServerApp + simulation engine (flwr-simulation)"),
          ("ClientAppActor", "Ray client actors"), ("ray::", "Ray workers (other)"),
          ("raylet", "Ray raylet"), ("gcs_server", "Ray GCS"), ("flower-superlink", "SuperLink"),
          ("flower-superexec", "SuperExec"), ("flwr", "flwr CLI"), ("", "other (Ray helpers, dashboards)")]


KINDS = ("rss", "pss", "anon")  # resident, proportional (shared pages divided), the process's own heap
_FIELDS = {"Rss": "rss", "Pss": "pss", "Anonymous": "anon"}


def _rollup(pid: int) -> dict[str, int]:
    """RSS, PSS and anonymous memory in kB from /proc/PID/smaps_rollup."""
    out = dict.fromkeys(KINDS, 0)
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, value = line.split(":", 1)
        if name in _FIELDS:
            out[_FIELDS[name]] = int(value.split()[0])
    return out


def _group(process: psutil.Process) -> str:
    try:
        text = " ".join(process.cmdline()) or process.name()
    except psutil.Error:
        return "other (Ray helpers, dashboards)"
    return next(label for key, label in GROUPS if key in text)


class Sampler(threading.Thread):
    """Memory of every process of this launch, every ``interval`` seconds."""

    def __init__(self, start: float, interval: float) -> None:
        super().__init__(daemon=True)
        self.t0, self.interval, self.samples, self.stop = start, interval, [], threading.Event()
        self.prefix = f"{os.getpid()}:"

    def run(self) -> None:
        while not self.stop.is_set():
            t = time.perf_counter() - self.t0
            total = dict.fromkeys(KINDS, 0)
            groups: dict[str, list[int]] = {}
            processes = tagged_processes(lambda tag: tag.startswith(self.prefix))
            for process in processes:
                with contextlib.suppress(OSError, psutil.Error):
                    memory = _rollup(process.pid)
                    entry = groups.setdefault(_group(process), [0] * len(KINDS))
                    for i, kind in enumerate(KINDS):
                        total[kind] += memory[kind]
                        entry[i] += memory[kind]
            if processes:
                self.samples.append({"t": t, "n": len(processes), **{f"{k}_mb": v / 1024 for k, v in total.items()},
                                     "groups_mb": {k: [x / 1024 for x in v] for k, v in groups.items()}})
            self.stop.wait(self.interval)


def simulate(config: dict, clients: int, interval: float, echo: bool):
    start = time.perf_counter()
    out = Stamped(start, sys.stdout if echo else None)
    sampler = Sampler(start, interval)
    sampler.start()
    try:
        with contextlib.redirect_stdout(out):
            run_simulation_app(app_dir(), config, num_supernodes=clients)
    finally:
        sampler.stop.set()
        sampler.join()
    return time.perf_counter() - start, out.lines, sampler.samples


def per_round(lines, samples, num_rounds: int, total: float) -> list[dict]:
    """Samples grouped by phase: start-up + delivery (before round 1 is sent), then each round."""
    starts, finished = {}, total
    for t, line in lines:
        if "Strategy execution finished" in line:
            finished = t
        for rnd in range(1, num_rounds + 1):
            if f"round {rnd}: sent" in line and rnd not in starts:
                starts[rnd] = t
    bounds = [("start-up, delivery, round-0 eval", 0.0)] + [(f"round {r}", starts[r]) for r in sorted(starts)]
    out = []
    for i, (label, begin) in enumerate(bounds):
        end = bounds[i + 1][1] if i + 1 < len(bounds) else finished
        inside = [s for s in samples if begin <= s["t"] < end]
        if not inside:
            continue
        groups = {g for s in inside for g in s["groups_mb"]}
        out.append({"phase": label, "seconds": end - begin, "samples": len(inside),
                    "processes": max(s["n"] for s in inside),
                    "peak_rss_mb": max(s["rss_mb"] for s in inside), "peak_pss_mb": max(s["pss_mb"] for s in inside),
                    "median_rss_mb": statistics.median(s["rss_mb"] for s in inside),
                    "median_pss_mb": statistics.median(s["pss_mb"] for s in inside),
                    "groups_median_mb": {g: [statistics.median(s["groups_mb"].get(g, [0] * len(KINDS))[j]
                                                               for s in inside) for j in range(len(KINDS))]
                                         for g in groups}})
    return out


def aggregation_memory(payload_mb: float, counts: list[int]) -> list[dict]:
    """Peak extra memory of the ServerApp's aggregate_train (OffsiteStrategy around FedAvg) for N replies.

    Each N runs in a fresh process: the replies are built, the kernel's peak-RSS counter is
    reset (/proc/self/clear_refs), aggregate_train runs, and VmHWM - VmRSS(before) is its peak
    extra resident memory (torch and numpy alike); tracemalloc gives the numpy/Python part.
    """
    return [in_fresh_process(aggregation_child, payload_mb, [n])[0] for n in counts]


def aggregation_child(payload_mb: float, counts: list[int]) -> list[dict]:
    """Run in a fresh process (one N each, by ``aggregation_memory``): the rows of ``aggregation_memory``."""
    import torch
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
    from flwr.serverapp.strategy import FedAvg
    from flwr.supercore.task_identity import TaskIdentity

    from fl_offsite.run.folder import RunFolder as Folder
    from fl_offsite.testing.flower import NoOwner
    from strategies.offsite import OffsiteStrategy, RoundState
    from strategies.policy import Exchange, RoundPolicy

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1  # as the ServerApp process has
    n_tensors = 8
    per = int(payload_mb * 2**20 / 4 / n_tensors)
    reference = {f"layers.{i}.weight": torch.zeros(per) for i in range(n_tensors)}
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in counts:
            strategy = OffsiteStrategy(FedAvg(), NoOwner(), Folder(tmp),
                                       RoundPolicy(min_replies=1, seed=0, lr_at=lambda r: 1e-4), Exchange(reference))
            replies, sent = [], []
            for i in range(n):
                arrays = ArrayRecord({k: torch.full((per,), float(i)) for k in reference})
                content = RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": 10 + i})})
                msg = Message(content, dst_node_id=i + 1, message_type="train")
                msg.metadata.__dict__["_message_id"] = f"train-{i}"  # as the grid's push sets it
                sent.append(msg.metadata)
                replies.append(_as_reply(msg, content, i + 1))
            strategy._round = RoundState(start=time.perf_counter(), sent=sent, bytes_down={}, realign_down={},
                                         realign=None)
            held = sum(r.content["arrays"].count_bytes() for r in replies) / 2**20
            Path("/proc/self/clear_refs").write_text("5")
            rss_before = status_kb("VmRSS")
            tracemalloc.start()
            base = tracemalloc.get_traced_memory()[0]
            start = time.perf_counter()
            arrays, _ = strategy.aggregate_train(1, replies)
            seconds = time.perf_counter() - start
            peak = tracemalloc.get_traced_memory()[1] - base
            tracemalloc.stop()
            rss_peak = (status_kb("VmHWM") - rss_before) / 1024
            expected = sum((10 + i) * i for i in range(n)) / sum(10 + i for i in range(n))
            assert abs(float(arrays.to_torch_state_dict()["layers.0.weight"][0]) - expected) < 1e-3
            out.append({"replies": n, "replies_held_mb": held, "aggregate_peak_extra_mb": peak / 2**20,
                        "rss_peak_extra_mb": rss_peak, "seconds": seconds})
            del replies, arrays
    return out


def _as_reply(msg, content, node_id):
    """A reply Message from node ``node_id`` carrying ``content`` (what the Grid hands the strategy)."""
    from flwr.app import Message

    reply = Message(content, reply_to=msg)
    reply.metadata.__dict__["_src_node_id"] = node_id
    return reply


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=100, help="simulated nodes = data partitions")
    parser.add_argument("--sampled", type=int, default=10, help="nodes trained per round")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between memory samples")
    parser.add_argument("--aggregation-mb", type=float, default=16.0, help="payload size for the aggregation test")
    parser.add_argument("--aggregation-replies", default="1,10,25,50,100")
    parser.add_argument("--skip-simulation", action="store_true")
    parser.add_argument("--echo", action="store_true", help="show Flower's log")
    parser.add_argument("--out", help="write the results as JSON here")
    return parser.parse_args(argv)


def build_config(args, root: Path) -> dict:
    """The run config of the simulation: a tiny random Llama, IID partitions of bbc-news, results under ``root``."""
    model = tiny_model_folder(root / "tiny-model", layers=6, hidden=32, tokenizer="byte-bpe")
    return validate({
        "model": str(model), "task": "bbc-news", "method": "offsite", "num-rounds": args.rounds,
        "split.adapter-layers": "1,1", "split.emulator-layers": 2, "train.local-steps": args.steps,
        "train.batch-size": 4, "train.max-length": 64, "eval.limit": 8, "eval.batch-size": 8,
        "data.partitioner": "iid", "data.num-partitions": args.clients,
        "strategy.fraction-train": args.sampled / args.clients, "strategy.min-train-nodes": args.sampled,
        "strategy.min-available-nodes": args.clients, "results.dir": str(root / "run"),
        "results.resume": False})


def measure_simulation(args) -> tuple[float, list[tuple[float, str]], list[dict], list[dict]]:
    """Run the simulation in a temporary folder: seconds, time-stamped log lines, memory samples, round records."""
    with tempfile.TemporaryDirectory(prefix="fl-offsite-scale-") as tmp:
        root = Path(tmp)
        config = build_config(args, root)
        fresh_node_cache(root / "cache")
        print(f"scale: {args.clients} simulated nodes (IID partitions of bbc-news), {args.sampled} trained per "
              f"round, {args.rounds} rounds x {args.steps} steps, tiny random Llama; {os.cpu_count()} CPUs, "
              f"memory sampled every {args.interval} s", flush=True)
        total, lines, samples = simulate(config, args.clients, args.interval, args.echo)
        rounds = RunFolder(config["results.dir"]).rounds()
    return total, lines, samples, rounds


def report_simulation(args, total: float, lines, samples, rounds) -> dict:
    """Print the per-phase memory table and the growth per round; the JSON fields of the simulation."""
    phases = per_round(lines, samples, args.rounds, total)
    replies = [len(r.clients or []) for r in rounds if r.round > 0]
    print(f"\nsimulation: {total:.1f} s, {len(samples)} samples; replies per round {replies}")
    print("| phase | s | processes | peak RSS sum MB | median RSS sum MB | peak PSS sum MB | median PSS sum MB |")
    print("|---|---|---|---|---|---|---|")
    for p in phases:
        print(f"| {p['phase']} | {p['seconds']:.1f} | {p['processes']} | {p['peak_rss_mb']:.0f} | "
              f"{p['median_rss_mb']:.0f} | {p['peak_pss_mb']:.0f} | {p['median_pss_mb']:.0f} |")
    trained = [p for p in phases if p["phase"].startswith("round")]
    growth = report_growth(trained) if len(trained) >= 3 else {}
    return {**growth, "simulation_s": total, "phases": phases, "replies_per_round": replies, "samples": samples}


def report_growth(trained: list[dict]) -> dict:
    """Print the memory growth per round from round 2 on, in all and per process group; their JSON fields."""
    later = trained[1:]  # round 1 includes the actors' first model load and tokenization
    xs = list(range(len(later)))
    slopes = {kind: _slope(xs, [p[f"median_{kind}_mb"] for p in later]) for kind in ("rss", "pss")}
    print(f"growth per round from round 2 on (least squares over the rounds' medians): RSS sum "
          f"{slopes['rss']:+.2f} MB/round, PSS sum {slopes['pss']:+.2f} MB/round; peak PSS rounds "
          f"2..{len(trained)}: {min(p['peak_pss_mb'] for p in later):.0f}.."
          f"{max(p['peak_pss_mb'] for p in later):.0f} MB")
    groups = sorted({g for p in later for g in p["groups_median_mb"]})
    print("| process group | RSS MB round 2 | RSS MB last round | RSS MB/round | PSS MB/round | "
          "anonymous MB round 2 -> last | anonymous MB/round |\n|---|---|---|---|---|---|---|")
    out: dict = {}
    for g in groups:
        rss, pss, anon = ([p["groups_median_mb"].get(g, [0] * len(KINDS))[j] for p in later]
                          for j in range(len(KINDS)))
        print(f"| {g} | {rss[0]:.0f} | {rss[-1]:.0f} | {_slope(xs, rss):+.2f} | {_slope(xs, pss):+.2f} | "
              f"{anon[0]:.0f} -> {anon[-1]:.0f} | {_slope(xs, anon):+.2f} |")
        out.setdefault("group_slopes_mb_per_round", {})[g] = {
            kind: _slope(xs, values) for kind, values in zip(KINDS, (rss, pss, anon), strict=True)}
    out["slope_mb_per_round"] = slopes
    return out


def report_aggregation(args, agg: list[dict]) -> None:
    print(f"\nServer aggregation (OffsiteStrategy checks + Flower FedAvg.aggregate_train), payload "
          f"{args.aggregation_mb:.0f} MB per reply, one fresh process per row; extra = peak during the call "
          "beyond the replies already held:")
    print("| replies | replies held MB | peak extra RSS MB | peak extra numpy/Python MB (tracemalloc) | s |\n"
          "|---|---|---|---|---|")
    for row in agg:
        print(f"| {row['replies']} | {row['replies_held_mb']:.0f} | {row['rss_peak_extra_mb']:.1f} | "
              f"{row['aggregate_peak_extra_mb']:.1f} | {row['seconds']:.2f} |")


def main(argv=None) -> int:
    args = parse_args(argv)
    result: dict = {"args": vars(args)}
    if not args.skip_simulation:
        result.update(report_simulation(args, *measure_simulation(args)))
    counts = [int(x) for x in args.aggregation_replies.split(",")]
    result["aggregation"] = aggregation_memory(args.aggregation_mb, counts)
    report_aggregation(args, result["aggregation"])
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")
    return 0


def _slope(xs, ys) -> float:
    if len(xs) < 2:
        return 0.0
    mx, my = statistics.mean(xs), statistics.mean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else 0.0


if __name__ == "__main__":
    sys.exit(main())
