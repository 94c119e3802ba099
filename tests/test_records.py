"""Typed round records: the JSON a run writes, read back exactly, malformed lines refused, and every writer
(metrics.jsonl, the round table, TensorBoard, the compare report, the model card) given every optional part
of a record, present and absent."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
from test_federated import tensorboard_scalars

from fl_offsite.config.settings import Settings, validate
from fl_offsite.errors import UserError
from fl_offsite.run.card import model_card, run_record
from fl_offsite.run.compare import write_report
from fl_offsite.run.folder import METRICS, RunFolder
from fl_offsite.run.records import (
    ClientReport,
    Privacy,
    Problem,
    RealignedEmulator,
    RealignRecord,
    RecordError,
    RoundRecord,
    Traffic,
)
from fl_offsite.run.tables import round_table
from fl_offsite.run.tensorboard import TensorBoardLog

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


def test_a_malformed_line_of_a_run_names_the_file_and_line(tmp_path):
    run = RunFolder(tmp_path)
    (tmp_path / METRICS).write_text('{"round": 0, "eval": {}}\n' + json.dumps(_broken("lr", "fast")) + "\n")
    with pytest.raises(UserError, match=rf"{METRICS}, line 2: lr must be a number.*results.resume=false"):
        run.rounds()
    (tmp_path / METRICS).write_text('{"round": 0, "eval": {}\n')
    with pytest.raises(UserError, match=f"{METRICS}, line 1: Expecting"):
        run.append_round(RoundRecord(0, {}))


def test_appending_a_round_keeps_the_earlier_lines_as_written(tmp_path):
    run = RunFolder(tmp_path)
    earlier = '{"round": 0,   "eval": {}}'  # spaced as no run writes it: kept byte for byte
    (tmp_path / METRICS).write_text(earlier + "\n" + LINE + "\n")
    run.append_round(RoundRecord(1, {}))  # replaces round 1
    assert (tmp_path / METRICS).read_text() == earlier + '\n{"round": 1, "eval": {}}\n'


SCORES = {"task": "bbc-news", "split": "test", "acc": 0.5, "acc_stderr": 0.1, "acc_norm": 0.25, "acc_norm_stderr": 0.1,
          "n": 6, "split_size": 496}
CLIENTS = [ClientReport(node=n, bytes_down=1000, bytes_up=1000, update_norm=0.2, num_examples=10,
                        realign_bytes_down=300, partition_id=i, round=1, train_loss=2.0 + i, train_steps=2,
                        train_seconds=0.5, tokens_per_s=100.0, peak_memory_mb=600.0 + i, trainable_params=123)
           for i, n in enumerate((1001, 1002))]
REALIGNED = RealignRecord(steps=3, emulators={2: RealignedEmulator(0.2, 0.1, [0.3, 0.2, 0.1])}, seconds=1.5)
FULL = RoundRecord(1, {"plugin": SCORES, "emulator": SCORES}, seconds=3.0, clients=CLIENTS,
                   problems=[Problem(1003, "missing", "no reply"), Problem(1004, "rejected", "too far")], lr=1e-3,
                   traffic=Traffic(2000, 2000, 2000, 2000, 5000, realign_bytes_down=600,
                                   cumulative_realign_bytes_down=600),
                   realign=REALIGNED, privacy=Privacy(epsilon=4.7, delta=1e-5, releases=1))
# What each part of a round's record is under in metrics.jsonl, and the TensorBoard tags it gives.
PARTS = {"scores": ("eval", "eval/plugin/acc"), "seconds": ("seconds", "time/round_seconds"),
         "clients": ("clients", "train/loss"), "problems": ("problems", None), "lr": ("lr", "train/lr"),
         "traffic": ("communication", "communication/MB_up"), "realign": ("realign", "realign/k2_error_after"),
         "privacy": ("privacy", "privacy/epsilon")}


def _without(part: str | None) -> RoundRecord:
    if part is None:
        return FULL
    if part == "traffic.realign":  # a run without re-alignment: no factors counted
        return replace(FULL, traffic=replace(FULL.traffic, realign_bytes_down=None, cumulative_realign_bytes_down=None))
    if part == "client metrics":  # a client that sent num-examples only
        return replace(FULL, clients=[ClientReport(1001, 1000, 1000, 0.2, num_examples=10)])
    return replace(FULL, **{part: {} if part == "scores" else None})


@pytest.mark.parametrize("absent", [None, *PARTS, "traffic.realign", "client metrics"])
def test_every_writer_takes_a_round_record_with_any_part_absent(absent, tmp_path):
    record = _without(absent)
    config = validate({"num-rounds": 1})
    run = RunFolder(tmp_path / "offsite")
    run.write_config(config)
    zero = RoundRecord(0, FULL.scores, realign=REALIGNED)
    for kept in (zero, record):
        run.append_round(kept)
    assert run.rounds() == [zero, record]  # metrics.jsonl
    written = json.loads((run.root / METRICS).read_text().splitlines()[1])
    for part, (key, _) in PARTS.items():
        assert (key in written) == (part != absent or key == "eval")
    assert ("missing" in written) == (absent != "problems")

    table = round_table(run.rounds()).splitlines()
    assert table[3].startswith("| 1 ") and len(table) == 4

    tracker = TensorBoardLog(run.tensorboard)
    tracker.write(zero)
    tracker.write(record)
    tracker.close()
    scalars = tensorboard_scalars(run.root)
    for part, (_, tag) in PARTS.items():
        if tag is not None:
            written = part != absent and not (tag == "train/loss" and absent == "client metrics")
            assert len(scalars.get(tag, [])) == written + tag.startswith(("eval", "realign"))  # round 0: both
    assert ("train/clients" in scalars) == (absent != "clients")
    assert ("communication/realign_MB_down" in scalars) == (absent not in ("traffic", "traffic.realign"))

    if absent != "client metrics":  # the report's cost table needs what fl_offsite's clients measure
        report = write_report(tmp_path, ["offsite"]).read_text()
        assert ("re-aligned its emulator before every round" in report) == (absent not in ("clients", "realign"))

    settings = Settings.from_config(config)
    card = model_card(settings.model, None, run_record(settings, None, record, 2, None), "usage")
    assert ("| privacy " in card) == (absent != "privacy")
    assert ("| plugin " in card) == (absent != "scores")


def test_tensorboard_is_optional_and_its_absence_is_one_line(monkeypatch, tmp_path):
    import importlib.util

    from fl_offsite.errors import UserError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(UserError, match=r"pip install 'fl-offsite\[tensorboard\]'"):
        TensorBoardLog(tmp_path / "tb")
