"""The data owner's Flower ClientApp: cache the emulator once, train the adapter each round."""
from __future__ import annotations

import json
import logging
import os
from functools import lru_cache

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from fl_offsite.config import validate
from fl_offsite.data import pad_id
from fl_offsite.delivery import node_store
from fl_offsite.errors import UserError
from fl_offsite.local_data import BadDataFile, data_path, load_examples
from fl_offsite.logs import log_to_console
from fl_offsite.models import best_device, load_model, load_tokenizer
from fl_offsite.split import SplitPlan
from fl_offsite.train import HALF, TrainSettings, half_frozen, train_local
from fl_offsite.payload import get_payload, set_payload
from fl_offsite.tuning import Tuning

log = logging.getLogger(__name__)


def dp_clipping(msg: Message, context: Context, call_next) -> Message:
    """Flower's ``fixedclipping_mod`` on the training messages of a differentially private run."""
    if msg.metadata.message_type == MessageType.TRAIN and KEY_CLIPPING_NORM in msg.content["config"]:
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


app = ClientApp(mods=[dp_clipping])


@app.query("model_status")
def model_status(msg: Message, context: Context) -> Message:
    store = node_store(context.node_config, context.node_id)
    has = store.has(msg.content["model"]["digest"])
    return Message(RecordDict({"model": ConfigRecord({"has": has})}), reply_to=msg)


@app.query("model")
def receive_model(msg: Message, context: Context) -> Message:
    store = node_store(context.node_config, context.node_id)
    folder = store.store(msg.content["model"]["digest"], msg.content)
    log.info("node %s cached the delivered model in %s", context.node_id, folder)
    return Message(RecordDict({"model": ConfigRecord({"has": True})}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    log_to_console()
    config = validate(dict(context.run_config))
    round_config = msg.content["config"]
    store = node_store(context.node_config, context.node_id)
    digest = round_config["digest"]
    if not store.has(digest):
        raise UserError(f"node {context.node_id} has no model {digest}: it must be delivered before training")
    plan = SplitPlan.from_json(json.loads(round_config["split-plan"])) if round_config["split-plan"] else None
    tuning = Tuning.from_config(config)
    model, tokenizer = _cached_model(digest, tuning, round_config["split-plan"], config["seed"],
                                     config["train.precision"], folder=str(store.folder(digest)))
    names = tuning.names(model, plan)
    request = msg.content["arrays"].to_torch_state_dict()
    set_payload(model, request, names, tuning.payload_kind(plan))

    partition_id, num_partitions = _partition(context, config)
    answers = tuple(json.loads(round_config["task-answers"])) if round_config.get("task-answers") else None
    try:
        features = _features(_local_data(context), config["task"], config["seed"], config["data.partitioner"],
                             config["data.alpha"], num_partitions, partition_id, config["train.max-length"],
                             str(store.folder(digest)), answers)
    except BadDataFile as err:  # the rows stay on this node: the model owner learns only how many
        log.error("%s", err)
        raise UserError(f"the data owner's file was refused ({err.summary}); the rows and what to fix are in "
                        "the node's log") from None
    rnd = int(round_config["round"])
    settings = TrainSettings(
        lr=float(round_config["lr"]), batch_size=config["train.batch-size"], grad_accum=config["train.grad-accum"],
        local_steps=config["train.local-steps"], local_epochs=config["train.local-epochs"],
        weight_decay=config["train.weight-decay"], grad_clip=config["train.grad-clip"],
        proximal_mu=float(round_config.get("proximal-mu", 0.0)),
        seed=config["seed"] * 7919 + rnd * 131 + partition_id,
        precision=config["train.precision"])
    stats = train_local(model, set(names.values()), features, settings, pad_id(tokenizer),
                        desc=f"client {partition_id} round {rnd}")
    log.info("client %d round %d: loss %.4f, %d steps, %.1f s, %.0f tokens/s, peak %.0f MB", partition_id, rnd,
             stats.loss, stats.steps, stats.seconds, stats.tokens_per_s, stats.peak_memory_mb)
    metrics = MetricRecord({
        "num-examples": len(features), "partition-id": partition_id, "round": rnd, "train-loss": stats.loss,
        "train-steps": stats.steps, "train-seconds": stats.seconds, "tokens-per-s": stats.tokens_per_s,
        "peak-memory-mb": stats.peak_memory_mb, "trainable-params": stats.trainable_params})
    arrays = ArrayRecord(get_payload(model, names, order=request))
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)


def _partition(context: Context, config: dict) -> tuple[int, int]:
    node = context.node_config
    if data_path(node):  # a data owner with its own data: partition-id only names it in the records
        return int(node.get("partition-id", 0)), 1
    if "partition-id" not in node:
        raise UserError(f"node {context.node_id} has no partition-id: start it with "
                        "--node-config 'partition-id=N num-partitions=M'")
    return int(node["partition-id"]), int(node.get("num-partitions", config["data.num-partitions"]))


_MODEL: dict[tuple, tuple] = {}


def _cached_model(digest: str, tuning: Tuning, plan_json: str, seed: int, precision: str, folder: str):
    """The delivered model ready for ``tuning``, loaded once per process: a Ray actor serves many rounds and
    many simulated nodes, whose stores hold the same model under the same digest."""
    key = (digest, tuning, plan_json, seed, precision)
    if key not in _MODEL:
        _MODEL.clear()
        model, tokenizer = load_model(folder)
        plan = SplitPlan.from_json(json.loads(plan_json)) if plan_json else None
        model = tuning.apply(model.to(best_device()), plan, seed=seed)
        if precision != "fp32":  # frozen weights in half precision (trainable ones stay fp32)
            half_frozen(model, set(tuning.names(model, plan).values()), HALF[precision])
        _MODEL[key] = model, tokenizer
    return _MODEL[key]


def _local_data(context: Context) -> tuple[str, int] | None:
    """The node's own data file and its modification time (a changed file is read again), if it has one."""
    path = data_path(context.node_config)
    return (path, os.stat(path).st_mtime_ns) if path else None


@lru_cache(maxsize=8)
def _features(local: tuple[str, int] | None, task: str, seed: int, partitioner: str, alpha: float,
              num_partitions: int, partition_id: int, max_length: int, tokenizer_folder: str,
              answers: tuple[str, ...] | None = None) -> list[dict[str, list[int]]]:
    """This data owner's tokenized training examples (loss on the answer tokens only): its own
    file when the node config names a data-path (checked against the task's ``answers``), else its
    partition of the task."""
    from fl_offsite.data import encode_choice_example
    from fl_offsite.partition import partition_indices
    from fl_offsite.tasks import load_task

    if local is not None:
        examples = load_examples(local[0], answers)
    else:
        train = load_task(task, seed=seed).train
        indices = partition_indices([ex.label for ex in train], num_partitions, partition_id, partitioner, alpha,
                                    seed)
        if not indices:
            raise UserError(f"partition {partition_id} of {num_partitions} is empty: use fewer clients")
        examples = [train[i] for i in indices]
    tokenizer = load_tokenizer(tokenizer_folder)
    return [encode_choice_example(tokenizer, ex, max_length) for ex in examples]

