"""Any of our tasks as an lm-evaluation-harness task folder, to score models with lm-eval offline.

The folder holds ``<name>.jsonl`` (the examples of one split) and ``<name>.yaml`` (a
``multiple_choice`` task on ``dataset_path: json``); ``lm_eval --include_path FOLDER
--tasks <name>`` scores it with the same prompts, choices and metrics as ``fl-offsite eval``
(tests/test_lm_eval.py checks that the numbers agree).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from fl_offsite.data.tasks import TaskData
from fl_offsite.files import write_atomic


def lm_eval_task_name(task: str, split: str) -> str:
    """``bigbench:social_iqa``, ``test`` -> ``fl_offsite_bigbench_social_iqa_test``."""
    return "fl_offsite_" + re.sub(r"[^a-z0-9]+", "_", f"{task}_{split}".lower()).strip("_")


def export_lm_eval_task(task: TaskData, split: str, out: str | Path, limit: int | None = None) -> str:
    """Write the lm-eval task folder of ``split`` of ``task`` (its first ``limit`` examples); return its name.

    Our choices carry their own leading space; lm-eval joins context and choice with
    ``target_delimiter`` and measures ``acc_norm`` lengths without it, so the space moves there.
    """
    examples = task.split(split)[:limit]
    name = lm_eval_task_name(task.name, split)
    delimiter = " " if all(c.startswith(" ") for ex in examples for c in ex.choices) else ""
    rows = [{"context": ex.context, "choices": [c[len(delimiter):] for c in ex.choices], "label": ex.label}
            for ex in examples]
    out = Path(out).resolve()
    # YAML is a superset of JSON: every value below is written as a JSON string or number.
    config = "\n".join([
        f"task: {name}",
        "dataset_path: json",
        "dataset_kwargs:",
        "  data_files:",
        f"    {split}: {json.dumps(str(out / f'{name}.jsonl'))}",
        f"test_split: {split}",
        "output_type: multiple_choice",
        "doc_to_text: context",
        "doc_to_choice: choices",
        "doc_to_target: label",
        f"target_delimiter: {json.dumps(delimiter)}",
        "metric_list:",
        "  - metric: acc",
        "    aggregation: mean",
        "    higher_is_better: true",
        "  - metric: acc_norm",
        "    aggregation: mean",
        "    higher_is_better: true",
        "metadata:",
        "  version: 1.0",
        f"  source: {json.dumps(f'fl-offsite task {task.name}, split {split}, {len(rows)} examples')}",
        ""])
    write_atomic(out / f"{name}.jsonl", "".join(json.dumps(row) + "\n" for row in rows))
    write_atomic(out / f"{name}.yaml", config)  # last: a task file is there only with its data
    return name
