"""A data owner's node refuses what a hostile model owner could send: paths out of its store, bad values."""
from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from fl_offsite.app import client_app, client_training, wire
from fl_offsite.app.node_store import NodeStore
from fl_offsite.errors import UserError

DIGEST = "0123456789abcdef"


@pytest.fixture(autouse=True)
def _task_identity():
    """What Flower's runtime sets before a message is built (InProcessGrid does the same)."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 7


def _model_message(digest: str = DIGEST, files: dict | None = None, bf16=None) -> Message:
    model = {"digest": digest, **({"bf16-tensors": bf16} if bf16 is not None else {})}
    content = RecordDict({"model": ConfigRecord(model),
                          "files": ConfigRecord(files if files is not None else {"config.json": b"{}"}),
                          "weights": ArrayRecord({"w": Array(np.zeros(2, dtype=np.float32))})})
    return Message(content, dst_node_id=7, message_type="query.model")


def test_a_delivered_package_lands_in_the_store(tmp_path):
    folder = NodeStore(tmp_path / "store").store(_model_message())
    assert folder == tmp_path / "store" / f"model-{DIGEST}"
    assert sorted(p.name for p in folder.iterdir()) == [".fl-offsite", "config.json", "model.safetensors"]


@pytest.mark.parametrize("files", [{"../escaped": b"x"}, {"/tmp/abs": b"x"}, {"a/b": b"x"}, {".pth": b"x"},
                                   {"model.safetensors": b"x"}, {"config.json": "not bytes"},
                                   {f"f{i}": b"" for i in range(65)}])
def test_file_names_that_leave_the_folder_or_replace_the_weights_are_refused(tmp_path, files):
    with pytest.raises(wire.BadMessage):
        NodeStore(tmp_path / "store").store(_model_message(files=files))
    assert not (tmp_path / "escaped").exists() and not list((tmp_path / "store").glob("model-*"))


@pytest.mark.parametrize("digest", ["../../home", "/abs/olute", "0123456789ABCDEF", "short", DIGEST + "0"])
def test_a_digest_is_sixteen_hex_digits_or_refused(tmp_path, digest):
    with pytest.raises(wire.BadMessage, match="digest"):
        NodeStore(tmp_path / "store").store(_model_message(digest=digest))
    status = Message(RecordDict({"model": ConfigRecord({"digest": digest})}), dst_node_id=7,
                     message_type="query.model_status")
    context = Context(run_id=1, node_id=7, node_config={"cache-dir": str(tmp_path / "store")}, state=RecordDict(),
                      run_config={})
    with pytest.raises(wire.BadMessage, match="digest"):
        client_app.model_status(status, context)


def test_oversized_files_and_bad_bf16_lists_are_refused(tmp_path):
    with pytest.raises(wire.BadMessage, match="MB"):
        NodeStore(tmp_path).store(_model_message(files={"tokenizer.json": b"x" * (256 * 2**20 + 1)}))
    with pytest.raises(wire.BadMessage, match="bf16-tensors"):
        NodeStore(tmp_path).store(_model_message(bf16="w"))


def test_round_values_are_typed_and_bounded():
    config = ConfigRecord({"lr": math.nan, "round": -1, "split-plan": "{not json", "task-answers": "[1, 2]",
                           "digest": DIGEST, "big": 1e300})
    with pytest.raises(wire.BadMessage, match="lr"):
        wire.number(config, "lr", low=0, high=1)
    with pytest.raises(wire.BadMessage, match="round"):
        wire.integer(config, "round", low=1, high=10)
    with pytest.raises(wire.BadMessage, match="split-plan"):
        client_training._plan(wire.text(config, "split-plan"))
    with pytest.raises(wire.BadMessage, match="task-answers"):
        client_training._answers(config)
    with pytest.raises(wire.BadMessage, match="missing"):
        wire.text(config, "missing")
    assert client_training._answers(ConfigRecord({})) is None and client_training._plan("") is None
    assert wire.text(config, "digest", pattern=wire.DIGEST) == DIGEST


def test_a_failure_on_the_node_reaches_the_owner_without_its_text(tiny_lm_dir, tmp_path, monkeypatch):
    """Flower forwards an exception's text to the model owner: the node sends only its type, and logs the rest."""
    from fl_offsite.app.server_app import run_federated
    from fl_offsite.testing.flower import InProcessGrid, tiny_config

    def leak(*args, **kwargs):
        raise ValueError("private row: Alice's diagnosis is ...")

    monkeypatch.setattr(client_training, "train_local", leak)
    config = tiny_config(tiny_lm_dir, tmp_path / "run", **{"num-rounds": 1})
    with pytest.raises(RuntimeError, match="returned a usable update") as failed:
        run_federated(InProcessGrid(client_app.app, 2, config), config)
    assert "training failed on node" in str(failed.value) and "(ValueError)" in str(failed.value)
    assert "Alice" not in str(failed.value)


def test_the_node_policy_refuses_runs_it_does_not_take_part_in():
    from fl_offsite.app.node_policy import NodePolicy
    from fl_offsite.config.settings import Settings

    policy = NodePolicy.from_node_config({"allowed-methods": "offsite, offsite-lora", "min-examples-per-update": 16})
    policy.check(Settings.from_config({"train.batch-size": 8, "train.local-steps": 2}))
    with pytest.raises(wire.SharedError, match="trains only offsite, offsite-lora, not fedavg-full"):
        policy.check(Settings.from_config({"method": "fedavg-full"}))
    with pytest.raises(wire.SharedError, match="at least 16 examples per update.*asks 4"):
        policy.check(Settings.from_config({"train.batch-size": 1, "train.local-steps": 4}))
    with pytest.raises(wire.SharedError, match="local-steps > 0"):
        policy.check(Settings.from_config({"train.local-steps": 0}))
    with pytest.raises(UserError, match="needs update-clip-norm"):
        NodePolicy.from_node_config({"update-noise-multiplier": 1.0})


def test_a_protected_update_is_clipped_and_noised_on_the_node():
    import torch

    from fl_offsite.app.node_policy import NodePolicy

    sent = {"a": torch.zeros(100), "b": torch.ones(10)}
    trained = {"a": torch.full((100,), 3.0), "b": torch.ones(10)}
    clipped = client_training.protected_update(sent, trained, NodePolicy(update_clip_norm=1.0))
    change = torch.cat([(clipped[k] - sent[k]).flatten() for k in sent])
    assert torch.linalg.vector_norm(change).item() == pytest.approx(1.0, rel=1e-5)
    noised = [client_training.protected_update(sent, trained, NodePolicy(update_clip_norm=1.0,
                                                                         update_noise_multiplier=1.0))
              for _ in range(2)]
    assert not torch.equal(noised[0]["a"], noised[1]["a"])  # fresh noise each time, not the run's seed
    assert (noised[0]["a"] - clipped["a"]).std().item() == pytest.approx(1.0, rel=0.3)


def test_a_node_with_a_policy_trains_within_it_end_to_end(tiny_lm_dir, tmp_path):
    from fl_offsite.app.server_app import run_federated
    from fl_offsite.testing.flower import InProcessGrid, rounds_of, tiny_config

    config = tiny_config(tiny_lm_dir, tmp_path / "run", **{"num-rounds": 1})
    grid = InProcessGrid(client_app.app, 3, config)
    for node in grid.node_ids:
        grid.contexts[node].node_config.update({"allowed-methods": "offsite", "update-clip-norm": 0.5})
    run_federated(grid, config)
    clients = rounds_of(tmp_path / "run")[-1]["clients"]
    assert len(clients) == 3 and all(c["update-norm"] <= 0.5 + 1e-4 for c in clients)  # measured by the owner


def test_the_store_keeps_the_recently_used_models_and_refuses_oversized_ones(tmp_path):
    import os

    store = NodeStore(tmp_path / "store", max_models=2, max_model_mb=1)
    digests = [f"{i:016x}" for i in range(3)]
    for age, digest in enumerate(digests[:2]):
        folder = store.store(_model_message(digest))
        os.utime(folder, (1000 + age, 1000 + age))
    store.use(digests[0])  # the older one is used again: the other goes first
    store.store(_model_message(digests[2]))
    assert [store.has(d) for d in digests] == [True, False, True]
    assert store.store(_model_message(digests[2])) == store.folder(digests[2])  # already stored: success
    big = _model_message("f" * 16)
    big.content["weights"] = ArrayRecord({"w": Array(np.zeros(2**19, dtype=np.float32))})
    with pytest.raises(wire.BadMessage, match="at most 1 MB"):
        store.store(big)


def test_fl_offsite_supernode_passes_the_nodes_policy_in_its_node_config():
    from fl_offsite.cli.deploy import node_policy
    from fl_offsite.ops.deployment import SuperNodeSettings

    policy = node_policy(["allowed-methods=offsite,offsite-lora", "update-clip-norm=0.5", "max-models=2"])
    settings = SuperNodeSettings("127.0.0.1:9093", None, None, partition_id=0, policy=policy)
    config = settings.node_config()
    assert 'allowed-methods="offsite,offsite-lora"' in config and 'update-clip-norm="0.5"' in config
    assert _policy_of_node_config(config).update_clip_norm == 0.5
    with pytest.raises(UserError, match="did you mean update-clip-norm"):
        node_policy(["update-clip-nrom=1"])
    with pytest.raises(UserError, match="needs update-clip-norm"):
        node_policy(["update-noise-multiplier=1"])


def _policy_of_node_config(text: str):
    """The policy a SuperNode started with ``--node-config text`` hands its ClientApp (Flower's own parser)."""
    from flwr.common.config import parse_config_args

    from fl_offsite.app.node_policy import NodePolicy

    return NodePolicy.from_node_config(parse_config_args([text]))
