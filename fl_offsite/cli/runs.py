"""Federated runs on the simulation engine: simulate, compare, demo."""
from __future__ import annotations

import argparse

from fl_offsite.cli.common import CPUS_HELP, RAY_ADDRESS_HELP, stoppable
from fl_offsite.ops.flower_app import app_dir


@stoppable
def cmd_simulate(args: argparse.Namespace) -> None:
    from pathlib import Path

    from fl_offsite.config.keys import load_file, parse_sets
    from fl_offsite.config.settings import Settings, validate
    from fl_offsite.ops.preflight import check_runnable
    from fl_offsite.ops.simulation import run_simulation_app
    from fl_offsite.run.folder import RunFolder
    from fl_offsite.run.tables import round_table

    config = validate({**(load_file(args.config) if args.config else {}), **parse_sets(args.set)})
    results = str(Path(Settings.from_config(config).results.dir).expanduser().resolve())
    config.update({"results.dir": results, "data.num-partitions": args.num_clients})
    check_runnable(Settings.from_config(config), args.num_clients)
    run_simulation_app(app_dir(), config, num_supernodes=args.num_clients, cpus_per_client=args.cpus_per_client,
                       gpus_per_client=args.gpus_per_client, ray_address=args.ray_address)
    run = RunFolder(results)
    print(round_table(run.rounds()))
    if distillation := run.distillation():
        from fl_offsite.emulator.distill import ppl_summary

        print(f"distilled emulator, {ppl_summary(distillation)}")
    print(f"results: {results}")


@stoppable
def cmd_compare(args: argparse.Namespace) -> None:
    from fl_offsite.config.keys import parse_sets
    from fl_offsite.run.compare import load_compare_config, run_compare

    plan = load_compare_config(args.config, parse_sets(args.set), cpus_per_client=args.cpus_per_client,
                               ray_address=args.ray_address)
    report = run_compare(plan)
    print(report.read_text().split("![")[0].rstrip())
    print(f"\nreport: {report}\nplots:  {plan.out / 'accuracy.png'}, {plan.out / 'client_cost.png'}")


def cmd_demo(args: argparse.Namespace) -> None:
    """The README's main job: the demo comparison shipped in simulations/demo.toml."""
    args.config = str(app_dir() / "simulations" / "demo.toml")
    cmd_compare(args)


def cmd_keys(args: argparse.Namespace) -> None:
    """Every run-config key with its default, allowed values and help, as declared on the settings fields."""
    from fl_offsite.config.settings import OPTIONS

    for key, declared in OPTIONS.items():
        if args.prefix and not key.startswith(args.prefix):
            continue
        allowed = f"  [{' | '.join(declared.choices)}]" if declared.choices else ""
        print(f"{key} = {declared.default!r}{allowed}" + (f"\n    {declared.help}" if declared.help else ""))


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """This module's sub-commands, each bound to its handler above."""
    simulate = sub.add_parser("simulate", help="run the federated app on Flower's simulation engine (Ray)")
    simulate.add_argument("config", nargs="?", help="TOML file of run-config keys (see pyproject.toml)")
    simulate.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a key")
    simulate.add_argument("--num-clients", type=int, default=4, help="simulated data owners (SuperNodes)")
    simulate.add_argument("--cpus-per-client", type=int, default=1)
    simulate.add_argument("--gpus-per-client", type=float, default=0.0)
    simulate.add_argument("--ray-address", metavar="HOST:PORT", help=RAY_ADDRESS_HELP)
    simulate.set_defaults(func=cmd_simulate)

    compare = sub.add_parser("compare", help="run several methods on the same data; write a report with plots")
    compare.add_argument("config", help="TOML file: run-config keys plus compare.methods, compare.num-clients, "
                                        "compare.out")
    compare.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a key")
    compare.add_argument("--cpus-per-client", type=int, help=CPUS_HELP)
    compare.add_argument("--ray-address", metavar="HOST:PORT", help=RAY_ADDRESS_HELP + "; else compare.ray-address")
    compare.set_defaults(func=cmd_compare)

    demo = sub.add_parser("demo", help="the main job: offsite-tuning vs FedAvg full fine-tuning on smollm2-135m")
    demo.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a key")
    demo.add_argument("--cpus-per-client", type=int, help=CPUS_HELP)
    demo.add_argument("--ray-address", metavar="HOST:PORT", help=RAY_ADDRESS_HELP)
    demo.set_defaults(func=cmd_demo)

    keys = sub.add_parser("keys", help="list the run-config keys: default, allowed values, meaning")
    keys.add_argument("prefix", nargs="?", default="", help="only the keys starting with this, e.g. train.")
    keys.set_defaults(func=cmd_keys)
