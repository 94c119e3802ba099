"""The owner's screening of training replies, driven without a model: whatever a node puts in its reply rejects
that reply (or is overruled), never the round."""
from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAvg, Strategy

from fl_offsite.config.sections import PrivacySettings, StrategySettings
from fl_offsite.run.folder import RunFolder
from fl_offsite.testing.flower import InProcessGrid, NoOwner, rounds_of
from strategies.aggregation import aggregation_strategy
from strategies.offsite import OffsiteStrategy
from strategies.policy import Exchange, RoundPolicy

GLOBAL = {"w": torch.zeros(4), "b": torch.zeros(2)}
Reply = Callable[[Message, int], Message]  # (training message, node index) -> that node's reply


def _reply(msg: Message, arrays: dict[str, Array] | dict[str, torch.Tensor], metrics: dict) -> Message:
    return Message(RecordDict({"arrays": ArrayRecord(arrays), "metrics": MetricRecord(metrics)}), reply_to=msg)


def _honest(msg: Message, node_index: int) -> Message:
    """The global payload moved by 1, with a plausible count."""
    return _reply(msg, {k: v + 1.0 for k, v in GLOBAL.items()}, {"num-examples": 10, "train-steps": 2})


def _one_round(tmp_path, node_0: Reply, inner: Strategy | None = None, min_replies: int = 1) -> ArrayRecord | None:
    """One round of an offsite strategy around ``inner`` (FedAvg) over two nodes, node 0 replying ``node_0`` and
    node 1 honestly; the round is recorded in ``tmp_path``. Returns the new global payload."""
    grid = InProcessGrid(ClientApp(), 2, {}, fault=lambda msg, i: (node_0 if i == 0 else _honest)(msg, i))
    exchange = Exchange(GLOBAL, node_config={node: {} for node in grid.node_ids})
    policy = RoundPolicy(min_replies=min_replies, seed=0, lr_at=lambda r: 1e-4)
    strategy = OffsiteStrategy(inner or FedAvg(), NoOwner(), RunFolder(tmp_path), policy, exchange)
    messages = strategy.configure_train(1, ArrayRecord(GLOBAL), ConfigRecord(), grid)
    arrays, _ = strategy.aggregate_train(1, grid.send_and_receive(messages))
    strategy.evaluate(1, arrays or ArrayRecord(GLOBAL))
    return arrays


def _npy(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, array)
    return out.getvalue()


def _npy_header(shape: tuple[int, ...]) -> bytes:
    """An npy file's header for ``shape`` float32 values, and none of them."""
    out = io.BytesIO()
    np.lib.format.write_array_header_1_0(out, {"descr": "<f4", "fortran_order": False, "shape": shape})
    return out.getvalue()


def _npz() -> bytes:
    out = io.BytesIO()
    np.savez(out, w=np.zeros(4, dtype=np.float32))
    return out.getvalue()


UNDECODABLE = {
    "strings": Array(np.array(["x"])),
    "garbage": Array("float32", (4,), "numpy.ndarray", b"not an npy file"),
    "empty": Array("float32", (4,), "numpy.ndarray", b""),
    "truncated": Array("float32", (4,), "numpy.ndarray", _npy(np.zeros(4, dtype=np.float32))[:-3]),
    "npz": Array("float32", (4,), "numpy.ndarray", _npz()),
    "other-stype": Array("float32", (4,), "torch.Tensor", _npy(np.zeros(4, dtype=np.float32))),
    "huge-shape": Array("float32", (4,), "numpy.ndarray", _npy_header((2**40,))),  # 4 TiB declared
    "big-endian": Array("float32", (4,), "numpy.ndarray", _npy(np.zeros(4, dtype=">f4"))),
}


@pytest.mark.parametrize("kind", sorted(UNDECODABLE))
def test_arrays_that_do_not_decode_reject_that_reply_only(tmp_path, kind):
    def undecodable(msg: Message, node_index: int) -> Message:
        return _reply(msg, {"w": UNDECODABLE[kind], "b": Array(GLOBAL["b"])}, {"num-examples": 10})

    arrays = _one_round(tmp_path, undecodable)
    (record,) = rounds_of(tmp_path)
    (problem,) = record["problems"]
    assert problem["kind"] == "rejected" and problem["reason"].startswith("arrays do not decode")
    assert len(problem["reason"]) <= 303 and len(record["clients"]) == 1
    assert arrays is not None and torch.equal(arrays.to_torch_state_dict()["w"], torch.ones(4))  # node 1's alone


def test_under_differential_privacy_the_owner_weighs_every_update_equally(tmp_path):
    def odd_steps(msg: Message, node_index: int) -> Message:
        return _reply(msg, {k: v + 1.0 for k, v in GLOBAL.items()}, {"num-examples": 10, "train-steps": 7})

    private = aggregation_strategy(StrategySettings(), PrivacySettings(noise_multiplier=1.0), num_nodes=2)
    assert _one_round(tmp_path, odd_steps, inner=private) is not None
    (record,) = rounds_of(tmp_path)
    assert record["privacy"]["epsilon"] > 0 and not record["problems"] and len(record["clients"]) == 2


def _long_name(msg: Message, node_index: int) -> Message:
    return _reply(msg, {**GLOBAL, "\x1b[2J" + "x" * 100_000 + "\nFAKE LOG LINE": torch.zeros(1)},
                  {"num-examples": 10})


def test_a_rejection_reason_is_kept_short_and_printable(tmp_path):
    _one_round(tmp_path, _long_name)
    (problem,) = rounds_of(tmp_path)[-1]["problems"]
    assert "unexpected tensor" in problem["reason"]
    assert len(problem["reason"]) <= 303 and "\n" not in problem["reason"] and "\x1b" not in problem["reason"]


def test_the_quorum_error_keeps_rejection_reasons_short(tmp_path):
    with pytest.raises(RuntimeError, match="unexpected tensor") as raised:
        _one_round(tmp_path, _long_name, min_replies=2)
    assert len(str(raised.value)) < 1000
