"""The model owner's Flower ServerApp: split, deliver the emulator once, run the rounds."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp

from fl_offsite.app.delivery import ModelPackage, ask_profiles, deliver
from fl_offsite.app.owner import ModelOwner, lr_schedule
from fl_offsite.config.settings import Settings, validate
from fl_offsite.errors import UserError
from fl_offsite.files import locked
from fl_offsite.learn.train import HALF
from fl_offsite.logs import log_to_console
from fl_offsite.run.folder import Checkpoint, RunFolder
from fl_offsite.run.outputs import after_round, save_final
from fl_offsite.run.records import RoundRecord
from fl_offsite.run.tensorboard import TensorBoardLog
from strategies.aggregation import aggregation_strategy
from strategies.offsite import OffsiteStrategy
from strategies.policy import Exchange, RoundPolicy

log = logging.getLogger(__name__)
app = ServerApp()

# The delivery's queries are the first a node answers: they start its ClientApp (imports, then the model from
# disk or from the wire), slow on a loaded machine, so they wait at least this long whatever the round timeout.
DELIVERY_TIMEOUT_S = 600.0


@app.main()
def main(grid: Grid, context: Context) -> None:
    log_to_console()
    run_federated(grid, validate(dict(context.run_config)))


def run_federated(grid: Grid, config: dict) -> Path:
    """Run (or resume) one federated run described by ``config``; return its results folder."""
    settings = Settings.from_config(config)
    run = RunFolder(Path(settings.results.dir).expanduser().resolve())
    with locked(run.root, "another run", wait=False):
        return _run_in(run, grid, settings, config)


def _run_in(run: RunFolder, grid: Grid, settings: Settings, config: dict) -> Path:
    checkpoint = _resume_point(run, settings, config)
    owner = ModelOwner.prepare(settings, run)
    payload = _start_payload(owner, run, checkpoint)
    done = checkpoint.round if checkpoint else 0
    if not settings.method.trains:  # zero-shot: the full model and the emulator, evaluated
        _zero_shot(owner, run, payload)
    elif done >= settings.num_rounds:
        log.info("%s already finished %d rounds", run.root, done)
    else:
        _train(grid, owner, run, payload, checkpoint)
        log.info("Results in %s", run.root)
    return run.root


def _resume_point(run: RunFolder, settings: Settings, config: dict) -> Checkpoint | None:
    """The checkpoint to resume from, if any (without one, an earlier run's records are cleared); then
    ``config`` is written to the run."""
    run.check_ours()
    previous = run.read_config()
    if previous is not None and settings.results.resume and _essential(previous) != _essential(config):
        raise UserError(f"{run.root} holds a run with another configuration; choose another results.dir "
                        "(results.resume=false would delete that run's records)")
    checkpoint = run.load_checkpoint() if settings.results.resume else None
    if checkpoint is None:
        run.clear()
    run.write_config(config)
    return checkpoint


def _start_payload(owner: ModelOwner, run: RunFolder, checkpoint: Checkpoint | None) -> dict[str, torch.Tensor]:
    """The payload the rounds start from: the checkpoint's, or the owner's initial one."""
    initial = owner.initial_payload()
    if checkpoint is None:
        return initial
    if checkpoint.payload.keys() != initial.keys():
        raise UserError(f"the checkpoint in {run.root} holds other tensors than this run trains; choose another "
                        "results.dir (results.resume=false would delete that run's records)")
    # in the initial payload's order: the checkpoint file's is sorted, and FedAvgM pairs arrays by position
    return {name: checkpoint.payload[name] for name in initial}


def _zero_shot(owner: ModelOwner, run: RunFolder, payload: dict[str, torch.Tensor]) -> None:
    record = RoundRecord(0, owner.evaluate(0, payload))
    run.append_round(record)
    if owner.settings.results.tensorboard:
        tracker = TensorBoardLog(run.tensorboard)
        tracker.write(record)
        tracker.close()


def _train(grid: Grid, owner: ModelOwner, run: RunFolder, payload: dict[str, torch.Tensor],
           checkpoint: Checkpoint | None) -> None:
    """Deliver the models, run the rounds left, and keep the final weights."""
    settings, done = owner.settings, checkpoint.round if checkpoint else 0
    packages, node_config = _deliver(grid, owner, run)
    tracker = TensorBoardLog(run.tensorboard, first_round=done + 1 if done else 0) \
        if settings.results.tensorboard else None
    owner.outputs = after_round(owner, run, len(packages), tracker)
    strategy = _strategy(owner, run, payload, node_config, done)
    if checkpoint:
        strategy.restore(checkpoint.strategy_state)
        log.info("Resuming %s after round %d", run.root, done)
    try:
        result = strategy.start(grid=grid, initial_arrays=ArrayRecord(payload),
                                num_rounds=settings.num_rounds - done, timeout=settings.strategy.round_timeout,
                                evaluate_fn=strategy.evaluate)
    finally:
        strategy.scoring.wait()  # a round still scoring is kept before the run ends, whatever ended it
        if tracker is not None:
            tracker.close()
    save_final(owner, run, result.arrays.to_torch_state_dict(), len(packages))


def _deliver(grid: Grid, owner: ModelOwner, run: RunFolder) -> tuple[dict[int, ModelPackage], dict[int, dict]]:
    """Deliver each node's model once, and record it; return the packages and each node's per-node keys."""
    timeout = owner.settings.strategy.round_timeout
    nodes = _wait_for_nodes(grid, owner.settings.strategy.min_available_nodes, timeout)
    packages, node_config, refused = _packages(grid, owner, nodes, max(timeout, DELIVERY_TIMEOUT_S))
    sent, failed = deliver(grid, packages, timeout=max(timeout, DELIVERY_TIMEOUT_S))
    run.record_delivery({n: (p.digest, p.nbytes, node_config[n]["emulator-layers"]) for n, p in packages.items()},
                        sent, {**refused, **failed})
    if len(sent) < owner.settings.strategy.min_train_nodes:
        raise UserError(f"only {len(sent)} node(s) hold their model (strategy.min-train-nodes = "
                        f"{owner.settings.strategy.min_train_nodes}): " + "; ".join(f"node {n}: {why}" for n, why in
                                                                                 {**refused, **failed}.items()))
    return {n: packages[n] for n in sent}, {n: node_config[n] for n in sent}


def _strategy(owner: ModelOwner, run: RunFolder, payload: dict[str, torch.Tensor], node_config: dict[int, dict],
              done: int) -> OffsiteStrategy:
    """The offsite strategy of ``owner``'s settings, for the nodes of ``node_config``, after ``done`` rounds."""
    s = owner.settings
    answers = owner.task.answers()
    inner = aggregation_strategy(s.strategy, s.dp, len(node_config))
    policy = RoundPolicy(min_replies=s.strategy.min_train_nodes, seed=s.seed,
                         lr_at=lr_schedule(s.train.lr, s.lr_schedule, s.num_rounds),
                         max_update_norm=s.strategy.max_update_norm, round_timeout=s.strategy.round_timeout,
                         max_examples=s.strategy.max_examples, overlap=s.eval.overlap and not s.realign.enabled,
                         num_rounds=s.num_rounds)
    exchange = Exchange(payload, owner.tuning.payload_kind(owner.plan), node_config=node_config,
                        base_config={"task-answers": json.dumps(answers) if answers else ""})
    owner.start_realignment()
    return OffsiteStrategy(inner, owner, run, policy, exchange, rounds_done=done)


def _packages(grid: Grid, owner: ModelOwner, nodes: list[int], timeout: float
              ) -> tuple[dict[int, ModelPackage], dict[int, dict], dict[int, str]]:
    """What each node is delivered once, the per-node keys of its training messages (model digest, split,
    emulator size), and the nodes refused (node -> why). Offsite-tuning asks every node for its profile
    and gives it the largest emulator that fits (fl_offsite.app.fleet); full fine-tuning sends all one model."""
    dtype = HALF.get(owner.settings.train.precision)
    if owner.plan is None:
        package = ModelPackage.from_folder(owner.base_folder, dtype=dtype, carried=owner.carried_weights())
        return ({n: package for n in nodes},
                {n: {"digest": package.digest, "split-plan": "", "emulator-layers": 0} for n in nodes}, {})
    emulators, refused = owner.assign_emulators(ask_profiles(grid, nodes, timeout))
    if len(emulators) < owner.settings.strategy.min_train_nodes:
        raise UserError(f"only {len(emulators)} node(s) can train (strategy.min-train-nodes = "
                        f"{owner.settings.strategy.min_train_nodes}): " + "; ".join(refused.values()))
    by_folder = {e.folder: ModelPackage.from_folder(e.folder, dtype=dtype) for e in emulators.values()}
    packages = {n: by_folder[e.folder] for n, e in emulators.items()}
    node_config = {n: {"digest": packages[n].digest, "split-plan": json.dumps(e.plan.to_json()),
                       "emulator-layers": e.plan.emulator_layers} for n, e in emulators.items()}
    if len(by_folder) > 1:
        log.info("Emulators by node: %s", ", ".join(f"node {n}: {e.plan.name}" for n, e in emulators.items()))
    return packages, node_config, refused


def _essential(config: dict) -> dict:
    """The settings a resumed run must share with the interrupted one."""
    return {k: v for k, v in config.items() if not k.startswith(("results.", "eval.")) and k != "num-rounds"}


def _wait_for_nodes(grid: Grid, minimum: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while len(nodes := list(grid.get_node_ids())) < minimum:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(nodes)} of the {minimum} required nodes connected in {timeout:.0f} s")
        log.info("Waiting for nodes: %d of %d connected", len(nodes), minimum)
        time.sleep(1)
    return nodes
