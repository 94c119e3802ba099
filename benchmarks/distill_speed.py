"""What emulator distillation costs the model owner: fl_offsite.emulator.distill.distill at its default settings.

The model is built from a config with random weights (speed does not depend on the values):
a folder holding config.json and the tokenizer files is enough (no weights needed), e.g. the
smollm2-135m offline model's folder. The split is the project's default (2-8-2), the text
bbc-news (speed depends on the block count and size only). Reported: the whole call (steps +
the held-out perplexity evaluations it does) and, timing one held-out evaluation apart, the
training steps alone; when the settings have a ``precision``, the default and then bf16.

  .venv/bin/python benchmarks/distill_speed.py --model ~/.cache/fl-offsite/models/smollm2-135m
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from fl_offsite.config.sections import DistillSettings
from fl_offsite.data.corpora import load_text_corpus
from fl_offsite.emulator.distill import distill, held_out_texts
from fl_offsite.learn.evaluate import perplexity
from fl_offsite.surgery.split import build_emulator, plan_split


def run(model, tokenizer, plan, settings, device) -> dict:
    """One call of distill() on a fresh emulator, timed; the held-out evaluation timed apart."""
    emulator = build_emulator(model, plan).to(device)
    held_out = held_out_texts(load_text_corpus(settings.corpus, "validation", settings.seed), settings)
    texts = {"train_texts": load_text_corpus(settings.corpus, "train", settings.seed), "held_out": held_out}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync()
    start = time.perf_counter()
    record = distill(model, emulator, plan, tokenizer, settings, **texts, progress=False)
    sync()
    total = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    t0 = time.perf_counter()
    perplexity(emulator, tokenizer, held_out, block_size=256, progress=False)
    sync()
    eval_emulator = time.perf_counter() - t0
    t0 = time.perf_counter()
    perplexity(model, tokenizer, held_out, block_size=256, progress=False)
    sync()
    eval_full = time.perf_counter() - t0
    evals = len(record["perplexity"])
    steps_s = max(total - eval_full - evals * eval_emulator, 1e-9)
    result = {"settings": dataclasses.asdict(settings), "seconds_total": total,
              "held_out_eval_s": {"emulator": eval_emulator, "full": eval_full, "emulator_evals": evals},
              "seconds_steps": steps_s, "steps_per_s": settings.steps / steps_s,
              "tokens_per_s": settings.steps * settings.batch_size * settings.block_size / steps_s,
              "peak_memory_mb": peak, "record": {k: record.get(k) for k in
                                                 ("seconds", "train_steps_per_s", "eval_seconds")}}
    print(f"{settings.precision}: {settings.steps} steps of batch {settings.batch_size} x "
          f"{settings.block_size}: {total:.1f} s in all ({evals} held-out evaluations of the emulator, "
          f"{eval_emulator:.2f} s each, full model {eval_full:.2f} s); steps alone {steps_s:.1f} s = "
          f"{result['steps_per_s']:.2f} steps/s, {result['tokens_per_s']:.0f} tokens/s"
          + (f"; peak GPU memory {peak:.0f} MB" if peak else "") + f"; distill's own record {result['record']}",
          flush=True)
    return result


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="folder with config.json and a tokenizer (weights unused)")
    parser.add_argument("--split", default="2-8-2", help="l-k-r")
    parser.add_argument("--corpus", default="bbc-news", help="text corpus (speed depends on its length only)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=100, help="distillation steps")
    parser.add_argument("--batch-size", type=int, help="override DistillSettings.batch_size")
    parser.add_argument("--block-size", type=int, help="override DistillSettings.block_size")
    parser.add_argument("--out", help="write the result as JSON here")
    return parser.parse_args(argv)


def build(args, device: torch.device):
    """The model (random weights, seed 0, on ``device``), its tokenizer and the split plan."""
    bottom, k, top = (int(x) for x in args.split.split("-"))
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.model), dtype=torch.float32).eval()
    return model, tokenizer, plan_split(model, bottom, top, emulator_layers=k)


def main(argv=None) -> int:
    args = parse_args(argv)
    overrides = {k: v for k, v in (("steps", args.steps), ("batch_size", args.batch_size),
                                   ("block_size", args.block_size)) if v is not None}
    settings = dataclasses.replace(DistillSettings(), corpus=args.corpus, **overrides)
    device = torch.device(args.device)
    model, tokenizer, plan = build(args, device)
    print(f"distilling {args.model} (random weights), split {plan.name}, on {device}: {settings}", flush=True)
    result = {"model": args.model, "split": plan.name, "device": str(device),
              "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
              "torch": torch.__version__, "machine": platform.platform(), "runs": {}}
    variants = {"default": settings}
    if settings.precision != "bf16":
        variants["bf16"] = dataclasses.replace(settings, precision="bf16")
    for name, variant in variants.items():
        result["runs"][name] = run(model, tokenizer, plan, variant, device)
        if args.out:  # after each run: a timeout in the next keeps this one
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
