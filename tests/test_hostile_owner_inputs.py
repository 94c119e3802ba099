"""A data owner's node gives a hostile model owner no oracle on its rows, no path to read and no plan to blow up.

Fast: no model is loaded; each test drives the node's function that handles one of the owner's inputs.
"""
from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from fl_offsite.app import client_app, client_training, wire
from fl_offsite.app.node_cache import ExampleSource, NodeCache
from fl_offsite.app.node_policy import node_task
from fl_offsite.config.settings import Settings
from fl_offsite.data.examples import ChoiceExample
from fl_offsite.data.local_file import write_examples

DIGEST = "0123456789abcdef"
PLAN = {"num_layers": 6, "adapter_bottom": 1, "adapter_top": 1, "kept_layers": [0, 2, 4, 5],
        "block_prefix": "model.layers"}


@pytest.fixture(autouse=True)
def _task_identity():
    """What Flower's runtime sets before a message is built (InProcessGrid does the same)."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 7


def _context(node_config: dict) -> Context:
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config={})


def _source(local: tuple[str, int] | None, task: str = "bbc-news",
            answers: tuple[str, ...] | None = None) -> ExampleSource:
    return ExampleSource(local, task, 1, Settings.from_config({}).data, 2, 0, DIGEST, answers)


# --- 1. a refused data file: one fixed text, whatever the owner's answers and the node's rows -------------------

def test_the_refusal_of_a_data_file_says_nothing_about_its_rows(tmp_path, caplog):
    """An owner who tries answer sets learns no count: the text it gets is the same for every set."""
    rows = [ChoiceExample("match report", [" sport", " tech"], 0), ChoiceExample("new phone", [" sport", " tech"], 1),
            ChoiceExample("patient notes", [" flu", " HIV positive"], 1)]
    path = write_examples(tmp_path / "private.jsonl", rows)
    local = (str(path), os.stat(path).st_mtime_ns)
    texts = set()
    for guess in [(), (" sport", " tech", " flu"), (" sport",), (" tech",)]:
        with pytest.raises(wire.SharedError) as refused:
            client_training.training_features(NodeCache(), _source(local, answers=guess), tokenizer=None)
        texts.add(str(refused.value))
    (text,) = texts
    assert not re.search(r"\d", text) and "private.jsonl" not in text and "does not fit" in text
    assert "2 of 3 rows are bad" in caplog.text  # the data owner's detail stays in its own log


def test_a_run_cannot_change_the_task_answers_between_rounds():
    context = _context({})
    assert client_training.pinned_answers(context, (" sport", " tech")) == (" sport", " tech")
    assert client_training.pinned_answers(context, (" sport", " tech")) == (" sport", " tech")
    with pytest.raises(wire.SharedError, match="task-answers changed"):
        client_training.pinned_answers(context, (" sport", " tech", " flu"))
    with pytest.raises(wire.SharedError, match="task-answers changed"):
        client_training.pinned_answers(context, None)
    assert client_training.pinned_answers(_context({}), None) is None  # another run (context) pins its own


# --- 2. the owner's task name never makes the node read a folder -------------------------------------------------

@pytest.fixture
def victim(tmp_path):
    """A folder of the node's own that a ``jsonl:`` task name could point at."""
    folder = tmp_path / "victim"
    for split in ("train", "validation", "test"):
        write_examples(folder / f"{split}.jsonl", [ChoiceExample(f"SECRET {i}", [" a", " b"], i % 2) for i in range(8)])
    return folder


def test_a_jsonl_task_from_the_owner_is_refused_on_a_node(victim, monkeypatch):
    monkeypatch.delenv("FL_OFFSITE_TASK_FOLDERS", raising=False)
    with pytest.raises(wire.SharedError, match="public tasks by name") as refused:
        NodeCache()._partition(_source(None, task=f"jsonl:{victim}"))
    assert str(victim) not in str(refused.value)


def test_a_node_may_allow_its_own_task_folders(victim, monkeypatch, tmp_path):
    monkeypatch.setenv("FL_OFFSITE_TASK_FOLDERS", os.pathsep.join([str(tmp_path / "other"), str(victim)]))
    share = NodeCache()._partition(_source(None, task=f"jsonl:{victim}/../victim"))
    assert share and all(ex.context.startswith("SECRET") for ex in share)
    with pytest.raises(wire.SharedError, match="FL_OFFSITE_TASK_FOLDERS"):
        NodeCache()._partition(_source(None, task=f"jsonl:{tmp_path}"))


def test_a_simulation_allows_its_own_task_folder_to_its_nodes_and_no_other(victim, monkeypatch, tmp_path):
    """The user of ``fl-offsite simulate`` runs every node: the launcher lists the run's own folder for them."""
    from fl_offsite.ops.simulation import _simulation_env

    monkeypatch.setenv("FL_OFFSITE_TASK_FOLDERS", str(tmp_path / "listed"))
    assert _simulation_env(tmp_path, "tag", "local", "bbc-news")["FL_OFFSITE_TASK_FOLDERS"] == str(tmp_path / "listed")
    env = _simulation_env(tmp_path, "tag", "local", f"jsonl:{victim}")
    monkeypatch.setenv("FL_OFFSITE_TASK_FOLDERS", env["FL_OFFSITE_TASK_FOLDERS"])
    assert node_task(f"jsonl:{victim}") == f"jsonl:{victim}" and node_task(f"jsonl:{tmp_path}/listed")
    with pytest.raises(wire.SharedError):
        node_task(f"jsonl:{tmp_path}")


# --- 3. a split plan is bounded before anything is built from it -------------------------------------------------

@pytest.mark.parametrize("change", [
    {"adapter_bottom": 10**9}, {"adapter_top": 10**9}, {"num_layers": 10**9, "adapter_bottom": 10**9 - 1},
    {"adapter_bottom": -1}, {"adapter_bottom": True}, {"adapter_bottom": 1.0}, {"num_layers": "6"},
    {"adapter_bottom": 4, "adapter_top": 3}, {"kept_layers": [0, 4, 2, 5]}, {"kept_layers": [0, 2, 2, 5]},
    {"kept_layers": [0, 2, 4, 6]}, {"kept_layers": [-1, 0, 2, 5]}, {"kept_layers": [0, 2, 4]},
    {"kept_layers": [0, True, 5]}, {"kept_layers": "0245"}, {"kept_layers": list(range(10**5))},
    {"block_prefix": "../model"}, {"block_prefix": "model layers"}, {"block_prefix": ""}, {"block_prefix": 5},
    {"shared": "yes"}])
def test_a_split_plan_out_of_range_is_refused(change):
    with pytest.raises(wire.BadMessage, match="split-plan") as refused:
        client_training._plan(json.dumps({**PLAN, **change}))
    assert str(10**9) not in str(refused.value)


def test_a_split_plan_in_range_is_accepted():
    plan = client_training._plan(json.dumps(PLAN))
    assert plan is not None and plan.adapter_layers == (0, 5) and plan.kept_middle == [2, 4]
    with pytest.raises(wire.BadMessage, match="split-plan"):
        client_training._plan(json.dumps([PLAN]))


# --- 4. every handler's failure reaches the owner as its type only -----------------------------------------------

def test_a_failed_model_delivery_or_status_reaches_the_owner_without_a_local_path(tmp_path):
    (tmp_path / "alice-private").write_text("")  # a file where the store's folder should be: NotADirectoryError
    context = _context({"cache-dir": str(tmp_path / "alice-private" / "store")})
    package = Message(RecordDict({"model": ConfigRecord({"digest": DIGEST}),
                                  "files": ConfigRecord({"config.json": b"{}"}),
                                  "weights": ArrayRecord({"w": Array(np.zeros(2, dtype=np.float32))})}),
                      dst_node_id=7, message_type="query.model")
    with pytest.raises(RuntimeError, match=r"model delivery failed on node 7 \(NotADirectoryError\)") as failed:
        client_app.receive_model(package, context)
    assert "alice-private" not in str(failed.value)
    status = Message(RecordDict({"model": ConfigRecord({"digest": DIGEST})}), dst_node_id=7,
                     message_type="query.model_status")
    with pytest.raises(RuntimeError, match=r"model status failed on node 7 \(ValueError\)") as failed:
        client_app.model_status(status, _context({"max-models": "four", "cache-dir": str(tmp_path / "alice-x")}))
    assert "four" not in str(failed.value) and "alice" not in str(failed.value)
