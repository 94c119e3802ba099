"""The model owner's emulator recipe: split, layer choice, distillation, all on its own public text.

One entry, :func:`prepare_emulator`, used by the ServerApp, the CLI and the benchmarks: it
refuses a corpus drawn from the task being tuned (:func:`fl_offsite.data.corpora.check_public`),
picks the kept middle blocks by the recipe's rule, and distils when asked. Layer choices and
distilled emulators are cached by everything that determines them, the text included.
"""
from __future__ import annotations

import json
import logging
from typing import Any, cast

from torch import nn
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from fl_offsite.config.sections import EmulatorRecipe
from fl_offsite.data.corpora import MODEL_SAMPLES, check_public, corpus_composition, load_text_corpus, sample_texts
from fl_offsite.data.downloads import cache_dir
from fl_offsite.data.encode import collate, lm_blocks, pad_id
from fl_offsite.data.models import load_model, placed
from fl_offsite.emulator.distill import distilled_split, ppl_summary
from fl_offsite.emulator.layer_choice import middle_chooser, uniform_drop
from fl_offsite.errors import UserError
from fl_offsite.files import json_digest, write_atomic
from fl_offsite.surgery.split import EMULATOR_DIR, SPLIT_FILE, SplitPlan, build_emulator, plan_split
from fl_offsite.weights import weights_fingerprint

log = logging.getLogger(__name__)

CALIBRATION_SEQUENCES, CALIBRATION_TOKENS = 8, 128  # public text the layer rules look at



def prepare_emulator(model_name: str, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                     recipe: EmulatorRecipe, task: str, seed: int = 1234,
                     progress: bool = True) -> tuple[SplitPlan, PreTrainedModel, dict]:
    """Plan the split of ``model`` by ``recipe`` and build (or distil, or fetch cached) its emulator.

    Returns the plan, the emulator (on the model's device) and the record for split.json.
    """
    if recipe.uses_corpus:
        check_public(recipe.corpus, task, recipe.public_in_domain)
    choose = uniform_drop
    if recipe.layers != "uniform":
        choose = _cached_choice(model_name, model, tokenizer, recipe, task, seed, progress)
    plan = plan_split(model, recipe.adapter_bottom, recipe.adapter_top, emulator_layers=recipe.emulator_layers,
                      drop_ratio=recipe.drop_ratio, choose_middle=choose, shared=recipe.sharing)
    log.info("Split %s of %s (%s): adapter blocks %s, emulator keeps %s", plan.name, model_name, recipe.describe(),
             list(plan.adapter_layers), list(plan.kept_layers))
    if recipe.distill is not None and plan.emulator_layers == 0:  # before the corpus, which may take a minute
        raise UserError(f"split {plan.name} keeps no middle block: there is nothing to distill")
    composition = corpus_composition(recipe.corpus, task) if recipe.uses_corpus else None
    record: dict[str, Any] = {"source_model": model_name, "layer_rule": recipe.layers,
              "corpus": recipe.corpus if recipe.uses_corpus else None}
    if recipe.distill is None:
        record |= {"corpus_composition": composition} if composition else {}
        return plan, placed(build_emulator(model, plan), model.device), record
    settings = recipe.distill
    train = public_texts(recipe.corpus, "train", model, tokenizer, task, settings.seed,
                         count=settings.steps * settings.batch_size, length=settings.block_size)
    held_out = public_texts(recipe.corpus, "validation", model, tokenizer, task, settings.seed,
                            count=settings.eval_texts, length=256)
    folder = distilled_split(model_name, model, tokenizer, plan, settings, train, held_out, progress=progress)
    emulator, _ = load_model(str(folder / EMULATOR_DIR), with_tokenizer=False)
    distillation = {**json.loads((folder / SPLIT_FILE).read_text())["distillation"], "corpus_composition": composition}
    log.info("Distilled emulator: %s", ppl_summary(distillation))
    record |= {"distillation": distillation, "distilled_cache": str(folder)}
    return plan, placed(emulator, model.device), record


def public_texts(corpus: str, split: str, model: nn.Module, tokenizer: PreTrainedTokenizerBase, task: str,
                 seed: int, count: int, length: int) -> list[str]:
    """The owner's public text of ``split``: a named corpus (minus the task's own text), or model samples.

    ``count`` and ``length`` (tokens) size the ``model-samples`` corpus (sampled once, cached);
    named corpora are returned whole.
    """
    if corpus != MODEL_SAMPLES:
        return load_text_corpus(corpus, split, seed, exclude_task=task)
    sample_seed = seed if split == "train" else seed + 1_000_003
    config = cast(PretrainedConfig, model.config)
    identity = {"model": config.to_json_string(use_diff=False), "weights": weights_fingerprint(model),
                "count": count, "length": length, "seed": sample_seed, "precision": "bf16"}
    path = cache_dir("corpora") / f"model-samples-{json_digest(identity)}.json"
    if path.exists():
        return json.loads(path.read_text())
    log.info("Sampling %d texts of %d tokens from the full model (data-free distillation text)", count, length)
    texts = sample_texts(model, tokenizer, count, length, sample_seed)
    write_atomic(path, json.dumps(texts).encode())
    return texts


def _cached_choice(model_name: str, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                   recipe: EmulatorRecipe, task: str, seed: int, progress: bool):
    """``recipe.layers``' chooser, its answers cached by model, split sizes, rule and calibration text."""
    texts = public_texts(recipe.corpus, "train", model, tokenizer, task, seed, count=CALIBRATION_SEQUENCES,
                         length=CALIBRATION_TOKENS)
    blocks = [b for b in lm_blocks(tokenizer, texts, CALIBRATION_TOKENS, max_blocks=CALIBRATION_SEQUENCES)
              if len(b["input_ids"]) == CALIBRATION_TOKENS]
    device = model.device
    batches = [{k: v.to(device) for k, v in collate(blocks[i:i + 4], pad_id(tokenizer)).items()}
               for i in range(0, len(blocks), 4)]
    chooser = middle_chooser(recipe.layers, model, recipe.adapter_bottom, recipe.adapter_top, batches, progress)

    def choose(n: int, k: int) -> list[int]:
        identity = {"model": model_name, "config": model.config.to_json_string(use_diff=False),
                    "weights": weights_fingerprint(model), "rule": recipe.layers, "bottom": recipe.adapter_bottom,
                    "top": recipe.adapter_top, "n": n, "k": k, "text": [b["input_ids"] for b in blocks]}
        path = cache_dir("layer-choice") / f"{recipe.layers}-{json_digest(identity)}.json"
        if path.exists():
            return json.loads(path.read_text())
        kept = chooser(n, k)
        write_atomic(path, json.dumps(kept).encode())
        return kept
    return choose


