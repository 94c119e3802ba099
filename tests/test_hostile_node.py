"""The model owner refuses what a hostile data owner's node could send, for that node only; the run goes on."""
from __future__ import annotations

import pytest
from flwr.app import ConfigRecord, Message, RecordDict

from fl_offsite.app import wire
from fl_offsite.app.profile import NodeProfile
from fl_offsite.testing.flower import of_type, rounds_of, run, tiny_config

pytestmark = pytest.mark.usefixtures("private_cache")


@pytest.mark.parametrize("record", [{"memory-budget-mb": float("nan")}, {"memory-budget-mb": -5.0},
                                    {"emulator-layers": "8"}, {"emulator-layers": 10**9}, {"emulator-layers": 2.5}])
def test_a_profile_of_the_wrong_type_or_range_is_refused(record):
    with pytest.raises(wire.BadMessage):
        NodeProfile.from_record(record)


def test_a_malformed_profile_leaves_that_node_out_and_the_run_goes_on(tiny_lm_dir, tmp_path):
    def malformed_profile(msg, node_index):
        if msg.metadata.message_type == "query.node_profile" and node_index == 0:
            return Message(RecordDict({"profile": ConfigRecord({"emulator-layers": "all of them"})}), reply_to=msg)
        return None

    config = tiny_config(tiny_lm_dir, tmp_path / "run", **{"num-rounds": 1})
    grid = run(config, num_nodes=3, fault=malformed_profile)
    trained = {m.metadata.dst_node_id for m in of_type(grid, "train")}
    assert trained == set(grid.node_ids[1:])  # node 0 got no model and no round
    assert len(rounds_of(tmp_path / "run")[-1]["clients"]) == 2


def _reply(msg, arrays, metrics, **extra):
    from flwr.app import ArrayRecord, MetricRecord

    return Message(RecordDict({"arrays": ArrayRecord(arrays), "metrics": MetricRecord(metrics), **extra}),
                   reply_to=msg)


def _shifted(msg, by: float):
    return {k: v + by for k, v in msg.content["arrays"].to_torch_state_dict().items()}


def test_a_client_cannot_overwrite_the_owners_fields_or_add_metrics(tiny_lm_dir, tmp_path):
    def forged(msg, node_index):
        if msg.metadata.message_type != "train" or node_index != 0:
            return None
        return _reply(msg, _shifted(msg, 0.0), {"num-examples": 10, "node": 999, "update-norm": 0.0,
                                                 "bytes_up": 0, "train-loss": float("inf"), "secret-channel": 7})

    config = tiny_config(tiny_lm_dir, tmp_path / "run", **{"num-rounds": 1})
    grid = run(config, num_nodes=3, fault=forged)
    (client,) = [c for c in rounds_of(tmp_path / "run")[-1]["clients"] if c["node"] == grid.node_ids[0]]
    assert client["bytes_up"] > 0 and "secret-channel" not in client and "train-loss" not in client


def test_untrusted_weights_make_the_round_uniform(tiny_lm_dir, tmp_path):
    from fl_offsite.surgery.split import load_adapter

    def claims(msg, node_index):
        if msg.metadata.message_type != "train":
            return None
        count = [10, 10, 10**12][node_index]  # node 2 claims a trillion examples
        return _reply(msg, _shifted(msg, float(node_index)), {"num-examples": count, "train-steps": 2})

    config = tiny_config(tiny_lm_dir, tmp_path / "run", **{"num-rounds": 1})
    grid = run(config, num_nodes=3, fault=claims)
    sent = of_type(grid, "train")[0].content["arrays"].to_torch_state_dict()
    adapter, _ = load_adapter(tmp_path / "run" / "adapter.safetensors")
    moved = {k: (adapter[k].float() - sent[k].float()).mean().item() for k in sent}
    assert all(abs(m - 1.0) < 1e-4 for m in moved.values())  # (0 + 1 + 2) / 3, not ~2


def test_a_reply_with_an_extra_record_is_rejected_for_that_node_only(tiny_lm_dir, tmp_path):
    from flwr.app import ArrayRecord

    def extra(msg, node_index):
        if msg.metadata.message_type != "train" or node_index != 0:
            return None
        return _reply(msg, _shifted(msg, 0.0), {"num-examples": 10}, more=ArrayRecord(_shifted(msg, 5.0)))

    config = tiny_config(tiny_lm_dir, tmp_path / "run", **{"num-rounds": 1})
    run(config, num_nodes=3, fault=extra)
    record = rounds_of(tmp_path / "run")[-1]
    assert len(record["clients"]) == 2
    assert "exactly the 'arrays' and 'metrics' records" in record["problems"][0]["reason"]


def test_a_nodes_error_text_is_kept_short_and_printable(tiny_lm_dir, tmp_path):
    from flwr.app import Error

    def noisy(msg, node_index):
        if msg.metadata.message_type == "train" and node_index == 0:
            return Message(Error(code=0, reason="\x1b[2J" + "x" * 5000 + "\nFAKE LOG LINE"), reply_to=msg)
        return None

    config = tiny_config(tiny_lm_dir, tmp_path / "run", **{"num-rounds": 1})
    run(config, num_nodes=3, fault=noisy)
    (problem,) = rounds_of(tmp_path / "run")[-1]["problems"]
    assert len(problem["reason"]) <= 303 and "\n" not in problem["reason"] and "\x1b" not in problem["reason"]


def test_an_aggregate_that_is_not_finite_or_too_far_is_not_taken():
    import torch
    from flwr.app import ArrayRecord
    from flwr.serverapp.strategy import FedAvg

    from fl_offsite.run.folder import RunFolder
    from fl_offsite.testing.flower import NoOwner
    from strategies.offsite import OffsiteStrategy
    from strategies.policy import Exchange, RoundPolicy

    reference = {"w": torch.zeros(4)}
    strategy = OffsiteStrategy(FedAvg(), NoOwner(), RunFolder("/nonexistent"),
                               RoundPolicy(min_replies=1, seed=0, lr_at=lambda r: 1e-4, max_update_norm=1.0),
                               Exchange(reference))
    strategy._global = {"w": torch.zeros(4)}
    kept = strategy._checked_aggregate(1, ArrayRecord({"w": torch.tensor([float("nan"), 0, 0, 0])}))
    assert torch.equal(kept.to_torch_state_dict()["w"], torch.zeros(4))
    scaled = strategy._checked_aggregate(1, ArrayRecord({"w": torch.full((4,), 3.0)})).to_torch_state_dict()["w"]
    assert torch.linalg.vector_norm(scaled).item() == pytest.approx(1.0)


def test_a_node_whose_delivery_fails_is_left_out_and_the_run_goes_on(tiny_lm_dir, tmp_path):
    import json

    from flwr.app import Error

    def broken(msg, node_index):
        if msg.metadata.message_type == "query.model_status" and node_index == 0:
            return Message(RecordDict({"model": ConfigRecord({"has": "maybe"})}), reply_to=msg)
        if msg.metadata.message_type == "query.model" and node_index == 1:
            return Message(Error(code=0, reason="disk full"), reply_to=msg)
        return None

    config = tiny_config(tiny_lm_dir, tmp_path / "run", **{"num-rounds": 1, "strategy.min-train-nodes": 1})
    grid = run(config, num_nodes=3, fault=broken)
    assert {m.metadata.dst_node_id for m in of_type(grid, "train")} == {grid.node_ids[2]}
    refused = json.loads((tmp_path / "run" / "delivery.json").read_text())["deliveries"][-1]["refused"]
    assert "malformed" in refused[str(grid.node_ids[0])] and "disk full" in refused[str(grid.node_ids[1])]
