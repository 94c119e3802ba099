"""Emulator fidelity: the paper's five settings, federated, on the whole test split, over seeds.

For a model, a task and one or more emulator recipes (all on the model owner's public text):

- full zero-shot and, per recipe, emulator zero-shot;
- FedAvg full fine-tuning;
- per recipe, offsite-tuning: the adapter trained federated on the emulator, scored as
  emulator + adapter and as plug-in (full model + adapter);

with the same Dirichlet partitions, rounds and local budget (steps x batch) for FedAvg and
offsite, the test split fixed (task seed 1234) and the federated seed (partitions, example
order) varied. The federated loop runs in this process with the library's own pieces (the
client app's partitioning and encoding, ``train_local``, FedAvg weighted by examples, the
owner's cosine schedule across rounds), the same work Flower's simulation distributes.
Every finished unit (a zero-shot score, one seed of one method) is kept in the output JSON at
once, so a rerun resumes. Prints means, standard errors over seeds, the privacy gap (plug-in
minus emulator + adapter) and the emulator's standalone gap (full minus emulator zero-shot).
Runs on the GPU when there is one (``--device``; scoring and training under bf16 autocast there too);
the output JSON names the device its units ran on.

  python benchmarks/fidelity.py --task bbc-news --seeds 1 --recipe uniform=emulator.layers=uniform
  python benchmarks/fidelity.py --task bbc-news --seeds 1,2,3 \\
      --recipe uniform=emulator.layers=uniform \\
      --recipe 'greedy-distilled=emulator.layers=greedy;distill.steps=200;distill.precision=bf16' \\
      --out benchmarks/measurements/fidelity_bbc.json
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from fl_offsite.app.owner import lr_schedule
from fl_offsite.config.settings import Settings
from fl_offsite.data.encode import encode_choice_example, pad_id
from fl_offsite.data.models import load_model
from fl_offsite.data.partition import partition_indices
from fl_offsite.data.tasks import load_task
from fl_offsite.emulator.realign import Realignment, RealignSettings, add_realign_lora, public_blocks, set_factors
from fl_offsite.emulator.recipe import EmulatorRecipe, prepare_emulator
from fl_offsite.files import write_json
from fl_offsite.learn.evaluate import evaluate_task
from fl_offsite.learn.train import HALF, TrainSettings, half_frozen, train_local
from fl_offsite.surgery.payload import plug_in
from fl_offsite.surgery.split import adapter_names

log = logging.getLogger("fidelity")
TASK_SEED = 1234  # the test split is the same for every federated seed


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--task", default="bbc-news")
    parser.add_argument("--recipe", action="append", default=[], metavar="NAME=KEY=VALUE;...",
                        help="an emulator recipe: a name, then run-config keys (split.*, emulator.*, distill.*)")
    parser.add_argument("--fleet", action="append", default=[], metavar="NAME=RECIPE,RECIPE,...",
                        help="a mixed fleet: client i trains on recipe i's emulator (one recipe per client), all "
                             "one shared adapter")
    parser.add_argument("--seeds", default="1", help="federated seeds, comma-separated")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--alpha", type=float, default=1.0, help="Dirichlet alpha over labels (non-IID)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--local-steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-4, help="offsite client learning rate (the paper's)")
    parser.add_argument("--ft-lr", type=float, default=2e-5, help="full fine-tuning client learning rate")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="bf16", help="client training precision")
    parser.add_argument("--eval-precision", choices=["fp32", "bf16"], default="bf16",
                        help="scoring under bf16 autocast (the same for every setting)")
    parser.add_argument("--eval-batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1 is fastest when other processes share the cores)")
    parser.add_argument("--device", default=None,
                        help="where models, batches and emulators live: cuda, cuda:N or cpu "
                             "(default: cuda when available, else cpu)")
    parser.add_argument("--limit", type=int, default=0, help="score only this many test examples (0: whole split)")
    parser.add_argument("--centralised", action="store_true", help="one data owner with all the data, same budget")
    parser.add_argument("--no-ft", action="store_true", help="skip FedAvg full fine-tuning")
    parser.add_argument("--out", default="benchmarks/measurements/fidelity.json")
    return parser.parse_args(argv)


def recipes_of(specs: list[str]) -> dict[str, tuple[dict, EmulatorRecipe, RealignSettings, float]]:
    """``NAME=key=value;key=value`` -> (overrides, emulator recipe, re-alignment, the clients' proximal mu),
    validated as run config (``strategy.name=fedprox;strategy.proximal-mu=MU``: FedProx's, or FedBiOT's,
    proximal term on the clients)."""
    recipes = {}
    for spec in specs or ["uniform=emulator.layers=uniform"]:
        name, _, rest = spec.partition("=")
        overrides = dict(item.split("=", 1) for item in rest.split(";") if item)
        settings = Settings.from_config(overrides)
        mu = settings.strategy.proximal_mu if settings.strategy.name == "fedprox" else 0.0
        recipes[name] = overrides, settings.emulator, settings.realign, mu
    return recipes


def fleets_of(specs: list[str], recipes: dict, clients: int) -> dict[str, list[str]]:
    """``NAME=RECIPE,RECIPE,...`` -> the recipe of each client, checked against the recipes and --clients."""
    fleets = {}
    for spec in specs:
        name, _, members = spec.partition("=")
        fleets[name] = members.split(",")
        unknown = sorted(set(fleets[name]) - set(recipes))
        if unknown:
            raise SystemExit(f"fleet {name}: no --recipe named {unknown[0]!r} (recipes: {', '.join(recipes)})")
        if len(fleets[name]) != clients:
            raise SystemExit(f"fleet {name} names {len(fleets[name])} recipes for {clients} clients: one per client")
        adapters = {(recipes[m][1].adapter_bottom, recipes[m][1].adapter_top) for m in fleets[name]}
        if len(adapters) > 1:
            raise SystemExit(f"fleet {name}: its recipes split the adapter differently ({sorted(adapters)}); "
                             "one shared adapter needs the same split.adapter-layers")
    return fleets


class OwnerRealignment:
    """The model owner's per-round re-alignment (``realign.*`` in a recipe) of each such emulator of a run, as
    ``fl_offsite.emulator.realign`` does in a federated run: the owner's copies of the full model and the emulator get
    the global adapter, the emulator's LoRA factors train, and its clients' copies get the factors.

    ``members``: recipe name -> (recipe, re-alignment, plan, emulator, the clients' copy, how many clients)."""

    def __init__(self, model, tokenizer, task: str, rounds: int, seed: int, members: dict[str, tuple]) -> None:
        self.members, self.records = {}, {}
        self.full = None
        for name, (recipe, realign, plan, emulator, client_copy, count) in members.items():
            if not realign.enabled:
                continue
            realign = replace(realign, seed=seed)  # the batches of public text, as the run's seed draws them
            self.full = self.full or copy.deepcopy(model)
            owner_copy = copy.deepcopy(emulator)
            blocks = public_blocks(realign, recipe, model, tokenizer, task, rounds)
            realignment = Realignment(realign, self.full, {0: (plan, owner_copy)},
                                      lambda m, payload, p, plan=plan: plug_in(m, payload, p or plan), blocks,
                                      pad_id(tokenizer))
            add_realign_lora(client_copy, plan, realign)
            self.members[name] = realignment, plan, owner_copy, client_copy, count
            self.records[name] = []

    def before_round(self, rnd: int, adapter: dict[str, torch.Tensor]) -> None:
        for name, (realignment, plan, _, client_copy, count) in self.members.items():
            record = realignment.before_round(rnd, adapter)
            if record is None:
                continue
            factors = realignment.factors()[0]
            set_factors(client_copy, plan, factors)
            self.records[name].append({"round": rnd, "seconds": round(record["seconds"], 2),
                                       "error_before": record["emulators"]["0"]["error_before"],
                                       "error_after": record["emulators"]["0"]["error_after"],
                                       "bytes_per_client": sum(t.numel() * t.element_size() for t in factors.values()),
                                       "clients": count})

    def emulator(self, name: str) -> torch.nn.Module | None:
        """The owner's copy of a re-aligned emulator (the factors its clients hold), else None."""
        return self.members[name][2] if name in self.members else None

    def record(self, adapter: dict[str, torch.Tensor]) -> dict:
        """Per re-aligned recipe: each re-alignment's seconds, losses and factor bytes, beside the adapter's bytes."""
        if not self.members:
            return {}
        adapter_bytes = sum(t.numel() * 4 for t in adapter.values())  # the adapter travels in fp32
        return {"realign": {name: {"adapter_bytes_per_client_round": adapter_bytes, "rounds": rounds}
                            for name, rounds in self.records.items()}}


class Results:
    """The output JSON, written after every finished unit; units already there are not rerun."""

    def __init__(self, path: Path, settings: dict) -> None:
        self.path = path
        self.data = json.loads(path.read_text()) if path.exists() else {}
        if self.data.get("settings", settings) != settings:
            raise SystemExit(f"{path} holds results of other settings; choose another --out")
        self.data.update(settings=settings)
        self.data.setdefault("units", {})

    def get(self, key: str) -> dict | None:
        return self.data["units"].get(key)

    def put(self, key: str, value: dict) -> None:
        self.data["units"][key] = value
        write_json(self.path, self.data)


def partitions(task, clients: int, alpha: float, seed: int, centralised: bool) -> list[list]:
    labels = [ex.label for ex in task.train]
    if centralised:
        return [list(task.train)]
    return [[task.train[i] for i in partition_indices(labels, clients, pid, "dirichlet", alpha, seed)]
            for pid in range(clients)]


def fedavg(models: list[torch.nn.Module], names: list[dict[str, str]], data: list[list[dict]], args, lr: float,
           seed: int, label: str, before_round: Callable[[int, dict[str, torch.Tensor]], None] | None = None,
           proximal_mu: float = 0.0) -> dict:
    """Federated rounds: client ``i`` trains ``names[i]`` (full-model name -> its parameter) of ``models[i]``
    from the global state, then FedAvg by examples in full-model names. Clients may share one model, or hold
    different ones (a fleet of emulators) with the same trainable tensors; every model ends on the global state.
    ``before_round(r, global state)`` runs before each round r (and with r = 0 before the first): the owner's
    re-alignment. ``proximal_mu``: the clients' proximal term toward the round's global state (FedProx)."""
    lr_at = lr_schedule(lr, "cosine", args.rounds)
    steps = args.local_steps * (args.clients if args.centralised else 1)
    params = [dict(m.named_parameters()) for m in models]
    global_state = {full: params[0][local].detach().clone() for full, local in names[0].items()}
    train_seconds, losses = 0.0, []
    weight = sum(len(d) for d in data)
    if before_round is not None:
        before_round(0, global_state)
    for rnd in range(1, args.rounds + 1):
        if before_round is not None:
            before_round(rnd, global_state)
        total = {full: torch.zeros_like(t, dtype=torch.float32) for full, t in global_state.items()}
        for pid, features in enumerate(data):
            _load(params[pid], names[pid], global_state)
            settings = TrainSettings(lr=lr_at(rnd), batch_size=args.batch_size, local_steps=steps,
                                     proximal_mu=proximal_mu,
                                     seed=seed * 7919 + rnd * 131 + pid, precision=args.precision)
            stats = train_local(models[pid], set(names[pid].values()), features, settings, args.pad_id,
                                desc=f"{label} round {rnd} client {pid}")
            train_seconds += stats.seconds
            losses.append(stats.loss)
            with torch.no_grad():
                for full, local in names[pid].items():
                    total[full] += params[pid][local].detach().float() * (len(features) / weight)
        global_state = {full: tensor.to(global_state[full].dtype) for full, tensor in total.items()}
        log.info("%s round %d: mean client loss %.4f", label, rnd, statistics.fmean(losses[-len(data):]))
    for p, n in zip(params, names, strict=True):
        _load(p, n, global_state)
    return {"train_seconds": round(train_seconds, 1), "final_loss": statistics.fmean(losses[-len(data):])}


@torch.no_grad()
def _load(params: dict[str, torch.nn.Parameter], names: dict[str, str], state: dict[str, torch.Tensor]) -> None:
    for full, local in names.items():
        params[local].copy_(state[full])


def score(model, tokenizer, task, args) -> dict:
    device = next(model.parameters()).device
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.eval_precision == "bf16")
    with autocast:
        result = evaluate_task(model, tokenizer, task, "test", limit=args.limit or None,
                               batch_size=args.eval_batch_size, progress=True)
    return {"acc": result["acc"], "acc_stderr": result["acc_stderr"], "acc_norm": result["acc_norm"],
            "n": result["n"]}


@dataclass
class Setup:
    """What every unit of a run shares: the arguments, recipes, fleets, seeds, results, device, full model, task."""

    args: argparse.Namespace
    recipes: dict[str, tuple[dict, EmulatorRecipe, RealignSettings, float]]
    fleets: dict[str, list[str]]
    seeds: list[int]
    results: Results
    device: torch.device
    model: torch.nn.Module
    tokenizer: Any
    task: Any

    def client_data(self, seed: int) -> list[list[dict]]:
        """Each client's encoded partition of the train split for ``seed`` (one client with --centralised)."""
        a = self.args
        return [[encode_choice_example(self.tokenizer, ex, a.max_length) for ex in part]
                for part in partitions(self.task, a.clients, a.alpha, seed, a.centralised)]


def build(args: argparse.Namespace) -> Setup:
    """Check the recipes and fleets, open (or resume) the output JSON, load the model and the task."""
    recipes = recipes_of(args.recipe)
    fleets = fleets_of(args.fleet, recipes, args.clients)
    if fleets and args.centralised:
        raise SystemExit("--fleet needs federated clients: drop --centralised")
    seeds = [int(s) for s in args.seeds.split(",")]
    torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    budget = {k: getattr(args, k) for k in ("model", "task", "clients", "alpha", "rounds", "local_steps",
                                             "batch_size", "lr", "ft_lr", "max_length", "precision",
                                             "eval_precision", "limit", "centralised")}
    results = Results(Path(args.out), budget)
    results.data.setdefault("recipes", {}).update(
        {name: {"overrides": o, "recipe": asdict(r), **({"realign": asdict(a)} if a.enabled else {})}
         for name, (o, r, a, _) in recipes.items()})
    model, tokenizer = load_model(args.model)
    model.to(device)
    results.data.setdefault("devices", {})[device.type] = describe(device)
    log.info("running on %s", results.data["devices"][device.type])
    args.pad_id = pad_id(tokenizer)
    task = load_task(args.task, seed=TASK_SEED)
    return Setup(args, recipes, fleets, seeds, results, device, model, tokenizer, task)


def measure_full(setup: Setup) -> None:
    """The full model zero-shot, then FedAvg full fine-tuning per seed (unless --no-ft)."""
    args, results = setup.args, setup.results
    if not results.get("full-zero-shot"):
        results.put("full-zero-shot", score(setup.model, setup.tokenizer, setup.task, args))
    for seed in setup.seeds if not args.no_ft else []:
        key = f"fedavg-full/{seed}"
        if results.get(key):
            continue
        full, _ = load_model(args.model)
        full.to(setup.device)
        data = setup.client_data(seed)
        everything = {n: n for n, _ in full.named_parameters()}
        run = fedavg([full] * len(data), [everything] * len(data), data, args, args.ft_lr, seed,
                     f"fedavg-full s{seed}")
        results.put(key, {**score(full, setup.tokenizer, setup.task, args), **run})
        del full


def prepare_emulators(setup: Setup) -> dict[str, tuple]:
    """Each recipe's emulator, scored zero-shot: recipe -> (plan, emulator, full-model name -> name in it)."""
    emulators = {}
    for name, (_, recipe, _, _) in setup.recipes.items():
        started = time.perf_counter()
        plan, emulator, record = prepare_emulator(setup.args.model, setup.model, setup.tokenizer, recipe,
                                                  setup.args.task)
        emulators[name] = plan, emulator, adapter_names(emulator, plan)
        if not setup.results.get(f"{name}/emulator-zero-shot"):
            setup.results.put(f"{name}/emulator-zero-shot", {
                **score(emulator, setup.tokenizer, setup.task, setup.args), "kept_layers": list(plan.kept_layers),
                "emulator_mb": round(sum(p.numel() * p.element_size() for p in emulator.parameters()) / 1e6, 1),
                "prepare_seconds": round(time.perf_counter() - started, 1),
                "distillation": {k: v for k, v in (record.get("distillation") or {}).items() if k != "losses"}})
    return emulators


def measure_offsite(setup: Setup, emulators: dict[str, tuple]) -> dict[str, list[str]]:
    """Offsite-tuning of every fleet, then every recipe, per seed; the runs (name -> each client's recipe)."""
    # fleets first: their units are the ones a fleet study is run for
    runs = {f"fleet:{f}": m for f, m in setup.fleets.items()} | \
        {name: [name] * setup.args.clients for name in setup.recipes}
    for run_name, members in runs.items():
        for seed in setup.seeds:
            key = f"{run_name}/{seed}"
            if not setup.results.get(key):
                setup.results.put(key, measure_run(setup, emulators, run_name, members, seed))
    return runs


def measure_run(setup: Setup, emulators: dict[str, tuple], run_name: str, members: list[str], seed: int) -> dict:
    """One seed of one run: the adapter trained federated on the members' emulators, scored on each and plugged in."""
    args, recipes = setup.args, setup.recipes
    clients = {}  # one trained copy per emulator in the run, shared by its clients
    for member in dict.fromkeys(members):
        _, emulator, names = emulators[member]
        clients[member] = copy.deepcopy(emulator)
        if args.precision in HALF:
            half_frozen(clients[member], set(names.values()), HALF[args.precision])
    owner = OwnerRealignment(setup.model, setup.tokenizer, setup.task.name, args.rounds, seed,
                             {m: (recipes[m][1], recipes[m][2], *emulators[m][:2], clients[m], members.count(m))
                              for m in clients})
    run = fedavg([clients[m] for m in members], [emulators[m][2] for m in members], setup.client_data(seed), args,
                 args.lr, seed, f"{run_name} s{seed}", before_round=owner.before_round if owner.members else None,
                 proximal_mu=recipes[members[0]][3])
    first_plan, _, first_names = emulators[members[0]]
    state = clients[members[0]].state_dict()
    adapter = {full: state[local].detach().float() for full, local in first_names.items()}
    # emulator + adapter: the emulator the data owners end with (re-aligned, for a re-aligned recipe)
    scores = {member: score(plug_in(owner.emulator(member) or copy.deepcopy(emulators[member][1]), adapter,
                                    emulators[member][0]), setup.tokenizer, setup.task, args) for member in clients}
    plugin = score(plug_in(copy.deepcopy(setup.model), adapter, first_plan), setup.tokenizer, setup.task, args)
    unit = {"members": members, "emulators": scores} if run_name.startswith("fleet:") else \
        {"emulator": scores[members[0]]}
    return {**unit, "plugin": plugin, **run, **owner.record(adapter)}


def report(setup: Setup, runs: dict[str, list[str]]) -> None:
    """Summaries into the output JSON, printed as tables and plotted beside it (.png)."""
    results, seeds = setup.results, setup.seeds
    summary = summarise(results.data, list(setup.recipes), setup.fleets, seeds, not setup.args.no_ft)
    results.data["summary"] = summary
    results.data["realign_summary"] = realign_cost(results.data, runs, seeds)
    write_json(results.path, results.data)
    print_table(summary, results.data["units"]["full-zero-shot"]["n"], seeds)
    print_realign_cost(results.data["realign_summary"])
    plot(summary, results.path.with_suffix(".png"), setup.args)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    setup = build(args)
    measure_full(setup)
    emulators = prepare_emulators(setup)
    report(setup, measure_offsite(setup, emulators))
    return 0


def describe(device: torch.device) -> str:
    """The device in words, kept in the output JSON (each unit's numbers come from the device named there)."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    return f"cpu, {torch.get_num_threads()} torch threads (torch {torch.__version__})"


def mean_se(values: list[float]) -> dict:
    mean = statistics.fmean(values)
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return {"mean": mean, "se": se, "values": values}


def summarise(data: dict, recipes: list[str], fleets: dict[str, list[str]], seeds: list[int],
              with_ft: bool) -> dict:
    units = data["units"]
    full_zs = units["full-zero-shot"]["acc"]
    out: dict = {"full zero-shot": {"mean": full_zs, "se": units["full-zero-shot"]["acc_stderr"], "values": [full_zs]}}
    if with_ft:
        out["FedAvg full fine-tuning"] = mean_se([units[f"fedavg-full/{s}"]["acc"] for s in seeds])
    for name in recipes:
        zs = units[f"{name}/emulator-zero-shot"]
        runs = [units[f"{name}/{s}"] for s in seeds]
        out[f"{name}: emulator zero-shot"] = {"mean": zs["acc"], "se": zs["acc_stderr"], "values": [zs["acc"]]}
        out[f"{name}: emulator + adapter"] = mean_se([r["emulator"]["acc"] for r in runs])
        out[f"{name}: plug-in"] = mean_se([r["plugin"]["acc"] for r in runs])
        out[f"{name}: privacy gap (plug-in - emulator + adapter)"] = mean_se(
            [r["plugin"]["acc"] - r["emulator"]["acc"] for r in runs])
        out[f"{name}: standalone gap (full - emulator zero-shot)"] = {"mean": full_zs - zs["acc"], "se": float("nan"),
                                                                      "values": [full_zs - zs["acc"]]}
        if with_ft:
            out[f"{name}: FT - plug-in"] = mean_se([units[f"fedavg-full/{s}"]["acc"] - r["plugin"]["acc"]
                                                    for s, r in zip(seeds, runs, strict=True)])
    for fleet, members in fleets.items():
        runs = [units[f"fleet:{fleet}/{s}"] for s in seeds]
        out[f"fleet {fleet}: plug-in"] = mean_se([r["plugin"]["acc"] for r in runs])
        for member in dict.fromkeys(members):
            out[f"fleet {fleet}: emulator + adapter on {member} ({members.count(member)} clients)"] = mean_se(
                [r["emulators"][member]["acc"] for r in runs])
        if with_ft:
            out[f"fleet {fleet}: FT - plug-in"] = mean_se([units[f"fedavg-full/{s}"]["acc"] - r["plugin"]["acc"]
                                                           for s, r in zip(seeds, runs, strict=True)])
    return out


def realign_cost(data: dict, runs: dict[str, list[str]], seeds: list[int]) -> dict:
    """Per re-aligned recipe (in each run that has it): the owner's seconds per round and once before round 1,
    the factors' and the adapter's bytes per client and round, and the owner's held-out middle-output error
    before and after each round's re-alignment, averaged over rounds and seeds."""
    out = {}
    for run_name in runs:
        units = [data["units"][f"{run_name}/{s}"] for s in seeds]
        for recipe in units[0].get("realign", {}):
            per_seed = [u["realign"][recipe] for u in units]
            rounds = [[r for r in p["rounds"] if r["round"] > 0] for p in per_seed]
            pre = [r["seconds"] for p in per_seed for r in p["rounds"] if r["round"] == 0]
            out[f"{run_name}: {recipe}" if run_name != recipe else recipe] = {
                "seconds_per_round": statistics.fmean(r["seconds"] for rs in rounds for r in rs),
                "pre_seconds": statistics.fmean(pre) if pre else 0.0,
                "factor_bytes_per_client_round": rounds[0][0]["bytes_per_client"],
                "adapter_bytes_per_client_round": per_seed[0]["adapter_bytes_per_client_round"],
                "error_before_after": [statistics.fmean(r["error_before"] for rs in rounds for r in rs),
                                       statistics.fmean(r["error_after"] for rs in rounds for r in rs)]}
    return out


def print_realign_cost(cost: dict) -> None:
    if not cost:
        return
    print("\nre-alignment (the model owner, before every round), mean over seeds\n")
    print("| recipe | owner s/round | owner s before round 1 | factors MB/client/round | adapter MB/client/round "
          "| held-out middle-output error, before -> after a round's re-alignment |\n|---|---|---|---|---|---|")
    for name, c in cost.items():
        print(f"| {name} | {c['seconds_per_round']:.1f} | {c['pre_seconds']:.1f} | "
              f"{c['factor_bytes_per_client_round'] / 1e6:.3f} | {c['adapter_bytes_per_client_round'] / 1e6:.1f} | "
              f"{c['error_before_after'][0]:.4f} -> {c['error_before_after'][1]:.4f} |")


def print_table(summary: dict, n_test: int, seeds: list[int]) -> None:
    """The summary as a Markdown table (gaps signed)."""
    print(f"\naccuracy on the whole test split ({n_test} examples), mean ± standard error over seeds {seeds} "
          "(zero-shot rows: ± the binomial standard error)\n")
    width = max(map(len, summary))
    print(f"| {'setting':<{width}} | accuracy |\n|{'-' * (width + 2)}|----------|")
    for name, row in summary.items():
        value = f"{row['mean']:+.3f}" if "gap" in name or "FT -" in name else f"{row['mean']:.3f}"
        se = "" if math.isnan(row["se"]) else f" ± {row['se']:.3f}"
        print(f"| {name:<{width}} | {value}{se} |")


def plot(summary: dict, path: Path, args) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(k, v) for k, v in summary.items() if "gap" not in k and "FT -" not in k]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.2))
    names = [k for k, _ in rows][::-1]
    means = [v["mean"] for _, v in rows][::-1]
    errors = [0 if math.isnan(v["se"]) else v["se"] for _, v in rows][::-1]
    colors = ["#999999" if "zero-shot" in n else "#d62728" if "FedAvg" in n else
              "#1f77b4" if "plug-in" in n else "#ff7f0e" for n in names]
    ax.barh(names, means, xerr=errors, color=colors, capsize=3)
    for y, (m, e) in enumerate(zip(means, errors, strict=True)):
        ax.text(m + e + 0.01, y, f"{m:.3f}", va="center", fontsize=8)  # clear of the error bar
    ax.set_xlim(0, 1.08)
    ax.set_xlabel("accuracy (whole test split)")
    ax.set_title(f"{args.model} on {args.task}: {args.clients} clients, {args.rounds} rounds x "
                 f"{args.local_steps} steps", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
