"""A data owner's own training data: a local JSONL file named by the node config key ``data-path``.

One example per line, in the format of the run's task (see :class:`fl_offsite.data.examples.ChoiceExample`)::

    {"context": "Article: Shares rose ...\\nTopic:", "choices": [" business", " sport"], "label": 0}

``choices`` are the candidate answers with their leading space, ``label`` the index of the
correct one; training puts the loss on the correct answer's tokens. The model owner
evaluates on the task's own held-out split: for a task with fixed answers (bbc-news's
topics) a row whose labelled answer is not one of them is refused. Every bad row is
reported, by line number, before any training, in the node's log; the model owner learns only
that the file was refused (a count would let it tell, answer set by answer set, how the rows are labelled).
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from fl_offsite.data.examples import ChoiceExample
from fl_offsite.errors import UserError

NODE_KEY = "data-path"
FORMAT_HINT = 'one JSON object per line: {"context": "...", "choices": [" a", " b"], "label": 0}'
MAX_LISTED = 20  # bad rows named in the error; the rest are counted


def data_path(node_config: Mapping[str, object]) -> str | None:
    """The node's local data file (absolute, existing), or None when the node config names none."""
    if NODE_KEY not in node_config:
        return None
    path = Path(os.path.expanduser(str(node_config[NODE_KEY])))
    if not path.is_absolute():
        raise UserError(f"node config {NODE_KEY}={str(path)!r} is relative: give the SuperNode an absolute path "
                        "(the ClientApp runs in another working directory)")
    if not path.is_file():
        raise UserError(f"node config {NODE_KEY}={str(path)!r}: no such file on this node")
    return str(path)


class BadDataFile(UserError):
    """A data file failed its checks. The message lists every bad row: it is for the data owner only."""


def load_examples(path: str | Path, answers: Sequence[str] | None = None) -> list[ChoiceExample]:
    """Read and check a JSONL file of examples; every bad row is reported by its line number in one error.

    ``answers`` are the task's fixed answers (``TaskData.answers``): a row whose labelled answer is not one
    of them is refused. Messages say what is wrong, never what a row holds (it is private).
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except OSError as err:
        raise BadDataFile(f"{path} cannot be read ({err.strerror or err})") from None
    except UnicodeDecodeError as err:
        raise BadDataFile(f"{path} is not UTF-8 text (byte {err.start}): save it as UTF-8 JSON Lines") from None
    examples, problems = [], []
    for number, line in enumerate(lines, 1):
        if line.strip():
            parsed = _example(line, answers)
            if isinstance(parsed, str):
                problems.append(f"line {number}: {parsed}")
            else:
                examples.append(parsed)
    if problems:
        listed = "; ".join(problems[:MAX_LISTED]) + (f"; and {len(problems) - MAX_LISTED} more"
                                                     if len(problems) > MAX_LISTED else "")
        raise BadDataFile(f"{path}: {len(problems)} of {len(problems) + len(examples)} rows are bad ({listed}); "
                          f"fix or remove them: {FORMAT_HINT}")
    if not examples:
        raise BadDataFile(f"{path} holds no examples; expected {FORMAT_HINT}")
    return examples


def write_examples(path: str | Path, examples: Iterable[ChoiceExample]) -> Path:
    """Write examples as JSONL (e.g. to hand a data owner its share of a public task)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"context": ex.context, "choices": list(ex.choices), "label": ex.label}) for ex in examples]
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def _example(line: str, answers: Sequence[str] | None) -> ChoiceExample | str:
    """The row as an example, or what is wrong with it."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        return f"not valid JSON ({err.msg}, column {err.colno})"
    if not isinstance(row, dict):
        return "not a JSON object"
    if missing := [key for key in ("context", "choices", "label") if key not in row]:
        return f"missing {', '.join(missing)}"
    context, choices, label = row["context"], row["choices"], row["label"]
    if not isinstance(context, str) or not context.strip():
        return "context must be a non-empty string"
    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) and c for c in choices):
        return "choices must be a list of non-empty strings"
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(choices):
        return f"label must be an index into choices (0..{len(choices) - 1})"
    if answers is not None and choices[label] not in answers:
        return f"the labelled answer is not one of the task's answers {list(answers)}"
    return ChoiceExample(context, choices, label)
