"""The owner scores round r while round r + 1 trains (eval.overlap): the same records, adapter and resume as
without, a record and checkpoint only once a round's scores are in, and a scoring error still ends the run."""
from __future__ import annotations

import threading

import pytest
import torch

from fl_offsite.run.folder import RunFolder
from fl_offsite.surgery.split import load_adapter
from fl_offsite.testing.flower import rounds_of, run, tiny_config

SCORES = ("acc", "acc_norm", "n")


def _scores(run_dir) -> list[dict]:
    return [{model: {k: r["eval"][model][k] for k in SCORES} for model in r["eval"]} for r in rounds_of(run_dir)]


def test_round_1_is_scored_while_round_2_trains_with_the_same_records_and_adapter(tiny_lm_dir, tmp_path,
                                                                                  monkeypatch):
    from fl_offsite.app.owner import ModelOwner

    round_2_out, overlapped = threading.Event(), {}
    evaluate = ModelOwner.evaluate

    def scored_once_round_2_is_out(self, rnd, payload):
        if rnd == 1:  # without overlap, round 2 cannot start before this returns
            overlap = self.settings.eval.overlap
            overlapped[overlap] = round_2_out.wait(timeout=60 if overlap else 1)
        return evaluate(self, rnd, payload)

    def note_round_2(msg, node_index):
        if msg.metadata.message_type == "train" and msg.content["config"]["round"] == 2:
            round_2_out.set()

    monkeypatch.setattr(ModelOwner, "evaluate", scored_once_round_2_is_out)
    for overlap in (True, False):
        round_2_out.clear()
        run(tiny_config(tiny_lm_dir, tmp_path / str(overlap), **{"num-rounds": 3, "eval.overlap": overlap}),
            num_nodes=2, fault=note_round_2)
    assert overlapped == {True: True, False: False}
    assert [r["round"] for r in rounds_of(tmp_path / "True")] == [0, 1, 2, 3]
    assert _scores(tmp_path / "True") == _scores(tmp_path / "False")
    a, b = (load_adapter(tmp_path / name / "adapter.safetensors")[0] for name in ("True", "False"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_round_is_on_record_and_checkpointed_only_once_scored_and_a_scoring_error_ends_the_run(
        tiny_lm_dir, tmp_path, monkeypatch):
    from fl_offsite.app.owner import ModelOwner

    evaluate = ModelOwner.evaluate

    def fails_in_round_1(self, rnd, payload):
        if rnd == 1:
            raise RuntimeError("the owner's scoring broke")
        return evaluate(self, rnd, payload)

    monkeypatch.setattr(ModelOwner, "evaluate", fails_in_round_1)
    config = tiny_config(tiny_lm_dir, tmp_path / "run", **{"num-rounds": 3, "eval.overlap": True})
    with pytest.raises(RuntimeError, match="the owner's scoring broke"):
        run(config, num_nodes=2)
    assert [r["round"] for r in rounds_of(tmp_path / "run")] == [0]
    assert RunFolder(tmp_path / "run").load_checkpoint().round == 0  # round 1 never claimed
