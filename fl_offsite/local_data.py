"""A data owner's own training data: a local JSONL file named by the node config key ``data-path``.

One example per line, in the format of the run's task (see :class:`fl_offsite.tasks.ChoiceExample`)::

    {"context": "Article: Shares rose ...\\nTopic:", "choices": [" business", " sport"], "label": 0}

``choices`` are the candidate answers with their leading space, ``label`` the index of the
correct one; training puts the loss on the correct answer's tokens. The model owner
evaluates on the task's own held-out split, so the choices should match the task's.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from fl_offsite.errors import UserError
from fl_offsite.tasks import ChoiceExample

NODE_KEY = "data-path"
FORMAT_HINT = 'one JSON object per line: {"context": "...", "choices": [" a", " b"], "label": 0}'


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


def load_examples(path: str | Path) -> list[ChoiceExample]:
    """Read and check a JSONL file of examples; errors name the file and line."""
    path = Path(path)
    examples = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                examples.append(_example(line, f"{path}:{number}"))
    if not examples:
        raise UserError(f"{path} holds no examples; expected {FORMAT_HINT}")
    return examples


def write_examples(path: str | Path, examples: Iterable[ChoiceExample]) -> Path:
    """Write examples as JSONL (e.g. to hand a data owner its share of a public task)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"context": ex.context, "choices": list(ex.choices), "label": ex.label}) for ex in examples]
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def _example(line: str, where: str) -> ChoiceExample:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise UserError(f"{where}: not valid JSON ({err.msg}); expected {FORMAT_HINT}") from None
    if not isinstance(row, dict) or not {"context", "choices", "label"} <= row.keys():
        raise UserError(f"{where}: missing keys; expected {FORMAT_HINT}")
    context, choices, label = row["context"], row["choices"], row["label"]
    if not isinstance(context, str):
        raise UserError(f"{where}: context must be a string")
    if not isinstance(choices, list) or len(choices) < 1 or not all(isinstance(c, str) and c for c in choices):
        raise UserError(f"{where}: choices must be a list of non-empty strings")
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(choices):
        raise UserError(f"{where}: label must be an index into choices (0..{len(choices) - 1}), got {label!r}")
    return ChoiceExample(context, choices, label)
