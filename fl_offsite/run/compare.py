"""Run several methods on the same task, partitions and rounds; write a report with plots."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fl_offsite.app.fleet import SMALLER_EVAL
from fl_offsite.config.keys import load_file
from fl_offsite.config.settings import CHOICES, Settings, validate
from fl_offsite.errors import UserError
from fl_offsite.files import write_atomic, write_json
from fl_offsite.logs import clock_time
from fl_offsite.run.folder import RunFolder
from fl_offsite.run.records import RoundRecord
from fl_offsite.run.tables import describe_composition, markdown_table, mean

log = logging.getLogger(__name__)

BASELINE = "fedavg-full"


@dataclass(frozen=True)
class ComparePlan:
    """What a compare file asks for: named runs on one shared run config, one client count, one folder."""

    runs: dict[str, dict]  # run name -> its run-config overrides (``method`` and any keys)
    num_clients: int
    out: Path
    config: dict  # the run config every run shares
    cpus_per_client: dict[str, int]  # run name -> CPUs of each simulated client
    ray_address: str | None = None  # HOST:PORT of a running Ray cluster's head; None: a private Ray per run


def load_compare_config(path: str | Path, overrides: dict[str, Any], cpus_per_client: int | None = None,
                        ray_address: str | None = None) -> ComparePlan:
    """The plan of a compare file (``overrides`` from ``--set``).

    ``compare.methods`` lists run names: a method (``offsite``...) or a variant defined as
    ``[compare.runs.NAME]`` with its ``method`` and any run-config keys (``"distill.steps" = 120``).
    ``compare.cpus-per-client`` (default 1) sets each simulated client's CPUs, a run's own
    ``cpus-per-client`` overrides it for that run, and ``cpus_per_client`` (the command line) for all.
    ``compare.ray-address``, or ``ray_address`` (the command line), runs every run's clients on that Ray cluster.
    """
    data = {**load_file(path), **overrides}
    names = data.pop("compare.methods", ["offsite", BASELINE])
    if isinstance(names, str):
        names = [m.strip() for m in names.split(",") if m.strip()]
    variants: dict[str, dict] = {}
    for key in [k for k in data if k.startswith("compare.runs.")]:
        name, _, option = key.removeprefix("compare.runs.").partition(".")
        variants.setdefault(name, {})[option] = data.pop(key)
    num_clients = int(data.pop("compare.num-clients", 4))
    out = Path(str(data.pop("compare.out", "runs/compare"))).expanduser().resolve()
    default_cpus = int(data.pop("compare.cpus-per-client", 1))
    ray_address = data.pop("compare.ray-address", None) if ray_address is None else ray_address
    data.pop("compare.ray-address", None)  # not a run-config key, whichever address applies
    config = validate(data)
    unused = variants.keys() - set(names)
    if unused:
        raise UserError(f"[compare.runs.{sorted(unused)[0]}] is not listed in compare.methods")
    runs, cpus = {}, {}
    for name in names:
        run = dict(variants.get(name, {"method": name}))
        if "method" not in run:
            raise UserError(f"[compare.runs.{name}] needs a method (one of {', '.join(CHOICES['method'])})")
        run_cpus = int(run.pop("cpus-per-client", default_cpus))  # popped always: not a run-config key
        cpus[name] = cpus_per_client or run_cpus
        validate({**data, **run})
        runs[name] = run
    if num_clients < Settings.from_config(config).strategy.min_train_nodes:
        raise UserError(f"compare.num-clients={num_clients} is below strategy.min-train-nodes")
    return ComparePlan(runs, num_clients, out, config, cpus, str(ray_address) if ray_address else None)


def run_compare(plan: ComparePlan) -> Path:
    """Run each configuration (resuming, skipping finished ones), then write the report into ``plan.out``."""
    from fl_offsite.ops.flower_app import app_dir
    from fl_offsite.ops.preflight import check_runnable
    from fl_offsite.ops.simulation import run_simulation_app

    pending = {}
    for name, overrides in plan.runs.items():
        run_config = validate({**plan.config, **overrides, "results.dir": str(plan.out / name),
                               "data.num-partitions": plan.num_clients})
        settings = Settings.from_config(run_config)
        if finished(plan.out / name, settings.num_rounds if settings.method.trains else 0):
            log.info("%s: already finished, not rerun (%s)", name, plan.out / name)
        else:
            check_runnable(settings, plan.num_clients)  # all of them before the first starts
            pending[name] = run_config, settings.num_rounds
    started = time.perf_counter()
    for i, (name, (run_config, num_rounds)) in enumerate(pending.items(), 1):
        cpus = plan.cpus_per_client[name]
        log.info("[%d/%d] %s: %d rounds with %d clients, %d CPU(s) each (elapsed %s)", i, len(pending), name,
                 num_rounds, plan.num_clients, cpus, clock_time(time.perf_counter() - started))
        begun = time.perf_counter()
        run_simulation_app(app_dir(), run_config, num_supernodes=plan.num_clients, cpus_per_client=cpus,
                           ray_address=plan.ray_address)
        log.info("[%d/%d] %s finished in %s (elapsed %s)", i, len(pending), name,
                 clock_time(time.perf_counter() - begun), clock_time(time.perf_counter() - started))
    return write_report(plan.out, list(plan.runs))


def finished(run_dir: Path, num_rounds: int) -> bool:
    rounds = RunFolder(run_dir).rounds() if run_dir.is_dir() else []
    return bool(rounds) and rounds[-1].round >= num_rounds


def summarize(run_dir: Path) -> dict:
    """Per-method numbers from a results folder (all measured by the run itself): report.json's entry."""
    run = RunFolder(run_dir)
    rounds = run.rounds()
    evaluations = [{"round": r.round, **r.scores} for r in rounds if r.scores]  # eval.every skips some
    summary: dict[str, Any] = {"config": run.read_config(), "rounds": evaluations, "distillation": run.distillation()}
    trained = [r for r in rounds[1:] if r.clients]
    clients = [c for r in trained for c in r.clients or []]
    if not clients:  # zero-shot: nothing trained, nothing sent
        return summary
    one_time = run.package_bytes()  # what a new client downloads once (cached nodes were sent nothing)
    per_round = [sum(c.bytes_down + c.bytes_up + (c.realign_bytes_down or 0) for c in r.clients or [])
                 / len(r.clients or []) for r in trained]
    realigned = [r.realign.seconds for r in rounds[1:] if r.realign]
    summary.update({
        "bytes_down_per_client_round": mean(clients, "bytes_down"),
        "bytes_up_per_client_round": mean(clients, "bytes_up"),
        "one_time_bytes_per_client": one_time,
        "one_time_bytes_sent": run.delivered_bytes(),
        "cumulative_bytes_per_client": _cumulative(one_time, per_round),
        "client_peak_memory_mb": max(c.peak_memory_mb for c in clients if c.peak_memory_mb is not None),
        "client_train_seconds_per_round": mean(clients, "train_seconds"),
        "client_tokens_per_s": mean(clients, "tokens_per_s"),
        "trainable_params": int(max(c.trainable_params for c in clients if c.trainable_params is not None)),
        "round_seconds": sum(r.seconds or 0.0 for r in rounds[1:]) / len(rounds[1:]),
        "communication": _communication(rounds, run.delivered_bytes()),
    })
    if realigned:
        factors = sum(c.realign_bytes_down or 0 for c in clients)
        summary.update(realign_bytes_down_per_client_round=factors / len(clients),
                       owner_realign_seconds_per_round=sum(realigned) / len(realigned))
    return summary


def _communication(rounds: list[RoundRecord], one_time: int) -> dict:
    """The run's communication budget: adapter bytes of every round (all clients), running totals, and the
    one-time model deliveries and the emulator re-alignment factors (sent down) apart."""
    traffic = [{"round": r.round, **r.traffic.to_json()} for r in rounds if r.traffic]
    last = traffic[-1] if traffic else {}
    return {"adapter_bytes_down": last.get("cumulative_bytes_down", 0),
            "adapter_bytes_up": last.get("cumulative_bytes_up", 0), "one_time_bytes": one_time,
            "realign_bytes_down": last.get("cumulative_realign_bytes_down", 0), "rounds": traffic}


def _rounds_bytes(communication: dict) -> int:
    """Everything a run's rounds sent, all clients (its last round's ``Traffic.bytes_so_far``)."""
    return sum(communication[k] for k in ("adapter_bytes_down", "adapter_bytes_up", "realign_bytes_down"))


def _cumulative(one_time: float, per_round: list[float]) -> list[float]:
    totals, total = [one_time], one_time
    for nbytes in per_round:
        total += nbytes
        totals.append(total)
    return totals


def write_report(out: Path, methods: list[str]) -> Path:
    """``report.json``, ``report.md`` and PNG plots from the methods' results folders."""
    runs = {m: summarize(out / m) for m in methods if finished(out / m, 0)}
    write_json(out / "report.json", runs)
    plots = _plots(out, runs)
    write_atomic(out / "report.md", _markdown(runs, plots))
    return out / "report.md"


LABELS = {"fedavg-full": "FedAvg full fine-tuning", "fedavg-lora": "FedAvg LoRA (full model)",
          "offsite": "Offsite", "offsite-lora": "Offsite + LoRA", "offsite-bitfit": "Offsite + BitFit",
          "offsite-bottleneck": "Offsite + bottleneck adapters"}


def accuracy_rows(runs: dict[str, dict]) -> list[tuple[str, dict]]:
    """The paper's rows: zero-shot full and emulator, FedAvg baselines, offsite emulator and plug-in.

    Runs are labelled by method; a variant (``[compare.runs.NAME]``) by its name.
    """
    def label(name, run):
        return LABELS.get(name, name) if name == Settings.from_config(run["config"]).method.name \
            else name
    first = next(iter(runs.values()))["rounds"][0]
    rows = [("Full zero-shot", first.get("plugin") or first.get("full"))]
    plain = next((r for r in runs.values() if "emulator" in r["rounds"][0] and not r["distillation"]), None)
    if plain:
        rows.append(("Emulator zero-shot", plain["rounds"][0]["emulator"]))
    for name, run in runs.items():
        if run["distillation"] and "emulator" in run["rounds"][0]:
            rows.append((f"Distilled emulator zero-shot [{name}]", run["rounds"][0]["emulator"]))
    for name, run in runs.items():
        final = run["rounds"][-1]
        settings = Settings.from_config(run["config"])
        if settings.method.trains_full_model:
            rows.append((label(name, run), final["full"]))
        elif settings.method.trains:
            smaller = sorted(int(key.removeprefix(SMALLER_EVAL)) for key in final if key.startswith(SMALLER_EVAL))
            k = settings.emulator.emulator_layers
            size = (f" k={k}" if k else " (configured)") if smaller else ""  # a fleet's emulators, by size
            rows.append((f"{label(name, run)} emulator{size} (emulator + adapter)", final["emulator"]))
            rows += [(f"{label(name, run)} emulator k={small} (emulator + adapter)", final[f"{SMALLER_EVAL}{small}"])
                     for small in smaller]
            rows.append((f"{label(name, run)} plug-in (full model + adapter)", final["plugin"]))
    return rows


def fidelity_rows(runs: dict[str, dict]) -> list[list[str]]:
    """Held-out perplexity of the emulators each distilled run used, before and after distillation."""
    rows = []
    for name, run in runs.items():
        record = run.get("distillation")
        if record:
            rows.append([name, f"{record['steps']} ({record['seconds']:.0f} s)", f"{record['full_ppl']:.1f}",
                         f"{record['emulator_ppl_before']:.1f}", f"{record['emulator_ppl_after']:.1f}"])
    return rows


def _markdown(runs: dict[str, dict], plots: list[str]) -> str:
    any_run = next(iter(runs.values()))
    s = Settings.from_config(any_run["config"])
    first = any_run["rounds"][0][next(k for k in any_run["rounds"][0] if k != "round")]
    n, whole = first["n"], first.get("split_size", first["n"])
    scored = f"{n} held-out test examples" if n == whole else \
        f"{n} of the {whole} held-out test examples (the seeded test split's first {n}, the same for every row)"
    split = f"{s.emulator.adapter_bottom}-{s.emulator.emulator_layers}-{s.emulator.adapter_top}" \
        if s.emulator.drop_ratio is None else f"{s.emulator.adapter_bottom},{s.emulator.adapter_top} (drop " \
        f"{s.emulator.drop_ratio:g})"
    lines = [f"# Comparison: {s.model} on {s.task}", "",
             f"{s.num_rounds} rounds, {s.data.num_partitions} clients, "
             f"{s.data.partitioner} partitions (alpha {s.data.alpha}), "
             f"{s.train.local_steps} local steps x batch {s.train.batch_size}, split {split}; "
             f"accuracy on {scored} (± one standard error).", "",
             markdown_table(["setting", "acc", "acc_norm"], [
                 [name, f"{m['acc']:.3f} ± {m['acc_stderr']:.3f}", f"{m['acc_norm']:.3f}"]
                 for name, m in accuracy_rows(runs)]), ""]
    fidelity = fidelity_rows(runs)
    if fidelity:
        distilled = next(r["distillation"] for r in runs.values() if r.get("distillation"))
        lines += ["## Emulator fidelity", "", markdown_table(
            ["run", "distillation steps", "full model ppl", "emulator ppl before", "emulator ppl after"], fidelity),
            "", f"Perplexity on held-out {distilled['corpus']} text (the corpus' validation split).", ""]
        if distilled.get("corpus_composition", {}).get("sources"):
            lines += [f"The model owner's public corpus: {describe_composition(distilled['corpus_composition'])}.", ""]
    trained = {m: r for m, r in runs.items() if "client_peak_memory_mb" in r}
    base = trained.get(BASELINE)
    def ratio(run, key):
        return f"{run[key] / base[key]:.3f}" if base else "-"
    lines += ["## Cost per client", "", markdown_table(
        ["method", "MB down/round", "MB up/round", "one-time MB", "rounds MB, all clients", "peak MB", "train s/round",
         "tokens/s", "trainable params", f"bytes vs {BASELINE}", f"memory vs {BASELINE}", f"time vs {BASELINE}"],
        [[m, f"{r['bytes_down_per_client_round'] / 1e6:.1f}", f"{r['bytes_up_per_client_round'] / 1e6:.1f}",
          f"{r['one_time_bytes_per_client'] / 1e6:.1f}",
          f"{_rounds_bytes(r['communication']) / 1e6:.1f}",
          f"{r['client_peak_memory_mb']:.0f}",
          f"{r['client_train_seconds_per_round']:.1f}", f"{r['client_tokens_per_s']:.0f}",
          f"{r['trainable_params']:,}", ratio(r, "bytes_down_per_client_round"),
          ratio(r, "client_peak_memory_mb"), ratio(r, "client_train_seconds_per_round")]
         for m, r in trained.items()]), "",
        "Peak memory is the client process's peak RSS on CPU (the allocator's peak on GPU); "
        "bytes are the Flower records' own byte counts; one-time MB is the model each new client downloads "
        "once (the emulator for offsite; for full fine-tuning only the config and tokenizer, as its rounds carry "
        "every weight), counted apart from the rounds; rounds MB, all clients: everything the rounds "
        "sent down and up, all clients together (report.json: communication).", ""]
    lines += [f"{m} re-aligned its emulator before every round: "
              f"{r['realign_bytes_down_per_client_round'] / 1e6:.3f} MB of factors down per client and round (in "
              "rounds MB, apart in report.json: communication.realign_bytes_down), "
              f"{r['owner_realign_seconds_per_round']:.1f} s of the model owner's time per round.\n"
              for m, r in trained.items() if "realign_bytes_down_per_client_round" in r]
    lines += [f"![{name}]({name})" for name in plots]
    return "\n".join(lines) + "\n"


def _plots(out: Path, runs: dict[str, dict]) -> list[str]:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = [(f"{method} / {model}", run, model) for method, run in runs.items()
              for model in run["rounds"][0] if model != "round"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for label, run, model in series:
        rounds = [r["round"] for r in run["rounds"]]
        acc = [r[model]["acc"] for r in run["rounds"]]
        left.plot(rounds, acc, marker="o", label=label)
        if "cumulative_bytes_per_client" in run:
            sent = run["cumulative_bytes_per_client"]  # one entry per round, from round 0
            right.plot([sent[r] / 1e6 for r in rounds], acc, marker="o", label=label)
    left.set(xlabel="round", ylabel="test accuracy", title="Accuracy by round")
    left.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    right.set(xlabel="MB communicated per client (incl. one-time download)", ylabel="test accuracy",
              title="Accuracy by communication", xscale="log")
    for axis in (left, right):
        axis.grid(alpha=0.3)
    left.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, out / "accuracy.png")

    fig, (mem, time_) = plt.subplots(1, 2, figsize=(9, 3.5))
    names = [m for m in runs if "client_peak_memory_mb" in runs[m]]
    mem.bar(names, [runs[m]["client_peak_memory_mb"] for m in names], color="tab:blue")
    mem.set(ylabel="MB", title="Client peak memory")
    time_.bar(names, [runs[m]["client_train_seconds_per_round"] for m in names], color="tab:orange")
    time_.set(ylabel="seconds", title="Client train time per round")
    fig.tight_layout()
    _save(fig, out / "client_cost.png")
    plt.close("all")
    return ["accuracy.png", "client_cost.png"]


def _save(fig, path: Path) -> None:
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    write_atomic(path, buffer.getvalue())
