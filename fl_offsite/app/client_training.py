"""A data owner's training round: load the delivered model (cached), plug in the round's tensors, train, reply."""
from __future__ import annotations

import json
import logging
import os
import secrets
import time

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from transformers import PreTrainedTokenizerBase

from fl_offsite.app import wire
from fl_offsite.app.node_cache import ExampleSource, Features, ModelKey, NodeCache
from fl_offsite.app.node_policy import NodePolicy
from fl_offsite.app.node_store import node_store
from fl_offsite.config.sections import DataSettings
from fl_offsite.config.settings import Settings
from fl_offsite.data.encode import pad_id
from fl_offsite.data.local_file import BadDataFile, data_path
from fl_offsite.emulator.realign import set_factors
from fl_offsite.errors import UserError
from fl_offsite.learn.train import train_local
from fl_offsite.surgery.payload import get_payload, set_payload
from fl_offsite.surgery.split import SplitPlan
from fl_offsite.surgery.tuning import tuned_names

log = logging.getLogger(__name__)

CACHE = NodeCache()  # this process's prepared model and tokenized examples, kept between messages
DATA_FILE_REFUSED = ("this node's data file does not fit the run's task (its format or the task's answers) and was "
                     "refused; what to fix is in the node's log")
PINNED = "fl-offsite-pinned"  # the run's context state: what this node accepted in the run's first round


def train_round(msg: Message, context: Context) -> Message:
    """Train what the owner's message carries on this node's examples; reply with it and the metrics."""
    settings = Settings.from_config(dict(context.run_config))
    policy = NodePolicy.from_node_config(context.node_config)
    policy.check(settings)
    round_config = wire.config_record(msg, "config")
    store = node_store(context.node_config, context.node_id)
    digest = wire.text(round_config, "digest", pattern=wire.DIGEST)
    if not store.has(digest):
        raise wire.SharedError(f"node {context.node_id} has no model {digest}: it must be delivered before training")
    plan_json = wire.text(round_config, "split-plan")
    plan = _plan(plan_json)
    tuning, folder = settings.tuning, str(store.use(digest))
    realigned = "realign" in msg.content.array_records
    started = time.perf_counter()
    model, tokenizer = CACHE.model(ModelKey(digest, folder, tuning, plan_json, settings.seed,
                                            settings.train.precision, settings.realign if realigned else None))
    names = tuned_names(tuning, model, plan)
    request = wire.array_record(msg, "arrays").to_torch_state_dict()
    set_payload(model, request, names, tuning.payload_kind(plan))
    if realigned:  # the owner re-aligned this emulator to the round's adapter
        if plan is None:
            raise wire.BadMessage("re-alignment factors came with a full model (no split plan)")
        set_factors(model, plan, wire.array_record(msg, "realign").to_torch_state_dict())

    loaded = time.perf_counter()
    partition_id, num_partitions = _partition(context, settings.data)
    answers = pinned_answers(context, _answers(round_config))
    features = training_features(CACHE, ExampleSource(_local_data(context), settings.task, settings.seed,
                                                       settings.data, num_partitions, partition_id, digest, answers),
                                 tokenizer)
    tokenized = time.perf_counter()
    rnd = wire.integer(round_config, "round", low=1, high=1_000_000)
    train_settings = settings.train.for_round(rnd, partition_id, lr=wire.number(round_config, "lr", low=0, high=1),
                                              proximal_mu=wire.number(round_config, "proximal-mu", low=0, high=1e6,
                                                                      default=0.0))
    stats = train_local(model, set(names.values()), features, train_settings, pad_id(tokenizer),
                        desc=f"client {partition_id} round {rnd}")
    log.info("client %d round %d: loss %.4f, %d steps, %.1f s, %.0f tokens/s, peak %.0f MB (before training: model "
             "%.1f s, examples %.1f s)", partition_id, rnd, stats.loss, stats.steps, stats.seconds, stats.tokens_per_s,
             stats.peak_memory_mb, loaded - started, tokenized - loaded)
    metrics = MetricRecord({
        "num-examples": len(features), "partition-id": partition_id, "round": rnd, "train-loss": stats.loss,
        "train-steps": stats.steps, "train-seconds": stats.seconds, "tokens-per-s": stats.tokens_per_s,
        "peak-memory-mb": stats.peak_memory_mb, "trainable-params": stats.trainable_params})
    reply = get_payload(model, names, order=request)
    if policy.protects_update:
        reply = protected_update(request, reply, policy)
    arrays = ArrayRecord(reply)
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)


def protected_update(sent: dict[str, torch.Tensor], trained: dict[str, torch.Tensor],
                     policy: NodePolicy) -> dict[str, torch.Tensor]:
    """``trained`` with its change from ``sent`` clipped to the node's L2 bound, plus the node's Gaussian noise
    (seeded from the operating system: the owner knows the run's seeds)."""
    delta = {k: trained[k].float() - sent[k].float() for k in trained}
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(d) for d in delta.values()]))
    scale = min(1.0, policy.update_clip_norm / max(float(norm), 1e-12))
    generator = torch.Generator().manual_seed(secrets.randbits(63))
    sigma = policy.update_noise_multiplier * policy.update_clip_norm
    return {k: (sent[k].float() + d * scale + sigma * torch.randn(d.shape, generator=generator)).to(trained[k].dtype)
            for k, d in delta.items()}


def training_features(cache: NodeCache, source: ExampleSource, tokenizer: PreTrainedTokenizerBase) -> Features:
    """``cache``'s tokenized examples of ``source``. A refused data file reaches the model owner as one fixed
    text: how many rows are bad depends on the owner's answers and the node's labels, so a count would let the
    owner learn the labels one answer set at a time. The details go to the node's log."""
    try:
        return cache.features(source, tokenizer)
    except BadDataFile as err:
        log.error("%s", err)
        raise wire.SharedError(DATA_FILE_REFUSED) from None


def pinned_answers(context: Context, answers: tuple[str, ...] | None) -> tuple[str, ...] | None:
    """``answers`` when they are the task answers this node accepted in the run's first round (kept in the run's
    context state); other answers are refused: an owner trying answer sets round after round could tell from
    the refusals how the node's rows are labelled."""
    sent = json.dumps(answers)
    if PINNED not in context.state:
        context.state[PINNED] = ConfigRecord({"task-answers": sent})
    elif context.state.config_records[PINNED]["task-answers"] != sent:
        raise wire.SharedError("task-answers changed during the run: this node trains only with the answers it "
                               "accepted in the run's first round; start a new run to change them")
    return answers


def _plan(plan_json: str) -> SplitPlan | None:
    """The round's split plan (None: the full model trains); one out of range is a BadMessage saying which field."""
    if not plan_json:
        return None
    try:
        return SplitPlan.from_json(json.loads(plan_json))
    except UserError as err:
        raise wire.BadMessage(f"split-plan: {err}") from None
    except (ValueError, KeyError, TypeError):
        raise wire.BadMessage("split-plan is not a split plan") from None


def _answers(round_config: ConfigRecord) -> tuple[str, ...] | None:
    """The task's fixed answers, if the owner sent them (a data owner's file is checked against them)."""
    answers = wire.json_value(round_config, "task-answers", default="")
    if answers is None:
        return None
    if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
        raise wire.BadMessage("task-answers must be a JSON list of strings")
    return tuple(answers)


def _partition(context: Context, data: DataSettings) -> tuple[int, int]:
    node = context.node_config
    if data_path(node):  # a data owner with its own data: partition-id only names it in the records
        return int(node.get("partition-id", 0)), 1
    if "partition-id" not in node:
        raise UserError(f"node {context.node_id} has no partition-id: start it with "
                        "--node-config 'partition-id=N num-partitions=M'")
    return int(node["partition-id"]), int(node.get("num-partitions", data.num_partitions))


def _local_data(context: Context) -> tuple[str, int] | None:
    """The node's own data file and its modification time (a changed file is read again), if it has one."""
    path = data_path(context.node_config)
    return (path, os.stat(path).st_mtime_ns) if path else None
