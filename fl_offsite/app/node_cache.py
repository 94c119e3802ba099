"""What a data owner's process keeps between training messages: one explicit, bounded cache.

A Flower client process (a Ray actor in simulation) serves many rounds and, in simulation,
many nodes, whose stores hold the same delivered model under the same digest (or, in a mixed
fleet, one of a few). Loading that model and tokenizing a partition cost seconds each, so the
process keeps the last two models (ready for their tuning, with their tokenizers), the training
split of the last task, and the tokenized examples of its last few data sources. Nothing is loaded
twice: reading the task again and loading a tokenizer for each new node made a Ray actor grow by
about 1.4 MB a round.
"""
from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass, field

from torch import nn
from transformers import PreTrainedTokenizerBase

from fl_offsite.app.delivery import load_delivered
from fl_offsite.app.node_policy import node_task
from fl_offsite.config.sections import DataSettings, RealignSettings, Tuning
from fl_offsite.data.encode import encode_choice_example
from fl_offsite.data.local_file import load_examples
from fl_offsite.data.models import best_device, placed
from fl_offsite.data.partition import partition_indices
from fl_offsite.data.tasks import ChoiceExample, load_task
from fl_offsite.emulator.realign import add_realign_lora
from fl_offsite.errors import UserError
from fl_offsite.learn.train import HALF, half_frozen
from fl_offsite.surgery.split import SplitPlan
from fl_offsite.surgery.tuning import apply_tuning, tuned_names

Features = list[dict[str, list[int]]]


@dataclass(frozen=True)
class ModelKey:
    """Everything that determines the model a client trains: the delivered folder and how it is prepared."""

    digest: str
    folder: str = field(compare=False)  # each simulated node's store holds the same model under the digest
    tuning: Tuning
    plan_json: str  # "" without a split (full fine-tuning)
    seed: int  # the initial LoRA / bottleneck weights
    precision: str
    realign: RealignSettings | None = None  # the emulator gets the owner's re-alignment LoRA layers


@dataclass(frozen=True)
class ExampleSource:
    """Where a data owner's training examples come from: its own file (path and modification time, so a
    changed file is read again) checked against the task's ``answers``, else its partition of the task."""

    local: tuple[str, int] | None
    task: str
    seed: int
    data: DataSettings
    num_partitions: int
    partition_id: int
    digest: str  # the delivered model, whose tokenizer encodes the examples
    answers: tuple[str, ...] | None = None


class NodeCache:
    """The last ``max_models`` prepared models (a simulated fleet's nodes train on emulators of different
    sizes), the last task's training split and the tokenized examples of the last ``max_sources`` sources."""

    def __init__(self, max_models: int = 2, max_sources: int = 8) -> None:
        self.max_models = max_models
        self.max_sources = max_sources
        self._models: OrderedDict[ModelKey, tuple[nn.Module, PreTrainedTokenizerBase]] = OrderedDict()
        self._task: tuple[tuple[str, int], list[ChoiceExample]] | None = None
        self._features: OrderedDict[ExampleSource, Features] = OrderedDict()

    def model(self, key: ModelKey) -> tuple[nn.Module, PreTrainedTokenizerBase]:
        """The delivered model ready for ``key.tuning`` (loaded again only when it is not among the last few)."""
        if key in self._models:
            self._models.move_to_end(key)
        else:
            while len(self._models) >= self.max_models:  # free the oldest before loading the next
                self._models.popitem(last=False)
            self._models[key] = _prepare_model(key)
        return self._models[key]

    def features(self, source: ExampleSource, tokenizer: PreTrainedTokenizerBase) -> Features:
        """The tokenized training examples of ``source`` (loss on the answer tokens only), encoded by
        ``tokenizer``: the tokenizer of the model ``source.digest``."""
        if source in self._features:
            self._features.move_to_end(source)
        else:
            examples = load_examples(source.local[0], source.answers) if source.local else self._partition(source)
            self._features[source] = _tokenized(examples, tokenizer, source.data.max_length)
            if len(self._features) > self.max_sources:
                self._features.popitem(last=False)
        return self._features[source]

    def _partition(self, source: ExampleSource) -> list[ChoiceExample]:
        """The examples of ``source``'s partition of the task (its training split read once per process)."""
        key = (node_task(source.task), source.seed)
        if self._task is None or self._task[0] != key:
            self._task = None
            self._task = (key, load_task(source.task, seed=source.seed).train)
        train = self._task[1]
        indices = partition_indices([ex.label for ex in train], source.num_partitions, source.partition_id,
                                    source.data.partitioner, source.data.alpha, source.seed)
        if not indices:
            raise UserError(f"partition {source.partition_id} of {source.num_partitions} is empty: use fewer clients")
        return [train[i] for i in indices]


def _prepare_model(key: ModelKey) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    delivered, tokenizer = load_delivered(key.folder)
    if tokenizer is None:
        raise UserError(f"the model delivered to {key.folder} has no tokenizer: the owner's package is incomplete")
    plan = SplitPlan.from_json(json.loads(key.plan_json)) if key.plan_json else None
    model = apply_tuning(key.tuning, placed(delivered, best_device()), plan, seed=key.seed)
    if key.precision != "fp32":  # frozen weights in half precision (trainable ones stay fp32)
        half_frozen(model, set(tuned_names(key.tuning, model, plan).values()), HALF[key.precision])
    if key.realign is not None:
        if plan is None:
            raise UserError("re-alignment factors came for a model without a split (full fine-tuning)")
        add_realign_lora(model, plan, key.realign)
    return model, tokenizer


def _tokenized(examples: list[ChoiceExample], tokenizer: PreTrainedTokenizerBase, max_length: int) -> Features:
    return [encode_choice_example(tokenizer, ex, max_length) for ex in examples]
