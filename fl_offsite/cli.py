"""The ``fl-offsite`` command line."""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Callable

from fl_offsite.config.keys import CHOICES, DEFAULTS, DISTILL_COMMAND_STEPS, DistillSettings, adapter_layers
from fl_offsite.errors import UserError
from fl_offsite.ops.flower_cli import app_dir

log = logging.getLogger("fl_offsite")
TASK_HELP = "bbc-news, a suite task (piqa, siqa, boolq, ...), jsonl:<folder>, bigbench:<task>, hf:<name>"


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
    """``split`` and ``distill``: the model owner's emulator recipe, written as a split folder."""
    from fl_offsite.data.models import load_model
    from fl_offsite.emulator.distill import ppl_summary
    from fl_offsite.emulator.recipe import EmulatorRecipe, prepare_emulator
    from fl_offsite.run.tables import describe_composition
    from fl_offsite.surgery.payload import extract_adapter
    from fl_offsite.surgery.split import write_split

    start = time.perf_counter()
    distill = None
    if args.command == "distill":
        distill = DistillSettings(steps=args.steps, corpus=args.corpus, lr=args.lr, kd_weight=args.kd_weight,
                                  targets=args.targets, kl_weight=args.kl_weight, batch_size=args.batch_size,
                                  block_size=args.block_size, precision=args.precision, eval_every=args.eval_every,
                                  seed=args.seed)
    recipe = EmulatorRecipe(*args.adapter_layers, emulator_layers=args.emulator_layers, drop_ratio=args.drop_ratio,
                            layers=args.layers, distill=distill, corpus=args.corpus,
                            public_in_domain=args.public_in_domain)
    model, tokenizer = load_model(args.model)
    plan, emulator, record = _user_input(prepare_emulator, args.model, model, tokenizer, recipe, args.task,
                                         seed=args.seed)
    adapter = extract_adapter(model, plan)
    write_split(args.out, emulator, adapter, plan, tokenizer, record=record)
    print(f"split {plan.name} of {args.model} ({plan.num_layers} blocks, {recipe.describe()}) -> {args.out}")
    print(f"  adapter blocks   {list(plan.adapter_layers)}  {_megabytes(adapter.values()):.1f} MB")
    print(f"  emulator blocks  {list(plan.kept_layers)}  {_megabytes(emulator.state_dict().values()):.1f} MB")
    print(f"  full model       {_megabytes(model.state_dict().values()):.1f} MB  ({time.perf_counter() - start:.1f} s)")
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
    task = _user_input(load_task, args.task, seed=args.seed)
    result = evaluate_task(model, tokenizer, task, split=args.split, limit=args.limit, batch_size=args.batch_size)
    result = {"model": args.model, "adapter": args.adapter, **result}
    print(markdown_table(["model", "task", "n", "acc", "acc_norm", "examples/s"], [[
        args.model, result["task"], str(result["n"]), f"{result['acc']:.3f} ± {result['acc_stderr']:.3f}",
        f"{result['acc_norm']:.3f} ± {result['acc_norm_stderr']:.3f}", f"{result['examples_per_s']:.1f}"]]))
    if args.json:
        write_json(args.json, result)


def cmd_export_task(args: argparse.Namespace) -> None:
    """A task as an lm-evaluation-harness task folder (scored offline with ``lm_eval --include_path``)."""
    from fl_offsite.data.tasks import load_task
    from fl_offsite.run.lm_eval_export import export_lm_eval_task

    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit {args.limit}: give a positive number")
    task = _user_input(load_task, args.task, seed=args.seed)
    name = export_lm_eval_task(task, args.split, args.out, limit=args.limit)
    print(f"lm-eval task {name} in {args.out}; score a model folder (e.g. one from plug-in) with\n"
          f"  lm_eval --model hf --model_args pretrained=MODEL_FOLDER --tasks {name} --include_path {args.out}")


def cmd_simulate(args: argparse.Namespace) -> None:
    from pathlib import Path

    from fl_offsite.config.keys import load_file, parse_sets, validate
    from fl_offsite.config.settings import Settings
    from fl_offsite.ops.preflight import check_runnable
    from fl_offsite.ops.simulation import run_simulation_app
    from fl_offsite.run.folder import RunFolder
    from fl_offsite.run.tables import round_table

    config = validate({**(load_file(args.config) if args.config else {}), **parse_sets(args.set)})
    results = str(Path(Settings.from_config(config).results.dir).expanduser().resolve())
    config.update({"results.dir": results, "data.num-partitions": args.num_clients})
    check_runnable(Settings.from_config(config), args.num_clients)
    run_simulation_app(app_dir(), config, num_supernodes=args.num_clients, cpus_per_client=args.cpus_per_client,
                       gpus_per_client=args.gpus_per_client)
    run = RunFolder(results)
    print(round_table(run.rounds()))
    if distillation := run.distillation():
        from fl_offsite.emulator.distill import ppl_summary

        print(f"distilled emulator, {ppl_summary(distillation)}")
    print(f"results: {results}")


CPUS_HELP = ("CPUs of each simulated client (default: the file's compare.cpus-per-client, else 1); "
             "clients with 2 CPUs on a 2-core machine train one at a time on 2 threads")


def cmd_compare(args: argparse.Namespace) -> None:
    from fl_offsite.config.keys import parse_sets
    from fl_offsite.run.compare import load_compare_config, run_compare

    plan = load_compare_config(args.config, parse_sets(args.set), cpus_per_client=args.cpus_per_client)
    report = run_compare(plan)
    print(report.read_text().split("![")[0].rstrip())
    print(f"\nreport: {report}\nplots:  {plan.out / 'accuracy.png'}, {plan.out / 'client_cost.png'}")


def cmd_demo(args: argparse.Namespace) -> None:
    """The README's main job: the demo comparison shipped in simulations/demo.toml."""
    args.config = str(app_dir() / "simulations" / "demo.toml")
    cmd_compare(args)


def cmd_certs(args: argparse.Namespace) -> None:
    from fl_offsite.ops.certs import make_certs

    out = make_certs(args.out, args.host, days=args.days, overwrite=args.overwrite)
    print(f"CA and server certificate for {', '.join(args.host)} in {out}:\n"
          f"  SuperLink (model owner) uses ca.crt, server.pem, server.key: fl-offsite superlink --certs {out}\n"
          f"  every SuperNode (data owner) gets a copy of ca.crt only:    fl-offsite supernode --ca ca.crt ...\n"
          f"  keep ca.key offline; it signs new server certificates")


def cmd_node_key(args: argparse.Namespace) -> None:
    from fl_offsite.ops.certs import make_node_key

    private, public = make_node_key(args.out, args.name, overwrite=args.overwrite)
    print(f"private key {private} (stays on this node: fl-offsite supernode --key {private})\n"
          f"public key  {public} (send to the model owner: fl-offsite superlink --node-key {public.name})")


def cmd_superlink(args: argparse.Namespace) -> None:
    from pathlib import Path

    from fl_offsite.ops.deployment import SuperLinkSettings, serve_superlink

    settings = SuperLinkSettings(
        certs=None if args.insecure else Path(args.certs).expanduser(), host=args.host, port=args.port,
        node_keys=tuple(Path(k).expanduser() for k in args.node_key), node_auth=not args.no_node_auth,
        database=Path(args.database).expanduser() if args.database else None, connection=args.connection)
    if code := serve_superlink(settings):
        sys.exit(code)


def cmd_supernode(args: argparse.Namespace) -> None:
    from pathlib import Path

    from fl_offsite.ops.deployment import SuperNodeSettings, serve_supernode

    def path(value):
        return Path(value).expanduser() if value else None
    settings = SuperNodeSettings(
        superlink=args.superlink, ca=None if args.insecure else path(args.ca), key=path(args.key),
        data_path=path(args.data_path), cache_dir=path(args.cache_dir), partition_id=args.partition_id,
        num_partitions=args.num_partitions, memory_budget_mb=args.memory_budget_mb,
        emulator_layers=args.emulator_layers, port=args.port)
    if code := serve_supernode(settings):
        sys.exit(code)


def cmd_run(args: argparse.Namespace) -> None:
    from pathlib import Path

    from fl_offsite.config.keys import load_file, parse_sets, validate
    from fl_offsite.config.settings import Settings
    from fl_offsite.ops.deployment import run_app
    from fl_offsite.run.folder import RunFolder
    from fl_offsite.run.tables import round_table

    overrides = {**(load_file(args.config) if args.config else {}), **parse_sets(args.set)}
    config = validate(overrides)
    results = str(Path(Settings.from_config(config).results.dir).expanduser().resolve())
    overrides["results.dir"] = config["results.dir"] = results
    run_app(app_dir(), args.connection, {k: config[k] for k in overrides})
    print(round_table(RunFolder(results).rounds()))
    print(f"results: {results} (on the SuperLink's machine)")


def _user_input(func, *args, **kwargs):
    """Call ``func``; its ValueErrors come from user input (an unknown task, say)."""
    try:
        return func(*args, **kwargs)
    except ValueError as err:
        raise UserError(str(err)) from err


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fl-offsite", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

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

    simulate = sub.add_parser("simulate", help="run the federated app on Flower's simulation engine (Ray)")
    simulate.add_argument("config", nargs="?", help="TOML file of run-config keys (see pyproject.toml)")
    simulate.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a key")
    simulate.add_argument("--num-clients", type=int, default=4, help="simulated data owners (SuperNodes)")
    simulate.add_argument("--cpus-per-client", type=int, default=1)
    simulate.add_argument("--gpus-per-client", type=float, default=0.0)
    simulate.set_defaults(func=cmd_simulate)

    compare = sub.add_parser("compare", help="run several methods on the same data; write a report with plots")
    compare.add_argument("config", help="TOML file: run-config keys plus compare.methods, compare.num-clients, "
                                        "compare.out")
    compare.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a key")
    compare.add_argument("--cpus-per-client", type=int, help=CPUS_HELP)
    compare.set_defaults(func=cmd_compare)

    demo = sub.add_parser("demo", help="the main job: offsite-tuning vs FedAvg full fine-tuning on smollm2-135m")
    demo.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a key")
    demo.add_argument("--cpus-per-client", type=int, help=CPUS_HELP)
    demo.set_defaults(func=cmd_demo)

    # Deployment: a SuperLink (model owner) and SuperNodes (data owners); see docs/deployment.md.
    certs = sub.add_parser("certs", help="make a CA and the SuperLink's TLS certificate for the given hosts")
    certs.add_argument("--host", action="append", required=True,
                       help="name or IP address the SuperLink is reached at (repeat for several)")
    certs.add_argument("--out", default="certs", help="output folder (default ./certs)")
    certs.add_argument("--days", type=int, default=365, help="validity in days")
    certs.add_argument("--overwrite", action="store_true")
    certs.set_defaults(func=cmd_certs)

    node_key = sub.add_parser("node-key", help="make a data owner's SuperNode key pair (NAME, NAME.pub)")
    node_key.add_argument("name", help="a name for the node, e.g. hospital-a")
    node_key.add_argument("--out", default="keys", help="output folder (default ./keys)")
    node_key.add_argument("--overwrite", action="store_true")
    node_key.set_defaults(func=cmd_node_key)

    link = sub.add_parser("superlink", help="model owner: run the SuperLink (TLS and node authentication)")
    link.add_argument("--certs", default="certs", help="folder from `fl-offsite certs` (default ./certs)")
    link.add_argument("--host", default="0.0.0.0", help="address to listen on (default all interfaces)")
    link.add_argument("--port", type=int, default=9093, help="the one port SuperNodes and flwr connect to")
    link.add_argument("--node-key", action="append", default=[], metavar="KEY.pub",
                      help="public key (or folder of *.pub) of a data owner allowed to join; repeat")
    link.add_argument("--no-node-auth", action="store_true", help="let any node with the CA join (loopback only)")
    link.add_argument("--database", help="SQLite file: keep runs and registered nodes across restarts")
    link.add_argument("--connection", default="fl-offsite-deploy",
                      help="name of the connection written to $FLWR_HOME/config.toml for `flwr run . NAME`")
    link.add_argument("--insecure", action="store_true", help="no TLS, no node authentication (loopback only)")
    link.set_defaults(func=cmd_superlink)

    node = sub.add_parser("supernode", help="data owner: run a SuperNode that joins the model owner's SuperLink")
    node.add_argument("--superlink", required=True, metavar="HOST:PORT", help="the model owner's SuperLink")
    node.add_argument("--ca", default="ca.crt", help="the model owner's CA certificate (default ./ca.crt)")
    node.add_argument("--key", help="this node's private key from `fl-offsite node-key`")
    node.add_argument("--data-path", help="JSONL file of this owner's training examples (see docs/deployment.md)")
    node.add_argument("--cache-dir", help="where the delivered emulator is cached (default ~/.cache/fl-offsite)")
    node.add_argument("--partition-id", type=int, help="without --data-path: train on this share of the task")
    node.add_argument("--num-partitions", type=int)
    node.add_argument("--memory-budget-mb", type=float,
                      help="memory this node can train in: it gets the largest emulator that fits "
                           "(fl_offsite.app.fleet)")
    node.add_argument("--emulator-layers", type=int, help="or ask for an emulator of this many middle blocks")
    node.add_argument("--port", type=int, default=9094, help="local port of the node's runtime API (one per node)")
    node.add_argument("--insecure", action="store_true", help="no TLS (loopback only)")
    node.set_defaults(func=cmd_supernode)

    run = sub.add_parser("run", help="model owner: run the app on the deployed federation and check it completed")
    run.add_argument("config", nargs="?", help="TOML file of run-config keys (see pyproject.toml)")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a key")
    run.add_argument("--connection", default="fl-offsite-deploy", help="connection written by `fl-offsite superlink`")
    run.set_defaults(func=cmd_run)
    return parser


def _split_parser(sub, name: str, help_text: str) -> argparse.ArgumentParser:
    """A sub-command that splits a model: model, --adapter-layers, --emulator-layers | --drop-ratio, --out."""
    parser = sub.add_parser(name, help=help_text)
    parser.add_argument("model", help="local folder, hub id, or offline alias (smollm2-135m)")
    parser.add_argument("--adapter-layers", type=_pair, default=adapter_layers(DEFAULTS), metavar="L,R",
                        help=f"bottom,top blocks forming the adapter (default {DEFAULTS['split.adapter-layers']})")
    size = parser.add_mutually_exclusive_group(required=True)
    size.add_argument("--emulator-layers", type=int, metavar="K", help="middle blocks the emulator keeps")
    size.add_argument("--drop-ratio", type=float, help="fraction of the middle blocks to drop")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--layers", choices=CHOICES["emulator.layers"], default=DEFAULTS["emulator.layers"],
                        help="which middle blocks the emulator keeps (fl_offsite.emulator.layer_choice)")
    parser.add_argument("--corpus", default=DEFAULTS["distill.corpus"],
                        help="the owner's public text: public | public:<source>,... | model-samples | "
                             "hf:<datasets path>[:<config>]")
    parser.add_argument("--task", default=DEFAULTS["task"],
                        help="the task the data owners tune on: its text is refused as the corpus")
    parser.add_argument("--public-in-domain", action="store_true",
                        help="the owner holds public text of the task's domain (allows the task's corpus)")
    parser.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.verbose:  # an unreachable hub is retried for a minute, a warning each time: our error says it once
        os.environ.setdefault("HF_HUB_VERBOSITY", "error")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    func: Callable[[argparse.Namespace], None] = args.func
    try:
        func(args)
    except UserError as err:  # one line, whatever the message holds
        message = " ".join(line.strip() for line in str(err).splitlines())
        print(f"fl-offsite {args.command}: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
