"""Plain-text corpora: the model owner's public text (distillation, layer choice) and held-out text.

Names:

- ``bigbench``: the text of BIG-bench's JSON tasks (inputs and gold answers of the mostly-ASCII
  examples, grouped per task into documents), from the same cached PyPI sdist as the ``bigbench:`` tasks. Public text of
  general kind; the task being tuned, and its sibling subtasks, are left out.
- ``model-samples``: text sampled from the full model itself (data-free distillation); built by
  :func:`sample_texts`, which needs the model, so ``fl_offsite.distill`` resolves it.
- ``bbc-news``: BBC News articles, split exactly like the ``bbc-news`` task (same seed).
- ``hf:PATH`` or ``hf:PATH:CONFIG``: the ``text`` column of any ``datasets`` corpus (needs the hub).

A corpus drawn from the task the data owners train on is their data, not the model owner's:
:func:`check_public` refuses it unless the owner declares it holds public in-domain text.
"""
from __future__ import annotations

import json
import logging

import torch
from tqdm.auto import tqdm

from fl_offsite.assets import cache_dir, hub_dataset
from fl_offsite.errors import UserError
from fl_offsite.io import write_atomic
from fl_offsite.sources import bbc_articles, bigbench_task_files
from fl_offsite.tasks import BBC_TRAIN, BBC_VALIDATION, SPLITS, check_split, seeded_split

log = logging.getLogger(__name__)

PUBLIC_DEFAULT = "bigbench"
MODEL_SAMPLES = "model-samples"
CORPUS_FORMATS = "'bigbench', 'model-samples', 'bbc-news' or 'hf:<datasets path>[:<config>]'"
_DOC_CHARS = 4000  # a BIG-bench document: consecutive examples of one task, about this long
_TASK_CHARS = 40_000  # at most this much text per BIG-bench task, so that no task dominates


def load_text_corpus(name: str, split: str = "train", seed: int = 1234, exclude_task: str | None = None) -> list[str]:
    """Plain texts of corpus ``name`` (see the module docstring) for ``split``.

    ``exclude_task`` (a task name such as ``bigbench:social_iqa``) leaves that task's text out of
    the ``bigbench`` corpus. ``bbc-news`` held-out splits never overlap its training articles; a
    corpus without a validation or test split gets 1% of train held out for each.
    """
    check_split(split)
    if name == "bigbench":
        return _held_out_split(_bigbench_documents(exclude_task), split, seed)
    if name == "bbc-news":
        parts = dict(zip(SPLITS, seeded_split(bbc_articles(), seed, BBC_TRAIN, BBC_VALIDATION)))
        return [text for text, _ in parts[split]]
    if name == MODEL_SAMPLES:
        raise UserError("the 'model-samples' corpus is sampled from the model: use fl_offsite.corpora.sample_texts")
    if name.startswith("hf:"):
        path, _, config = name.removeprefix("hf:").partition(":")
        if path == "wikitext":  # lines of articles: one text per split, as perplexity is usually measured
            rows = hub_dataset("Salesforce/wikitext", config or "wikitext-2-raw-v1")[split]
            return ["".join(rows["text"])]
        corpus = hub_dataset(path, config or None)
        if "text" not in (getattr(corpus["train"], "column_names", None) or list(corpus["train"])):
            raise UserError(f"{name} has no 'text' column; give a corpus of plain texts")
        texts = lambda part: [t for t in corpus[part]["text"] if t.strip()]
        if split in corpus and ("validation" in corpus or split == "test"):
            return texts(split)
        return _held_out_split(texts("train"), split, seed)
    raise UserError(f"unknown text corpus {name!r}; use {CORPUS_FORMATS}")


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


def _held_out_split(texts: list[str], split: str, seed: int) -> list[str]:
    held_out = max(1, len(texts) // 100)
    return dict(zip(SPLITS, seeded_split(texts, seed, len(texts) - 2 * held_out, held_out)))[split]


def _bigbench_documents(exclude_task: str | None) -> list[str]:
    """Documents of BIG-bench text, minus the task group of ``exclude_task`` (``bigbench:<group>[/<sub>]``)."""
    per_task = _bigbench_texts()
    group = exclude_task.removeprefix("bigbench:").split("/")[0] if exclude_task and \
        exclude_task.startswith("bigbench:") else None
    documents = []
    for task, texts in per_task.items():
        if task.split("/")[0] == group:
            continue
        document = ""
        for text in texts:
            document += text + "\n\n"
            if len(document) >= _DOC_CHARS:
                documents.append(document.strip())
                document = ""
        if document.strip():
            documents.append(document.strip())
    return documents


def _bigbench_texts() -> dict[str, list[str]]:
    """Per BIG-bench JSON task: its examples as "input answer" texts (capped), read once from the sdist."""
    cached = cache_dir("corpora") / "bigbench-text.json"
    if not cached.exists():
        per_task: dict[str, list[str]] = {}
        log.info("Reading the text of every BIG-bench JSON task from the sdist (once; about a minute)")
        for task, raw in tqdm(bigbench_task_files(), desc="bigbench text", unit=" tasks", mininterval=2.0):
            try:
                data = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            texts = _example_texts(data.get("examples", []))
            if texts:
                per_task[task] = texts
        write_atomic(cached, json.dumps(per_task).encode())
    return json.loads(cached.read_text(encoding="utf-8"))


def _example_texts(examples: list) -> list[str]:
    texts, total = [], 0
    for example in examples:
        if not isinstance(example, dict) or not isinstance(example.get("input"), str):
            continue
        answer = example.get("target")
        if isinstance(answer, list):
            answer = answer[0] if answer and isinstance(answer[0], str) else None
        scores = example.get("target_scores")
        if answer is None and isinstance(scores, dict) and scores:
            answer = max(scores, key=lambda c: scores[c] if isinstance(scores[c], (int, float)) else 0)
        text = " ".join(f"{example['input']} {answer if isinstance(answer, str) else ''}".split())
        if len(text) < 20 or sum(c.isascii() for c in text) < 0.95 * len(text):
            continue  # too short, or not English (the offline model's language)
        texts.append(text)
        total += len(text)
        if total >= _TASK_CHARS:
            break
    return texts


@torch.no_grad()
def sample_texts(model: torch.nn.Module, tokenizer, num_texts: int, length: int, seed: int,
                 batch_size: int = 32, progress: bool = True) -> list[str]:
    """``num_texts`` texts of ``length`` tokens sampled from ``model`` (temperature 1, top-k 50) from BOS.

    Data-free distillation text: what the full model itself writes, with no data of anyone.
    Seeded, so the same model and settings give the same texts.
    """
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise UserError("sampling text needs a tokenizer with a BOS or EOS token")
    device = next(model.parameters()).device
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    texts: list[str] = []
    try:
        for first in tqdm(range(0, num_texts, batch_size), desc="sample text", unit="batch", disable=not progress):
            n = min(batch_size, num_texts - first)
            prompt = torch.full((n, 1), start, dtype=torch.long, device=device)
            out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True, temperature=1.0,
                                 top_k=50, top_p=1.0, max_new_tokens=length, min_new_tokens=length,
                                 pad_token_id=tokenizer.eos_token_id)
            texts += tokenizer.batch_decode(out[:, 1:], skip_special_tokens=True)
    finally:
        torch.random.set_rng_state(generator_state)
    return [t for t in texts if t.strip()]

