"""The model owner's Flower ServerApp: split, deliver the emulator once, run the rounds."""
from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp

from fl_offsite.config import validate
from fl_offsite.delivery import ModelPackage, deliver
from fl_offsite.errors import UserError
from fl_offsite.local_data import task_answers
from fl_offsite.logs import log_to_console
from fl_offsite.lora import PEFT_DIR
from fl_offsite.outputs import CARD, after_round, save_final
from fl_offsite.owner import ModelOwner, lr_schedule
from fl_offsite.results import CHECKPOINT, DELIVERY, RunFolder
from fl_offsite.settings import Settings
from fl_offsite.train import HALF
from fl_offsite.tracking import TENSORBOARD_DIR, TensorBoardLog
from strategies.aggregation import aggregation_strategy
from strategies.offsite import OffsiteStrategy, evaluation_record

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
    previous = run.read_config()
    if previous is not None and settings.results.resume and _essential(previous) != _essential(config):
        raise UserError(f"{run.root} holds a run with another configuration; choose another results.dir "
                         "or set results.resume=false")
    checkpoint = run.load_checkpoint() if settings.results.resume else None
    if checkpoint is None:
        run = _fresh(run)
    run.write_config(config)
    owner = ModelOwner.prepare(settings, run.root)
    initial = owner.initial_payload()
    if checkpoint and checkpoint.payload.keys() != initial.keys():
        raise UserError(f"the checkpoint in {run.root} holds other tensors than this run trains; choose another "
                        "results.dir or set results.resume=false")
    # in the initial payload's order: the checkpoint file's is sorted, and FedAvgM pairs arrays by position
    payload = {name: checkpoint.payload[name] for name in initial} if checkpoint else initial
    done = checkpoint.round if checkpoint else 0
    if not settings.method.trains:  # zero-shot: the full model and the emulator, evaluated
        record = evaluation_record(0, owner.evaluate(0, payload))
        run.append_round(record)
        if settings.results.tensorboard:
            tracker = TensorBoardLog(run.root / TENSORBOARD_DIR)
            tracker.write(record)
            tracker.close()
        return run.root
    if done >= settings.num_rounds:
        log.info("%s already finished %d rounds", run.root, done)
        return run.root

    timeout = settings.strategy.round_timeout
    nodes = _wait_for_nodes(grid, settings.strategy.min_available_nodes, timeout)
    package = ModelPackage.from_folder(owner.base_folder, dtype=HALF.get(settings.train.precision),
                                       carried=owner.carried_weights())
    sent = deliver(grid, package, nodes, timeout=max(timeout, DELIVERY_TIMEOUT_S))
    run.record_delivery(package.digest, package.nbytes, sent)
    tracker = TensorBoardLog(run.root / TENSORBOARD_DIR, first_round=done + 1 if done else 0) \
        if settings.results.tensorboard else None
    strategy = OffsiteStrategy(
        aggregation_strategy(settings.strategy, settings.dp, len(nodes)), reference=payload,
        evaluate_payload=owner.evaluate, run=run,
        lr_at=lr_schedule(settings.train.lr, settings.lr_schedule, settings.num_rounds),
        min_replies=settings.strategy.min_train_nodes, seed=settings.seed,
        base_config={"digest": package.digest,
                     "split-plan": json.dumps(owner.plan.to_json()) if owner.plan else "",
                     "task-answers": json.dumps(answers) if (answers := task_answers(owner.task)) else ""},
        rounds_done=done, max_update_norm=settings.strategy.max_update_norm,
        round_timeout=timeout, after_round=after_round(owner, run, len(nodes), tracker),
        payload_kind=owner.tuning.payload_kind(owner.plan))
    if checkpoint:
        strategy.restore(checkpoint.strategy_state)
        log.info("Resuming %s after round %d", run.root, done)
    try:
        result = strategy.start(grid=grid, initial_arrays=ArrayRecord(payload),
                                num_rounds=settings.num_rounds - done, timeout=timeout,
                                evaluate_fn=strategy.evaluate)
    finally:
        if tracker is not None:
            tracker.close()
    save_final(owner, run, result.arrays.to_torch_state_dict(), len(nodes))
    log.info("Results in %s", run.root)
    return run.root


def _essential(config: dict) -> dict:
    """The settings a resumed run must share with the interrupted one."""
    return {k: v for k, v in config.items() if not k.startswith(("results.", "eval.")) and k != "num-rounds"}


def _fresh(run: RunFolder) -> RunFolder:
    """Clear the records of an earlier run in the same folder."""
    for name in ("metrics.jsonl", "adapter.safetensors", "model.safetensors", "lora.safetensors", DELIVERY, CARD):
        (run.root / name).unlink(missing_ok=True)
    for name in (CHECKPOINT, PEFT_DIR, TENSORBOARD_DIR):
        shutil.rmtree(run.root / name, ignore_errors=True)
    return run


def _wait_for_nodes(grid: Grid, minimum: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while len(nodes := list(grid.get_node_ids())) < minimum:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(nodes)} of the {minimum} required nodes connected in {timeout:.0f} s")
        log.info("Waiting for nodes: %d of %d connected", len(nodes), minimum)
        time.sleep(1)
    return nodes
