"""Commands on one model: split, distill, plug-in, eval, export-task."""
from __future__ import annotations

import argparse
import time

from fl_offsite.cli.common import TASK_HELP, megabytes, pair, user_input
from fl_offsite.config.sections import DistillSettings, EmulatorRecipe
from fl_offsite.config.settings import CHOICES, DEFAULTS
from fl_offsite.errors import UserError
from fl_offsite.files import check_replaceable

# ``distill --steps``'s default: in a run config distill.steps = 0 means no distillation, which this command,
# whose job is to distil, has no use for.
DISTILL_COMMAND_STEPS = 100


def cmd_split(args: argparse.Namespace) -> None:
    """``split`` and ``distill``: the model owner's emulator recipe, written as a split folder."""
    from fl_offsite.data.models import load_model
    from fl_offsite.emulator.distill import ppl_summary
    from fl_offsite.emulator.recipe import prepare_emulator
    from fl_offsite.run.tables import describe_composition
    from fl_offsite.surgery.payload import extract_adapter
    from fl_offsite.surgery.split import write_split

    check_replaceable(args.out, args.overwrite)
    start = time.perf_counter()
    distill = None
    if args.command == "distill":
        distill = DistillSettings(steps=args.steps, corpus=args.corpus, lr=args.lr, kd_weight=args.kd_weight,
                                  targets=args.targets, kl_weight=args.kl_weight, batch_size=args.batch_size,
                                  block_size=args.block_size, precision=args.precision, eval_every=args.eval_every,
                                  seed=args.seed)
    recipe = EmulatorRecipe(args.adapter_layers, emulator_layers=args.emulator_layers, drop_ratio=args.drop_ratio,
                            layers=args.layers, sharing=args.sharing, distill=distill, corpus=args.corpus,
                            public_in_domain=args.public_in_domain)
    model, tokenizer = load_model(args.model)
    plan, emulator, record = user_input(prepare_emulator, args.model, model, tokenizer, recipe, args.task,
                                         seed=args.seed)
    adapter = extract_adapter(model, plan)
    write_split(args.out, emulator, adapter, plan, tokenizer, record=record)
    print(f"split {plan.name} of {args.model} ({plan.num_layers} blocks, {recipe.describe()}) -> {args.out}")
    print(f"  adapter blocks   {list(plan.adapter_layers)}  {megabytes(adapter.values()):.1f} MB")
    print(f"  emulator blocks  {list(plan.kept_layers)}  {megabytes(emulator.state_dict().values()):.1f} MB"
          + (f", each run {plan.block_repeats()} times (shared)" if plan.shared else ""))
    print(f"  full model       {megabytes(model.state_dict().values()):.1f} MB  ({time.perf_counter() - start:.1f} s)")
    if distill:
        print(f"  {ppl_summary(record['distillation'])}; cached in {record['distilled_cache']}")
    composition = (record.get("distillation") or record).get("corpus_composition") or {}
    if composition.get("sources"):
        print(f"  public corpus    {describe_composition(composition)}")


def cmd_plug_in(args: argparse.Namespace) -> None:
    """Plug an adapter file (fl-offsite's, or any file keyed by full-model names) into the full model."""
    from fl_offsite.data.models import load_model
    from fl_offsite.files import atomic_dir, write_atomic
    from fl_offsite.run.card import model_card, usage
    from fl_offsite.surgery.payload import plug_in
    from fl_offsite.surgery.split import adapter_run, load_adapter, plan_from_names
    from fl_offsite.surgery.tuning import BOTTLENECK

    check_replaceable(args.out, args.overwrite)
    adapter, plan = load_adapter(args.adapter)
    if any(f".{BOTTLENECK}." in name for name in adapter):
        raise UserError(f"{args.adapter} holds bottleneck adapters, which a transformers model folder cannot "
                        f"hold; evaluate them with `fl-offsite eval {args.model} --adapter {args.adapter}`")
    model, tokenizer = load_model(args.model)
    plan = plan or plan_from_names(model, adapter)
    plug_in(model, adapter, plan)
    with atomic_dir(args.out) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        card = model_card(args.model, plan, adapter_run(args.adapter), usage("model", args.model, args.out))
        write_atomic(tmp / "README.md", card)
    print(f"plugged {len(adapter)} adapter tensors (blocks {list(plan.adapter_layers)}) into {args.model} "
          f"-> {args.out}")


def cmd_eval(args: argparse.Namespace) -> None:
    from fl_offsite.data.models import load_model
    from fl_offsite.data.tasks import load_task
    from fl_offsite.files import write_json
    from fl_offsite.learn.evaluate import evaluate_task
    from fl_offsite.run.tables import markdown_table
    from fl_offsite.surgery.payload import plug_in
    from fl_offsite.surgery.split import emulator_plan, load_adapter, plan_from_names
    from fl_offsite.surgery.tuning import prepare_for_adapter

    for name in ("limit", "batch_size"):
        if (value := getattr(args, name)) is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} {value}: give a positive number")
    model, tokenizer = load_model(args.model)
    if tokenizer is None:
        raise UserError(f"{args.model} has no tokenizer; evaluation needs one")
    if args.adapter:
        adapter, plan = load_adapter(args.adapter)
        plan = plan or emulator_plan(args.model) or plan_from_names(model, adapter)
        plug_in(prepare_for_adapter(model, adapter, plan), adapter, plan)
    task = user_input(load_task, args.task, seed=args.seed)
    result = evaluate_task(model, tokenizer, task, split=args.split, limit=args.limit, batch_size=args.batch_size)
    result = {"model": args.model, "adapter": args.adapter or "", **result}
    print(markdown_table(["model", "task", "n", "acc", "acc_norm", "examples/s"], [[
        args.model, str(result["task"]), str(result["n"]), f"{result['acc']:.3f} ± {result['acc_stderr']:.3f}",
        f"{result['acc_norm']:.3f} ± {result['acc_norm_stderr']:.3f}", f"{result['examples_per_s']:.1f}"]]))
    if args.json:
        write_json(args.json, result)


def cmd_export_task(args: argparse.Namespace) -> None:
    """A task as an lm-evaluation-harness task folder (scored offline with ``lm_eval --include_path``)."""
    from fl_offsite.data.tasks import load_task
    from fl_offsite.run.lm_eval_export import export_lm_eval_task

    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit {args.limit}: give a positive number")
    task = user_input(load_task, args.task, seed=args.seed)
    name = export_lm_eval_task(task, args.split, args.out, limit=args.limit)
    print(f"lm-eval task {name} in {args.out}; score a model folder (e.g. one from plug-in) with\n"
          f"  lm_eval --model hf --model_args pretrained=MODEL_FOLDER --tasks {name} --include_path {args.out}")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """This module's sub-commands, each bound to its handler above."""
    split = _split_parser(sub, "split", "split a model into adapter + emulator (layer drop by a rule)")
    split.set_defaults(func=cmd_split)

    distill = _split_parser(sub, "distill", "split, then distill the emulator's middle blocks on public text (cached)")
    distill.add_argument("--steps", type=int, default=DISTILL_COMMAND_STEPS)
    distill.add_argument("--lr", type=float, default=DistillSettings.lr)
    distill.add_argument("--kd-weight", type=float, default=DistillSettings.kd_weight,
                         help="weight of the hidden-state loss (paper: 30)")
    distill.add_argument("--targets", choices=CHOICES["distill.targets"], default=DistillSettings.targets,
                         help="hidden states matched: the middle's output, or every kept middle block")
    distill.add_argument("--kl-weight", type=float, default=DistillSettings.kl_weight,
                         help="weight of KL(full || emulator) on the logits")
    distill.add_argument("--batch-size", type=int, default=DistillSettings.batch_size)
    distill.add_argument("--block-size", type=int, default=DistillSettings.block_size, help="tokens per sequence")
    distill.add_argument("--precision", choices=CHOICES["distill.precision"], default=DistillSettings.precision)
    distill.add_argument("--eval-every", type=int, default=DistillSettings.eval_every,
                         help="steps between held-out perplexities")
    distill.set_defaults(func=cmd_split)

    plug = sub.add_parser("plug-in", help="plug an adapter into the full model")
    plug.add_argument("model", help="the full model: folder, hub id, or offline alias")
    plug.add_argument("adapter", help="adapter.safetensors: fl-offsite's, or any keyed by full-model names")
    plug.add_argument("--out", required=True, help="output model folder")
    plug.add_argument("--overwrite", action="store_true", help="replace --out even if fl-offsite did not write it")
    plug.set_defaults(func=cmd_plug_in)

    evaluate = sub.add_parser("eval", help="score a model (optionally with an adapter) on a task")
    evaluate.add_argument("model", help="folder (also an emulator folder), hub id, or offline alias")
    evaluate.add_argument("--task", required=True, help=TASK_HELP)
    evaluate.add_argument("--adapter", help="adapter.safetensors to plug in first (keyed by full-model names)")
    evaluate.add_argument("--split", default="test", choices=["train", "validation", "test"])
    evaluate.add_argument("--limit", type=int, help="evaluate the first N examples")
    evaluate.add_argument("--batch-size", type=int, default=DEFAULTS["eval.batch-size"])
    evaluate.add_argument("--seed", type=int, default=DEFAULTS["seed"], help="seed of the task's data split")
    evaluate.add_argument("--json", help="write the results as JSON here")
    evaluate.set_defaults(func=cmd_eval)

    export = sub.add_parser("export-task", help="write a task as an lm-evaluation-harness task folder")
    export.add_argument("task", help=TASK_HELP)
    export.add_argument("--out", required=True, help="output folder (for lm_eval --include_path)")
    export.add_argument("--split", default="test", choices=["train", "validation", "test"])
    export.add_argument("--limit", type=int, help="the first N examples")
    export.add_argument("--seed", type=int, default=DEFAULTS["seed"], help="seed of the task's data split")
    export.set_defaults(func=cmd_export_task)


def _split_parser(sub, name: str, help_text: str) -> argparse.ArgumentParser:
    """A sub-command that splits a model: model, --adapter-layers, --emulator-layers | --drop-ratio, --out."""
    parser = sub.add_parser(name, help=help_text)
    parser.add_argument("model", help="local folder, hub id, or offline alias (smollm2-135m, gemma3-270m)")
    parser.add_argument("--adapter-layers", type=pair, default=EmulatorRecipe().adapter, metavar="L,R",
                        help=f"bottom,top blocks forming the adapter (default {DEFAULTS['split.adapter-layers']})")
    size = parser.add_mutually_exclusive_group(required=True)
    size.add_argument("--emulator-layers", type=int, metavar="K", help="middle blocks the emulator keeps")
    size.add_argument("--drop-ratio", type=float, help="fraction of the middle blocks to drop")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--overwrite", action="store_true", help="replace --out even if fl-offsite did not write it")
    parser.add_argument("--layers", choices=CHOICES["emulator.layers"], default=DEFAULTS["emulator.layers"],
                        help="which middle blocks the emulator keeps (fl_offsite.emulator.layer_choice)")
    parser.add_argument("--sharing", action="store_true",
                        help="each kept middle block also runs in the dropped slots before it (CRaSh's layer "
                             "sharing): the emulator keeps the full depth, its weights stay k blocks")
    parser.add_argument("--corpus", default=DEFAULTS["distill.corpus"],
                        help="the owner's public text: public | public:<source>,... | model-samples | "
                             "hf:<datasets path>[:<config>]")
    parser.add_argument("--task", default=DEFAULTS["task"],
                        help="the task the data owners tune on: its text is refused as the corpus")
    parser.add_argument("--public-in-domain", action="store_true",
                        help="the owner holds public text of the task's domain (allows the task's corpus)")
    parser.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    return parser
