"""The model owner's side: the split, the package delivered once, and evaluation."""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import cast

import torch
from peft import PeftModel
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fl_offsite.app.fleet import SMALLER_EVAL, choose_layers, measure_footprint
from fl_offsite.app.profile import NodeProfile
from fl_offsite.config.sections import EmulatorRecipe, Tuning
from fl_offsite.config.settings import Settings
from fl_offsite.data.downloads import cache_dir
from fl_offsite.data.encode import pad_id
from fl_offsite.data.models import best_device, load_model, placed, resolve_model_path
from fl_offsite.data.tasks import TaskData, load_task
from fl_offsite.emulator.realign import Realignment, public_blocks
from fl_offsite.emulator.recipe import prepare_emulator
from fl_offsite.errors import UserError
from fl_offsite.files import json_digest, write_json
from fl_offsite.learn.evaluate import evaluate_task
from fl_offsite.learn.train import half_weights, precision_autocast
from fl_offsite.logs import clock_time
from fl_offsite.run.folder import ADAPTER, LORA, MODEL, AfterRound, RunFolder
from fl_offsite.run.records import RealignRecord, RoundRecord
from fl_offsite.surgery.payload import extract_adapter, get_payload, set_payload
from fl_offsite.surgery.split import EMULATOR_DIR, SplitPlan, write_split
from fl_offsite.surgery.tuning import apply_tuning, tuned_names
from fl_offsite.weights import state_digest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Emulator:
    """An emulator the owner prepared: its split, the model (ready for the run's tuning) and its folder."""

    plan: SplitPlan
    model: nn.Module  # a PeftModel for the LoRA tunings
    folder: Path  # the model delivered once to the nodes that train on it


@dataclass
class ModelOwner:
    """The full model, and for offsite-tuning its emulator; ``plan`` is None for full fine-tuning.

    ``plan``, ``emulator`` and ``base_folder`` are the configured emulator's (``split.emulator-layers`` = k);
    ``smaller`` holds the smaller ones a heterogeneous fleet's nodes train on, by k (see fl_offsite.app.fleet).
    It implements the offsite strategy's owner hooks (strategies.policy.OwnerHooks): evaluate, after a round
    (``outputs``), and re-align (``realigner``, from :meth:`start_realignment`).
    """

    settings: Settings
    model: nn.Module  # a PeftModel for the LoRA tunings
    tokenizer: PreTrainedTokenizerBase
    plan: SplitPlan | None
    emulator: nn.Module | None
    base_folder: Path  # the model delivered once to every node
    task: TaskData
    tuning: Tuning
    run: RunFolder
    smaller: dict[int, Emulator] = field(default_factory=dict)
    realigner: Realignment | None = None  # the emulators' per-round re-alignment, if the run re-aligns
    outputs: AfterRound | None = None  # what the run writes after each round (fl_offsite.run.outputs)
    model_path: str = ""  # where the full model was loaded from (a local folder for an offline alias)

    @classmethod
    def prepare(cls, settings: Settings, run: RunFolder) -> ModelOwner:
        began = time.perf_counter()
        loaded, tokenizer = load_model(settings.model)
        model = placed(loaded, best_device())
        if tokenizer is None:
            raise UserError(f"{settings.model} has no tokenizer; clients need one to read their data")
        task = load_task(settings.task, seed=settings.seed)
        log.info("model owner: %s and task %s ready in %s", settings.model, settings.task,
                 clock_time(time.perf_counter() - began))
        if settings.method.trains_full_model:
            plan, emulator = None, None
            base_folder = _model_folder(settings.model, model, tokenizer, run.full_model)
        else:
            plan, emulator, base_folder = _emulator_split(settings, settings.emulator, model, tokenizer, run.split)
            log.info("model owner: emulator (%s) ready after %s", settings.emulator.describe(),
                     clock_time(time.perf_counter() - began))
        tuning = settings.tuning
        tuned = apply_tuning(tuning, model, plan, seed=settings.seed)
        tuned_emulator = emulator and apply_tuning(tuning, emulator, plan, seed=settings.seed)
        return cls(settings, tuned, tokenizer, plan, tuned_emulator, base_folder, task, tuning, run,
                   model_path=resolve_model_path(settings.model))

    def configured(self) -> tuple[SplitPlan, nn.Module]:
        """The configured split and emulator (offsite methods; full fine-tuning has none)."""
        if self.plan is None or self.emulator is None:
            raise RuntimeError(f"method {self.settings.method.name} trains the full model: there is no emulator")
        return self.plan, self.emulator

    def emulator_for(self, k: int) -> Emulator:
        """The emulator with ``k`` middle blocks: the configured one, or a smaller one prepared once (by the
        same recipe: layer rule and distillation) and written to the run's ``smaller_split(k)``."""
        plan, emulator = self.configured()
        if k == plan.emulator_layers:
            return Emulator(plan, emulator, self.base_folder)
        if k not in self.smaller:
            began = time.perf_counter()
            recipe = replace(self.settings.emulator, emulator_layers=k, drop_ratio=None)
            plan, emulator, folder = _emulator_split(self.settings, recipe, self.model_without_tuning(), self.tokenizer,
                                                     self.run.smaller_split(k))
            self.smaller[k] = Emulator(plan, apply_tuning(self.tuning, emulator, plan, seed=self.settings.seed), folder)
            log.info("model owner: emulator %s for the fleet ready in %s", plan.name,
                     clock_time(time.perf_counter() - began))
        return self.smaller[k]

    def model_without_tuning(self) -> PreTrainedModel:
        """The full model as loaded: LoRA and bottleneck tunings changed ``model`` in place, so it is loaded again."""
        if self.tuning.kind in ("all", "bitfit"):
            return cast(PreTrainedModel, self.model)  # these tunings leave the loaded model as it is
        model, _ = load_model(self.settings.model)
        return placed(model, best_device())

    def assign_emulators(self, profiles: dict[int, NodeProfile]) -> tuple[dict[int, Emulator], dict[int, str]]:
        """Each node's emulator (the largest its profile fits, see fl_offsite.app.fleet), and the nodes refused
        (node -> why). Smaller emulators are prepared here, once each."""
        plan, emulator = self.configured()
        cap = plan.emulator_layers
        if cap < 1 and any(p.to_record() for p in profiles.values()):
            raise UserError(f"nodes state memory budgets or emulator sizes, but split {plan.name} keeps no "
                            "middle block to size: set split.emulator-layers >= 1")
        footprint = None
        if any(p.memory_budget_mb is not None and p.emulator_layers is None for p in profiles.values()):
            trainable = set(self.payload_names(emulator).values())
            footprint = measure_footprint(emulator, plan, trainable, self.settings.train.batch_size,
                                          self.settings.data.max_length, self.settings.train.precision,
                                          self.settings.fleet.overhead_mb)
            log.info("model owner: a client's training footprint, k middle blocks: %s",
                     ", ".join(f"about {footprint.mb(k):.0f} MB at k = {k}" for k in sorted({1, cap})))
        chosen, refused = {}, {}
        for node, profile in profiles.items():
            try:
                chosen[node] = choose_layers(node, profile, footprint, cap)
            except UserError as err:
                refused[node] = str(err)
                log.warning("model owner: node %s refused: %s", node, err)
        return {node: self.emulator_for(k) for node, k in chosen.items()}, refused

    def start_realignment(self) -> None:
        """Set up the per-round re-alignment (``realign.*``) of every emulator prepared: the configured one and a
        fleet's smaller ones (call it after the delivery); nothing when it is off or the run trains the full
        model."""
        s = self.settings.realign
        if not s.enabled or self.plan is None:
            return
        blocks = public_blocks(s, self.settings.emulator, self.model, self.tokenizer, self.settings.task,
                               self.settings.num_rounds)
        plan, emulator = self.configured()
        emulators = {plan.emulator_layers: (plan, emulator)}
        emulators.update({k: (e.plan, e.model) for k, e in self.smaller.items()})
        self.realigner = Realignment(s, self.model, emulators, self.load_payload, blocks, pad_id(self.tokenizer))

    def realign(self, rnd: int, payload: dict[str, torch.Tensor]) -> RealignRecord | None:
        """Re-align every emulator to ``payload`` before round ``rnd`` (0: before its evaluation); None when
        nothing was done."""
        done = self.realigner.before_round(rnd, payload) if self.realigner else None
        return RealignRecord.from_json(done) if done else None

    def realign_factors(self) -> dict[int, dict[str, torch.Tensor]]:
        """Each emulator's re-alignment factors, by k ({} without re-alignment)."""
        return self.realigner.factors() if self.realigner else {}

    def restore_factors(self, factors: dict[int, dict[str, torch.Tensor]]) -> None:
        if self.realigner is not None:
            self.realigner.restore(factors)

    def after_round(self, record: RoundRecord, payload: dict[str, torch.Tensor]) -> None:
        """Once round ``record.round`` is kept: the run's outputs of that round."""
        if self.outputs is not None:
            self.outputs(record, payload)

    def payload_names(self, model: nn.Module, plan: SplitPlan | None = None) -> dict[str, str]:
        """Travelling name -> parameter name in ``model``: the full model, or an emulator of ``plan`` (the
        configured emulator's by default)."""
        return tuned_names(self.tuning, model, plan or self.plan)

    def load_payload(self, model: nn.Module, payload: dict[str, torch.Tensor],
                     plan: SplitPlan | None = None) -> None:
        """Check ``payload`` and copy it into ``model`` (the full model, or an emulator of ``plan``)."""
        set_payload(model, payload, self.payload_names(model, plan), self.tuning.payload_kind(self.plan))

    def carried_weights(self) -> frozenset[str]:
        """Weights of ``base_folder`` that every round's payload carries under the same name (full
        fine-tuning: all of them); the one-time delivery leaves them out."""
        if self.plan is not None:  # the emulator's folder names its blocks by position, the payload by the full model's
            return frozenset()
        return frozenset(name for name, target in self.payload_names(self.model).items() if name == target)

    def initial_payload(self) -> dict[str, torch.Tensor]:
        return get_payload(self.model, self.payload_names(self.model))

    def evaluate(self, rnd: int, payload: dict[str, torch.Tensor]) -> dict[str, dict]:
        """Plug ``payload`` in and score the held-out test split: plug-in (full) and emulator models.

        Only the rounds ``eval.every`` names are scored (``{}`` for the others). Round 0 scores the
        untrained models, which every method run on the same model and task shares: those scores are
        cached by the exact weights, so a comparison scores the full model zero-shot once.
        """
        if not self.settings.eval.due(rnd, self.settings.num_rounds):
            return {}
        models: dict[str, tuple[nn.Module, SplitPlan | None]] = {
            "plugin" if self.emulator is not None else "full": (self.model, None)}
        if self.emulator is not None:
            models["emulator"] = self.emulator, self.plan
            models.update({f"{SMALLER_EVAL}{k}": (e.model, e.plan) for k, e in sorted(self.smaller.items())})
        results = {}
        for name, (model, plan) in models.items():
            self.load_payload(model, payload, plan)
            results[name] = self._score_cached(model, name) if rnd == 0 else self._score(model, name)
        if self.emulator is not None:
            log.info("round %d: plug-in acc %.3f | emulator acc %.3f | gap %+.3f", rnd, results["plugin"]["acc"],
                     results["emulator"]["acc"], results["emulator"]["acc"] - results["plugin"]["acc"])
        return results

    def _score(self, model: nn.Module, name: str) -> dict:
        e = self.settings.eval
        with half_weights(model, e.precision), precision_autocast(next(model.parameters()).device, e.precision):
            return evaluate_task(model, self.tokenizer, self.task, "test", limit=e.limit or None,
                                 batch_size=e.batch_size, desc=f"scoring {name}")

    def _score_cached(self, model: nn.Module, name: str) -> dict:
        e = self.settings.eval
        key = json_digest({"weights": state_digest(model), "task": self.task.name, "seed": self.settings.seed,
                           "limit": e.limit, "batch": e.batch_size, "precision": e.precision})
        path = cache_dir("scores") / f"{key}.json"
        if path.is_file():
            log.info("zero-shot score of these exact weights on %s: cached (%s)", self.task.name, path)
            return json.loads(path.read_text())
        result = self._score(model, name)
        write_json(path, result)
        return result



def final_weights(owner: ModelOwner, payload: dict[str, torch.Tensor]) -> tuple[str, dict[str, torch.Tensor]]:
    """The file name and tensors to keep at the end: the adapter (LoRA merged in) or the payload."""
    if owner.plan is None:
        return (LORA if isinstance(owner.model, PeftModel) else MODEL), payload
    model = owner.model
    owner.load_payload(model, payload)
    if isinstance(model, PeftModel):
        model = model.merge_and_unload()
    return ADAPTER, extract_adapter(model, owner.plan)


def _emulator_split(settings: Settings, recipe: EmulatorRecipe, model: PreTrainedModel,
                    tokenizer: PreTrainedTokenizerBase, out: Path) -> tuple[SplitPlan, PreTrainedModel, Path]:
    """Build (or distil, or fetch cached) the emulator of ``recipe`` from the untuned full ``model`` and write the
    split to ``out``; return the plan, the emulator and the emulator's folder (what nodes are delivered)."""
    plan, emulator, record = prepare_emulator(settings.model, model, tokenizer, recipe, settings.task,
                                              seed=settings.seed)
    split_dir = write_split(out, emulator, extract_adapter(model, plan), plan, tokenizer, record=record)
    return plan, emulator, split_dir / EMULATOR_DIR


def _model_folder(name: str, model: PreTrainedModel, tokenizer, folder: Path) -> Path:
    """A local folder holding the full model (saved into ``folder`` when it came from the hub)."""
    path = Path(resolve_model_path(name))
    if path.is_dir():
        return path
    if not folder.is_dir():
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return folder


def lr_schedule(base_lr: float, kind: str, num_rounds: int):
    """Learning rate of round ``r`` (1-based) across the run."""
    def lr_at(r: int) -> float:
        progress = (r - 1) / num_rounds
        if kind == "cosine":
            return base_lr * 0.5 * (1 + math.cos(math.pi * progress))
        if kind == "linear":
            return base_lr * (1 - progress)
        return base_lr
    return lr_at
