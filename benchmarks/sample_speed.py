"""What the data-free ``model-samples`` corpus costs the model owner: texts per second of
``fl_offsite.data.corpora.sample_texts`` on the real model, the earlier settings (fp32, batches of 32)
and the current ones (bf16 weights and autocast, batches of 64) side by side in one run.

  .venv/bin/python benchmarks/sample_speed.py --texts 64 --length 160 --out benchmarks/measurements/sample_speed.json
"""
from __future__ import annotations

import argparse
import platform
import time

import torch

from fl_offsite.data.corpora import sample_texts
from fl_offsite.data.models import best_device, load_model
from fl_offsite.files import write_json

SETTINGS = {"before: fp32, batch 32": ("fp32", 32), "bf16, batch 32": ("bf16", 32),
            "after: bf16, batch 64": ("bf16", 64)}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--texts", type=int, default=64)
    parser.add_argument("--length", type=int, default=160, help="tokens per text (distillation's block size)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--out", default="benchmarks/measurements/sample_speed.json")
    return parser.parse_args(argv)


def measure(model, tokenizer, args) -> dict[str, dict]:
    """Each of SETTINGS, timed after a warm-up, printed as it finishes."""
    sample_texts(model, tokenizer, 2, 8, seed=0, batch_size=2, progress=False)  # warm-up
    rows = {}
    for name, (precision, batch) in SETTINGS.items():
        start = time.perf_counter()
        texts = sample_texts(model, tokenizer, args.texts, args.length, seed=1, batch_size=batch,
                             precision=precision, progress=False)
        seconds = time.perf_counter() - start
        rows[name] = {"precision": precision, "batch_size": batch, "texts": len(texts), "seconds": round(seconds, 1),
                      "texts_per_s": round(len(texts) / seconds, 3)}
        print(f"{name:24s} {len(texts)} texts of {args.length} tokens in {seconds:6.1f} s: "
              f"{len(texts) / seconds:.2f} texts/s", flush=True)
    return rows


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = best_device()
    model, tokenizer = load_model(args.model)
    model.to(device)
    rows = measure(model, tokenizer, args)
    base = rows["before: fp32, batch 32"]["texts_per_s"]
    for name, row in rows.items():
        print(f"{name:24s} {row['texts_per_s'] / base:.2f}x")
    write_json(args.out, {"model": args.model, "device": str(device), "threads": torch.get_num_threads(),
                          "machine": platform.machine(), "length": args.length, "rows": rows})


if __name__ == "__main__":
    main()
