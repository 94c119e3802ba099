"""Typed round records: the JSON a run writes, read back exactly, and malformed records refused."""
from __future__ import annotations

import json

import pytest

from fl_offsite.run.records import ClientReport, RecordError, RoundRecord

# A training round's line of metrics.jsonl as runs write it (re-alignment on, one node missing).
LINE = (
    '{"round": 1, "eval": {"plugin": {"task": "bbc-news", "split": "test", "acc": 0.16666666666666666, '
    '"acc_stderr": 0.16666666666666669, "acc_norm": 0.16666666666666666, "acc_norm_stderr": 0.16666666666666669, '
    '"n": 6, "seconds": 0.22906489800152485, "examples_per_s": 26.193450207111432, "split_size": 496}}, '
    '"seconds": 3.6901446049996594, "clients": [{"node": 1001, "bytes_down": 77220, "realign_bytes_down": 12628, '
    '"bytes_up": 77220, "update-norm": 0.2404576689004898, "num-examples": 689, "partition-id": 1, "round": 1, '
    '"train-loss": 5.9296715259552, "train-steps": 2, "train-seconds": 0.4593779770002584, '
    '"tokens-per-s": 1114.5506002341772, "peak-memory-mb": 626.98828125, "trainable-params": 18560}], '
    '"problems": [{"node": 1002, "kind": "missing", "reason": "no reply within strategy.round-timeout = 7 s"}], '
    '"missing": 1, "lr": 0.001, "communication": {"bytes_down": 231660, "bytes_up": 154440, '
    '"cumulative_bytes_down": 231660, "cumulative_bytes_up": 154440, "one_time_bytes": 0, '
    '"realign_bytes_down": 37884, "cumulative_realign_bytes_down": 37884}, "realign": {"steps": 3, "emulators": '
    '{"2": {"error_before": 0.16930142045021057, "error_after": 0.15030129253864288, "losses": '
    '[0.14601807296276093, 0.1652284860610962, 0.17820164561271667]}}, "seconds": 1.5726438000019698}}')


def test_a_written_line_reads_back_to_the_same_bytes():
    record = RoundRecord.from_json(json.loads(LINE))
    assert json.dumps(record.to_json()) == LINE
    assert record.missing == 1 and record.realign.emulators[2].error_after < record.realign.emulators[2].error_before
    assert record.clients[0].train_loss == pytest.approx(5.9297, abs=1e-4) and record.traffic.bytes_so_far() == 423984


def test_a_reply_keeps_its_other_metrics():
    client = ClientReport.of_reply(7, 10, None, 12, 0.5, {"num-examples": 3, "custom": 1.5})
    assert client.num_examples == 3 and client.other == {"custom": 1.5} and client.train_loss is None
    assert client.to_json() == {"node": 7, "bytes_down": 10, "bytes_up": 12, "update-norm": 0.5,
                                "num-examples": 3, "custom": 1.5}
    assert ClientReport.from_json(client.to_json()) == client


def _broken(path: str, value) -> dict:
    """LINE with the value at ``path`` (keys joined by '/') replaced, or removed when ``value`` is DROP."""
    record = json.loads(LINE)
    *parents, last = path.split("/")
    node = record
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    if value is DROP:
        del node[last]
    else:
        node[int(last) if isinstance(node, list) else last] = value
    return record


DROP = object()


@pytest.mark.parametrize("path, value, message", [
    ("eval", DROP, "round record lacks 'eval'"),
    ("round", "1", "round must be an integer"),
    ("surprise", 1, "unknown key"),
    ("eval/plugin/acc", None, r"eval.plugin.acc must be a number"),
    ("clients/0/bytes_up", "77220", r"clients\[0\].bytes_up must be an integer"),
    ("clients/0/num-examples", DROP, r"clients\[0\] lacks 'num-examples'"),
    ("clients/0/train-loss", "low", r"clients\[0\].train-loss must be a number"),
    ("problems/0/kind", "lost", r"problems\[0\] must have a kind"),
    ("missing", 0, "does not count the problems' missing nodes"),
    ("communication/one_time_bytes", DROP, "communication lacks 'one_time_bytes'"),
    ("realign/emulators/2/losses", 0.1, r"realign.emulators.2.losses must be a list"),
    ("realign/emulators/2/last_loss", 0.1, "unknown key"),
])
def test_a_malformed_record_is_refused_with_the_key_at_fault(path, value, message):
    with pytest.raises(RecordError, match=message):
        RoundRecord.from_json(_broken(path, value))
