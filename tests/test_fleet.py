"""Heterogeneous fleets: budgets -> emulator sizes, per-node delivery, one adapter trained across emulators."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from fl_offsite.app.fleet import (
    ACTIVATION_FACTOR,
    Footprint,
    activation_bytes,
    choose_layers,
    measure_footprint,
)
from fl_offsite.app.profile import NodeProfile, check_fleet, node_profile
from fl_offsite.config.settings import Settings
from fl_offsite.errors import UserError
from fl_offsite.surgery.split import load_adapter
from fl_offsite.testing.flower import Crash, InProcessGrid, crash_in_round, of_type, rounds_of, run, tiny_config

pytestmark = pytest.mark.usefixtures("private_cache")
MB = 2 ** 20


def test_a_budget_gets_the_largest_emulator_it_fits_and_one_that_fits_none_is_told_what_would():
    footprint = Footprint(fixed=100 * MB, per_block=10 * MB)  # 110 MB at k=1 ... 180 MB at k=8
    assert choose_layers(1, NodeProfile(memory_budget_mb=1000), footprint, cap=8) == 8
    assert choose_layers(1, NodeProfile(memory_budget_mb=135), footprint, cap=8) == 3
    assert choose_layers(1, NodeProfile(), footprint, cap=8) == 8  # no budget: the configured emulator
    assert choose_layers(1, NodeProfile(emulator_layers=2, memory_budget_mb=1), footprint, cap=8) == 2  # forced
    with pytest.raises(UserError, match="node 7's memory-budget-mb = 100 fits no emulator.*at least 110 MB"):
        choose_layers(7, NodeProfile(memory_budget_mb=100), footprint, cap=8)
    with pytest.raises(UserError, match="emulator-layers = 9.*1 to 8 middle blocks"):
        choose_layers(1, NodeProfile(emulator_layers=9), footprint, cap=8)
    odd = Footprint(fixed=100 * MB, per_block=10.4 * MB)  # the budget a refusal names is enough
    with pytest.raises(UserError, match="at least 111 MB"):
        choose_layers(1, NodeProfile(memory_budget_mb=110), odd, cap=8)
    assert choose_layers(1, NodeProfile(memory_budget_mb=111), odd, cap=8) == 1


def test_a_node_states_its_own_profile_else_the_simulations_list_gives_it_by_partition_id():
    fleet = Settings.from_config({"fleet.memory-budget-mb": "800, 2000"}).fleet
    assert node_profile({"partition-id": 1}, fleet) == NodeProfile(memory_budget_mb=2000)
    assert node_profile({"partition-id": 1, "memory-budget-mb": 512, "emulator-layers": 3}, fleet) == \
        NodeProfile(memory_budget_mb=512, emulator_layers=3)
    assert node_profile({"partition-id": 0}, Settings.from_config({}).fleet) == NodeProfile()
    with pytest.raises(UserError, match="names 2 value.*partition-id 2"):
        node_profile({"partition-id": 2}, fleet)
    with pytest.raises(UserError, match="names 2 value.*for 3 simulated nodes"):
        check_fleet(fleet, 3, cap=8)
    with pytest.raises(UserError, match="asks for 9 middle blocks.*has 8"):
        check_fleet(Settings.from_config({"fleet.emulator-layers": "2,9"}).fleet, 2, cap=8)
    with pytest.raises(UserError, match="whole numbers"):
        Settings.from_config({"fleet.emulator-layers": "2,2.5"})
    with pytest.raises(UserError, match="comma-separated numbers"):
        Settings.from_config({"fleet.emulator-layers": "2;8"})


def test_the_footprint_of_each_size_matches_a_measurement_of_that_emulator(tiny_lm_dir):
    """Measured once on the configured emulator, the linear model gives what a smaller one really holds."""
    from fl_offsite.config.sections import EmulatorRecipe
    from fl_offsite.data.models import load_model
    from fl_offsite.emulator.recipe import prepare_emulator
    from fl_offsite.surgery.split import adapter_names

    model, tokenizer = load_model(str(tiny_lm_dir))

    def emulator(k: int):
        plan, emu, _ = prepare_emulator(str(tiny_lm_dir), model, tokenizer, EmulatorRecipe((1, 1), emulator_layers=k),
                                        "bbc-news")
        return plan, emu, set(adapter_names(emu, plan).values())

    plan, big, trainable = emulator(3)
    footprint = measure_footprint(big, plan, trainable, batch_size=4, seq_len=32, precision="bf16", overhead_mb=50)
    plan1, small, trainable1 = emulator(1)
    outside, per_block = activation_bytes(small, trainable1, 4, 32, "bf16")
    params = dict(small.named_parameters())
    weights = sum(p.numel() * (4 if n in trainable1 else 2) for n, p in params.items())
    state = 12 * sum(params[n].numel() for n in trainable1)
    measured = (weights + state + ACTIVATION_FACTOR * (outside + sum(per_block))) / MB + 50
    assert footprint.mb(1) == pytest.approx(measured, rel=1e-9)
    assert footprint.mb(3) > footprint.mb(1) > 50


def _record_replies(grid: InProcessGrid) -> list:
    """Make ``grid`` keep every training reply (node, arrays, examples) as its client app made it."""
    kept = []

    def fault(msg, node_index):
        if msg.metadata.message_type != "train":
            return None
        reply = grid.client_app(msg, grid.contexts[msg.metadata.dst_node_id])
        kept.append((msg.content["config"]["round"], reply.content["arrays"].to_torch_state_dict(),
                     reply.content["metrics"]["num-examples"]))
        return reply
    grid.fault = fault
    return kept


def test_a_mixed_fleet_trains_one_adapter_averaged_by_examples_and_scores_every_emulator(tiny_lm_dir, tmp_path):
    from fl_offsite.app.client_app import app as client_app
    from fl_offsite.app.server_app import run_federated

    config = tiny_config(tiny_lm_dir, tmp_path / "run", **{"fleet.emulator-layers": "1,2,2"})
    grid = InProcessGrid(client_app, 3, config)
    replies = _record_replies(grid)
    run_federated(grid, config)

    delivery = json.loads((tmp_path / "run" / "delivery.json").read_text())
    nodes = delivery["deliveries"][0]["nodes"]
    assert [nodes[str(n)]["emulator_layers"] for n in grid.node_ids] == [1, 2, 2]
    assert len(delivery["digests"]) == 2 and delivery["package_bytes"] == nodes[str(grid.node_ids[1])]["package_bytes"]
    assert nodes[str(grid.node_ids[0])]["package_bytes"] < delivery["package_bytes"]  # the small one is smaller
    for node in grid.node_ids:  # each node's training messages name its own emulator, which it holds
        config_of = {m.content["config"]["digest"] for m in of_type(grid, "train") if m.metadata.dst_node_id == node}
        assert config_of == {nodes[str(node)]["digest"]}
    plans = {json.loads(m.content["config"]["split-plan"])["split"] for m in of_type(grid, "train")}
    assert plans == {"1-1-1", "1-2-1"}

    # The global adapter after the last round is the examples-weighted mean of that round's replies.
    last = [(arrays, n) for rnd, arrays, n in replies if rnd == 2]
    assert len(last) == 3
    total = sum(n for _, n in last)
    adapter, _ = load_adapter(tmp_path / "run" / "adapter.safetensors")
    for name, tensor in adapter.items():
        mean = sum(arrays[name].double() * n for arrays, n in last) / total
        torch.testing.assert_close(tensor.double(), mean, rtol=1e-5, atol=1e-6)

    for record in rounds_of(tmp_path / "run"):  # plug-in, the configured emulator and the smaller one in use
        assert set(record["eval"]) == {"plugin", "emulator", "emulator-k1"}
    assert load_file(tmp_path / "run" / "split-k1" / "emulator" / "model.safetensors")


def test_a_node_no_emulator_fits_is_refused_and_the_others_train(tiny_lm_dir, tmp_path):
    # three nodes must connect, two can train: Flower's sampling must not wait for the refused one
    config = tiny_config(tiny_lm_dir, tmp_path / "run", **{"fleet.memory-budget-mb": "100000,100000,1",
                                                           "fleet.overhead-mb": 0.0,
                                                           "strategy.min-available-nodes": 3})
    grid = run(config)
    refused = json.loads((tmp_path / "run" / "delivery.json").read_text())["deliveries"][0]["refused"]
    assert list(refused) == [str(grid.node_ids[2])] and "give the node at least" in refused[str(grid.node_ids[2])]
    assert {m.metadata.dst_node_id for m in of_type(grid, "train")} == set(grid.node_ids[:2])
    assert {m.metadata.dst_node_id for m in of_type(grid, "query.model")} == set(grid.node_ids[:2])
    assert all(len(r["clients"]) == 2 for r in rounds_of(tmp_path / "run")[1:])

    with pytest.raises(UserError, match="only 1 node.*can train"):
        run({**config, "results.dir": str(tmp_path / "alone"), "fleet.memory-budget-mb": "100000,1,1"})


def test_a_mixed_fleet_resumes_to_the_same_adapter(tiny_lm_dir, tmp_path):
    straight = tiny_config(tiny_lm_dir, tmp_path / "straight", **{"num-rounds": 3, "fleet.emulator-layers": "1,2"})
    run(straight, num_nodes=2)
    resumed = {**straight, "results.dir": str(tmp_path / "resumed")}
    with pytest.raises(Crash):
        run(resumed, num_nodes=2, fault=crash_in_round(3))
    grid = run(resumed, num_nodes=2)
    assert of_type(grid, "query.model") == []  # both nodes kept their own emulator
    a, _ = load_adapter(tmp_path / "straight" / "adapter.safetensors")
    b, _ = load_adapter(tmp_path / "resumed" / "adapter.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    scores = lambda d: [r["eval"][m]["acc"] for r in rounds_of(d) for m in ("plugin", "emulator", "emulator-k1")]
    assert scores(tmp_path / "straight") == scores(tmp_path / "resumed")


def test_fleet_lists_need_an_offsite_method():
    from fl_offsite.config.settings import validate

    with pytest.raises(UserError, match="needs an offsite method"):
        validate({"method": "fedavg-full", "fleet.emulator-layers": "1,2"})
    with pytest.raises(UserError, match="comma-separated numbers"):
        validate({"fleet.memory-budget-mb": "lots"})


def test_a_client_process_keeps_the_emulators_of_the_fleets_nodes_it_serves(monkeypatch):
    """A Ray actor serving nodes of two emulator sizes loads each once, not at every switch."""
    from fl_offsite.app import node_cache
    from fl_offsite.config.sections import Tuning

    loads = []
    monkeypatch.setattr(node_cache, "_prepare_model", lambda key: loads.append(key.digest) or (key.digest, None))
    cache = node_cache.NodeCache()
    keys = [node_cache.ModelKey(d, f"/{d}", Tuning(), "", 0, "fp32") for d in ("small", "large", "other")]
    for key in [keys[0], keys[1], keys[0], keys[1], keys[2], keys[1]]:
        assert cache.model(key)[0] == key.digest
    assert loads == ["small", "large", "other"]  # the third size evicts the least recently used


@pytest.mark.parametrize("method", ["offsite-lora", "offsite-bottleneck"])
def test_a_mixed_fleet_trains_with_tunings_that_change_the_model_in_place(tiny_lm_dir, tmp_path, method):
    """LoRA and bottleneck adapters wrap the owner's full model: smaller emulators are built from a clean copy."""
    config = tiny_config(tiny_lm_dir, tmp_path / "run", method=method,
                         **{"num-rounds": 1, "fleet.emulator-layers": "1,2"})
    grid = run(config, num_nodes=2)
    plans = {json.loads(m.content["config"]["split-plan"])["split"] for m in of_type(grid, "train")}
    assert plans == {"1-1-1", "1-2-1"}
    for record in rounds_of(tmp_path / "run"):
        assert set(record["eval"]) == {"plugin", "emulator", "emulator-k1"}
    assert all(not r["problems"] for r in rounds_of(tmp_path / "run")[1:])
