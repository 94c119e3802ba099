"""A data owner's own JSONL data (node config ``data-path``) instead of a partition of the public task."""
from __future__ import annotations

import logging

import pytest
from flwr.app import Context, RecordDict

from fl_offsite.app import client_app, client_training
from fl_offsite.app.node_cache import ExampleSource, NodeCache
from fl_offsite.app.server_app import run_federated
from fl_offsite.config.settings import Settings
from fl_offsite.data.local_file import BadDataFile, data_path, load_examples, write_examples
from fl_offsite.data.models import load_tokenizer
from fl_offsite.data.tasks import BBC_TOPICS, ChoiceExample, TaskData, load_task
from fl_offsite.errors import UserError
from fl_offsite.testing.flower import InProcessGrid, rounds_of, tiny_config

EXAMPLES = [ChoiceExample("Article: The striker scored twice.\nTopic:", [" business", " sport"], 1),
            ChoiceExample('Article: Shares "rose" 5%.\nTopic:', [" business", " sport"], 0)]


def test_round_trip(tmp_path):
    path = write_examples(tmp_path / "mine.jsonl", EXAMPLES)
    assert load_examples(path) == EXAMPLES


def test_every_bad_row_is_reported_by_line_in_one_error(tmp_path):
    good = '{"context": "Article: SECRET-A\\nTopic:", "choices": [" business", " sport"], "label": 0}'
    rows = [good, "{not json", '{"context": "SECRET-B", "choices": [" a"]}', "", '["a list"]', good,
            '{"context": "SECRET-C", "choices": [" a", " b"], "label": 2}',
            '{"context": "", "choices": [" a"], "label": 0}', '{"context": "SECRET-D", "choices": [], "label": 0}',
            '{"context": "SECRET-E", "choices": [" a"], "label": true}']
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(rows) + "\n")
    with pytest.raises(BadDataFile) as caught:
        load_examples(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: 7 of 9 rows are bad (line 2: not valid JSON")
    for expected in ["line 3: missing label", "line 5: not a JSON object", "line 7: label must be an index into "
                     "choices (0..1)", "line 8: context must be a non-empty string",
                     "line 9: choices must be a list of non-empty strings", "line 10: label must be an index"]:
        assert expected in message
    assert "line 1:" not in message and "line 6:" not in message and "SECRET" not in message
    assert "fix or remove them" in message and "\n" not in message


def test_many_bad_rows_are_counted_after_the_first_twenty(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text("x\n" * 25)
    with pytest.raises(BadDataFile, match=r"25 of 25 rows are bad \(line 1: .*line 20: [^;]*; and 5 more\)"):
        load_examples(path)


@pytest.mark.parametrize("content, message", [
    (b"", "holds no examples"), (b"\n  \n", "holds no examples"),
    (b'{"context": "caf\xe9"}', r"is not UTF-8 text \(byte 16\): save it as UTF-8"),
])
def test_an_empty_or_undecodable_file_is_refused(tmp_path, content, message):
    path = tmp_path / "mine.jsonl"
    path.write_bytes(content)
    with pytest.raises(BadDataFile, match=message):
        load_examples(path)


def test_an_unreadable_file_is_refused(tmp_path):
    with pytest.raises(BadDataFile, match=r"missing.jsonl cannot be read \(No such file or directory\)"):
        load_examples(tmp_path / "missing.jsonl")
    with pytest.raises(BadDataFile, match=r"cannot be read \(Is a directory\)"):
        load_examples(tmp_path)


def test_labels_outside_the_tasks_answers_are_refused(tmp_path):
    answers = load_task("bbc-news").answers()
    assert answers == [f" {t}" for t in BBC_TOPICS]
    path = write_examples(tmp_path / "mine.jsonl", [
        ChoiceExample("Article: a\nTopic:", [" business", " weather"], 0),
        ChoiceExample("Article: b\nTopic:", [" business", " weather"], 1)])
    assert len(load_examples(path)) == 2  # any labels when the task has no fixed answers
    with pytest.raises(BadDataFile, match=r"1 of 2 rows are bad \(line 2: the labelled answer is not one of the "
                                          r"task's answers \[' business'"):
        load_examples(path, answers)
    varied = TaskData("mc", [ChoiceExample("q", [" a", " b"], 0)], [ChoiceExample("q", [" c", " d"], 1)], [])
    assert varied.answers() is None


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
    data = Settings.from_config({"data.num-partitions": 4, "data.partitioner": "iid", "train.max-length": 64}).data
    assert client_training._partition(context, data) == (3, 1)
    source = ExampleSource(local=client_training._local_data(context), task="bbc-news", seed=1, data=data, num_partitions=1,
                           partition_id=3, digest="tiny")
    features = NodeCache().features(source, load_tokenizer(str(tiny_lm_dir)))
    assert len(features) == 2
    assert all(len(f["input_ids"]) == len(f["labels"]) for f in features)

    plain = Context(run_id=1, node_id=7, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    assert client_training._partition(plain, data) == (0, 4)
    assert client_training._local_data(plain) is None  # another node in the same process uses the task


def test_a_node_with_a_bad_file_is_refused_before_training_and_its_rows_stay_on_the_node(
        tiny_lm_dir, tmp_path, private_cache, caplog):
    """Three nodes; node 0's own file labels an answer bbc-news does not have. The round goes on with the
    other two; the model owner's records say only that node 0's file was refused (no count, no row)."""
    config = tiny_config(tiny_lm_dir, tmp_path / "run", **{"num-rounds": 1})
    grid = InProcessGrid(client_app.app, 3, config)
    bad = write_examples(tmp_path / "bad.jsonl", [ChoiceExample("Article: SECRET\nTopic:", [" sport", " weather"], 1),
                                                  ChoiceExample("Article: fine\nTopic:", [" sport"], 0)])
    grid.contexts[grid.node_ids[0]].node_config["data-path"] = str(bad)
    node_log = logging.getLogger("fl_offsite")  # log_to_console() stops it propagating to caplog's root handler
    node_log.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="fl_offsite")
    try:
        run_federated(grid, config)
    finally:
        node_log.removeHandler(caplog.handler)

    record = rounds_of(tmp_path / "run")[-1]
    (problem,) = record["problems"]
    assert problem["node"] == grid.node_ids[0] and problem["kind"] == "failed"
    assert client_training.DATA_FILE_REFUSED in problem["reason"] and "1 bad row" not in problem["reason"]
    assert sorted(c["partition-id"] for c in record["clients"]) == [1, 2]
    on_record = "".join(p.read_text(errors="replace") for p in (tmp_path / "run").rglob("*") if p.is_file())
    assert "SECRET" not in on_record and "line 1:" not in on_record
    assert "bad.jsonl: 1 of 2 rows are bad (line 1: the labelled answer is not one of the task's answers" in caplog.text
    assert "client 1 round 1: loss" in caplog.text and "client 0 round 1" not in caplog.text  # no training
