"""The ``fl-offsite`` command line."""
from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable

from fl_offsite.errors import UserError

log = logging.getLogger("fl_offsite")


def _pair(text: str) -> tuple[int, int]:
    try:
        left, right = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two integers 'L,R', got {text!r}") from None
    return left, right


def _megabytes(tensors) -> float:
    """Size of the distinct storages (tied weights counted once)."""
    unique = {t.data_ptr(): t.numel() * t.element_size() for t in tensors}
    return sum(unique.values()) / 1e6


def cmd_split(args: argparse.Namespace) -> None:
    from fl_offsite.models import load_model
    from fl_offsite.split import build_emulator, extract_adapter, plan_split, write_split

    start = time.perf_counter()
    model, tokenizer = load_model(args.model)
    plan = plan_split(model, *args.adapter_layers, emulator_layers=args.emulator_layers, drop_ratio=args.drop_ratio)
    emulator = build_emulator(model, plan)
    adapter = extract_adapter(model, plan)
    write_split(args.out, emulator, adapter, plan, tokenizer, record={"source_model": args.model})
    print(f"split {plan.name} of {args.model} ({plan.num_layers} blocks) -> {args.out}")
    print(f"  adapter blocks   {list(plan.adapter_layers)}  {_megabytes(adapter.values()):.1f} MB")
    print(f"  emulator blocks  {list(plan.kept_layers)}  {_megabytes(emulator.state_dict().values()):.1f} MB")
    print(f"  full model       {_megabytes(model.state_dict().values()):.1f} MB  ({time.perf_counter() - start:.1f} s)")


def cmd_plug_in(args: argparse.Namespace) -> None:
    from fl_offsite.io import atomic_dir
    from fl_offsite.models import load_model
    from fl_offsite.split import load_adapter, plug_in

    adapter, plan = load_adapter(args.adapter)
    model, tokenizer = load_model(args.model)
    plug_in(model, adapter, plan)
    with atomic_dir(args.out) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    print(f"plugged {len(adapter)} adapter tensors (blocks {list(plan.adapter_layers)}) into {args.model} -> {args.out}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fl-offsite", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    split = sub.add_parser("split", help="split a model into adapter + emulator")
    split.add_argument("model", help="local folder, hub id, or offline alias (smollm2-135m)")
    split.add_argument("--adapter-layers", type=_pair, default=(2, 2), metavar="L,R",
                       help="bottom,top blocks forming the adapter (default 2,2)")
    size = split.add_mutually_exclusive_group(required=True)
    size.add_argument("--emulator-layers", type=int, metavar="K", help="middle blocks the emulator keeps")
    size.add_argument("--drop-ratio", type=float, help="fraction of the middle blocks to drop")
    split.add_argument("--out", required=True, help="output folder")
    split.set_defaults(func=cmd_split)

    plug = sub.add_parser("plug-in", help="plug an adapter into the full model")
    plug.add_argument("model", help="the full model: folder, hub id, or offline alias")
    plug.add_argument("adapter", help="adapter.safetensors written by fl-offsite")
    plug.add_argument("--out", required=True, help="output model folder")
    plug.set_defaults(func=cmd_plug_in)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    func: Callable[[argparse.Namespace], None] = args.func
    try:
        func(args)
    except UserError as err:
        print(f"fl-offsite {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
