"""A data owner's own JSONL data (node config ``data-path``) instead of a partition of the public task."""
from __future__ import annotations

import pytest
from flwr.app import Context, RecordDict

from fl_offsite import client_app
from fl_offsite.errors import UserError
from fl_offsite.local_data import data_path, load_examples, write_examples
from fl_offsite.tasks import ChoiceExample

EXAMPLES = [ChoiceExample("Article: The striker scored twice.\nTopic:", [" business", " sport"], 1),
            ChoiceExample('Article: Shares "rose" 5%.\nTopic:', [" business", " sport"], 0)]


def test_round_trip(tmp_path):
    path = write_examples(tmp_path / "mine.jsonl", EXAMPLES)
    assert load_examples(path) == EXAMPLES


@pytest.mark.parametrize("line, message", [
    ("{not json", "mine.jsonl:2: not valid JSON"),
    ('{"context": "x", "choices": [" a"]}', "mine.jsonl:2: missing keys"),
    ('{"context": "x", "choices": [" a", " b"], "label": 2}', r"label must be an index into choices \(0..1\)"),
    ('{"context": "x", "choices": [], "label": 0}', "choices must be a list of non-empty strings"),
])
def test_bad_lines_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "mine.jsonl"
    path.write_text('{"context": "x", "choices": [" a"], "label": 0}\n' + line + "\n")
    with pytest.raises(UserError, match=message):
        load_examples(path)


def test_data_path_must_be_an_absolute_existing_file(tmp_path):
    assert data_path({"partition-id": 0}) is None
    with pytest.raises(UserError, match="relative"):
        data_path({"data-path": "mine.jsonl"})
    with pytest.raises(UserError, match="no such file"):
        data_path({"data-path": str(tmp_path / "missing.jsonl")})


def test_client_trains_on_the_nodes_own_file(tmp_path, tiny_lm_dir):
    path = write_examples(tmp_path / "mine.jsonl", EXAMPLES)
    context = Context(run_id=1, node_id=7, node_config={"data-path": str(path), "partition-id": 3},
                      state=RecordDict(), run_config={})
    assert client_app._partition(context, {"data.num-partitions": 4}) == (3, 1)
    local = client_app._local_data(context)
    features = client_app._features(local, "bbc-news", 1, "iid", 1.0, 1, 3, 64, str(tiny_lm_dir))
    assert len(features) == 2
    assert all(len(f["input_ids"]) == len(f["labels"]) for f in features)

    plain = Context(run_id=1, node_id=7, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    assert client_app._partition(plain, {"data.num-partitions": 4}) == (0, 4)
    assert client_app._local_data(plain) is None  # another node in the same process uses the task
