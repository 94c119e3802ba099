"""A fleet's footprint model against measured client peaks, side by side in one run.

For each emulator size k: the model owner's estimate (``fl_offsite.app.fleet``: measured once, on the largest
emulator, then ``fixed + k * per_block``) beside the peak resident memory of a fresh process that does what
a node does: load the delivered emulator folder, store frozen weights at the client's precision, train
the adapter for a few steps at the run's batch and length. The child's resident memory before it loads
the model is the runtime overhead the estimate adds as ``fleet.overhead-mb``.

  python benchmarks/footprint.py --model smollm2-135m --ks 1,2,4,8 \\
      --out benchmarks/measurements/footprint_smollm2_cpu.json
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from fl_offsite.app.delivery import load_delivered
from fl_offsite.app.fleet import Footprint, measure_footprint
from fl_offsite.config.settings import DEFAULTS
from fl_offsite.data.models import load_model
from fl_offsite.emulator.recipe import EmulatorRecipe, prepare_emulator
from fl_offsite.files import write_json
from fl_offsite.learn.train import HALF, TrainSettings, half_frozen, train_local
from fl_offsite.surgery.payload import extract_adapter
from fl_offsite.surgery.split import EMULATOR_DIR, adapter_names, read_plan, write_split

if __package__:  # python -m benchmarks.footprint, or imported
    from .common import features, in_fresh_process, status_kb
else:  # python benchmarks/footprint.py: this folder is sys.path[0]
    from common import features, in_fresh_process, status_kb


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ks", default="1,2,4,8", help="emulator sizes (middle blocks); the largest is measured")
    parser.add_argument("--adapter-layers", default="2,2", help="bottom,top adapter blocks")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--overhead-mb", type=float, default=DEFAULTS["fleet.overhead-mb"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results/footprint.json")
    return parser.parse_args(argv)


def child(folder: str, args: argparse.Namespace) -> dict[str, float]:
    """Run in a fresh process: train on the emulator of the split ``folder`` as a node would; runtime and peak MB."""
    runtime = status_kb("VmRSS") / 1024
    Path("/proc/self/clear_refs").write_text("5")
    plan = read_plan(folder)
    model, _ = load_delivered(Path(folder) / EMULATOR_DIR)
    trainable = set(adapter_names(model, plan).values())
    if args.precision in HALF:
        half_frozen(model, trainable, HALF[args.precision])
    rows = features(model.config.vocab_size, args.batch_size * args.steps, args.max_length, answer=2)
    settings = TrainSettings(lr=1e-4, batch_size=args.batch_size, local_steps=args.steps, precision=args.precision)
    train_local(model, trainable, rows, settings, pad_id=0, desc="train")
    return {"runtime_mb": runtime, "peak_mb": status_kb("VmHWM") / 1024}


def measure(folder: Path, args: argparse.Namespace) -> dict[str, float]:
    """``child`` in a fresh process with ``args.threads`` OpenMP threads."""
    env = {"TQDM_DISABLE": "1", "OMP_NUM_THREADS": str(args.threads)}
    return in_fresh_process(child, str(folder), args, env=env)


def measure_rows(args: argparse.Namespace) -> tuple[list[dict], Footprint]:
    """Per emulator size, the owner's estimate beside a fresh node's measured peak; the footprint model."""
    ks = sorted(int(k) for k in args.ks.split(","))
    bottom, top = (int(n) for n in args.adapter_layers.split(","))
    model, tokenizer = load_model(args.model)
    rows, footprint = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for k in reversed(ks):  # the largest first: the owner measures its footprint model there
            plan, emulator, _ = prepare_emulator(args.model, model, tokenizer, EmulatorRecipe((bottom, top), k),
                                                 "bbc-news", progress=False)
            if footprint is None:
                footprint = measure_footprint(emulator, plan, set(adapter_names(emulator, plan).values()),
                                              args.batch_size, args.max_length, args.precision, args.overhead_mb)
            folder = write_split(Path(tmp) / f"k{k}", emulator, extract_adapter(emulator, plan), plan, tokenizer)
            del emulator
            measured = measure(folder, args)
            rows.append({"k": k, "split": plan.name, "estimate_mb": round(footprint.mb(k)),
                         **{key: round(v) for key, v in measured.items()},
                         "estimate_over_peak": round(footprint.mb(k) / measured["peak_mb"], 3)})
    rows.reverse()
    assert footprint is not None  # ks is not empty
    return rows, footprint


def report(args: argparse.Namespace, rows: list[dict], footprint: Footprint) -> None:
    print(f"\n{args.model}, batch {args.batch_size} x {args.max_length} tokens, {args.precision}, "
          f"fleet.overhead-mb = {args.overhead_mb:g}\n")
    print("| k | split | estimate MB | measured peak MB | estimate / peak | runtime before loading MB |")
    print("|---|-------|-------------|------------------|-----------------|---------------------------|")
    for r in rows:
        print(f"| {r['k']} | {r['split']} | {r['estimate_mb']} | {r['peak_mb']} | {r['estimate_over_peak']:.2f} | "
              f"{r['runtime_mb']} |")
    write_json(Path(args.out), {"settings": vars(args), "rows": rows,
                                "footprint": {"fixed_mb": footprint.fixed / 2**20,
                                              "per_block_mb": footprint.per_block / 2**20}})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    report(args, *measure_rows(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
