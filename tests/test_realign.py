"""Bi-level offsite-tuning: the owner re-aligns the emulator to the current adapter, clients apply the factors."""
from __future__ import annotations

import json

import pytest
import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file
from test_federated import tensorboard_scalars
from transformers import AutoModelForCausalLM

from fl_offsite.app.client_training import CACHE
from fl_offsite.config.sections import LoraSpec, RealignSettings
from fl_offsite.config.settings import validate
from fl_offsite.data.encode import collate, lm_blocks, pad_id
from fl_offsite.emulator.distill import alignment_losses, target_layers
from fl_offsite.emulator.layer_choice import uniform_drop
from fl_offsite.emulator.realign import Realignment, add_realign_lora, get_factors, realign_names
from fl_offsite.errors import UserError
from fl_offsite.run.compare import _markdown, summarize
from fl_offsite.run.folder import RunFolder
from fl_offsite.surgery.lora import add_lora, lora_names
from fl_offsite.surgery.payload import extract_adapter, plug_in
from fl_offsite.surgery.split import SplitPlan, build_emulator, plan_split
from fl_offsite.testing.flower import Crash, crash_in_round, of_type, rounds_of, run, tiny_config
from fl_offsite.testing.models import CORPUS

pytestmark = pytest.mark.usefixtures("private_cache")
REALIGN = {"realign.steps": 3, "realign.pre-steps": 4, "realign.lora-r": 2, "realign.batch-size": 2,
           "distill.block-size": 32, "distill.corpus": "model-samples"}  # public text sampled from the model: fast


@pytest.fixture
def six_blocks(tiny_lm_dir) -> torch.nn.Module:
    """The federated tests' 6-block Llama, loaded fresh."""
    return AutoModelForCausalLM.from_pretrained(tiny_lm_dir).eval()


def _nudged(model: torch.nn.Module, plan, seed: int) -> dict[str, torch.Tensor]:
    """An adapter moved away from the pretrained one, as federated training moves it."""
    generator = torch.Generator().manual_seed(seed)
    return {k: v + 0.05 * torch.randn(v.shape, generator=generator) for k, v in extract_adapter(model, plan).items()}


def test_realignment_lowers_the_middle_output_error_against_the_full_model_with_the_current_adapter(
        six_blocks, tiny_tokenizer):
    model = six_blocks
    plan = plan_split(model, 1, 1, emulator_layers=2, choose_middle=uniform_drop)  # keeps blocks 1 and 4
    emulator = build_emulator(model, plan)
    blocks = lm_blocks(tiny_tokenizer, CORPUS * 20, 24)
    settings = RealignSettings(steps=30, lr=1e-2, lora_r=4, batch_size=4, block_size=24)
    realignment = Realignment(settings, model, {2: (plan, emulator)}, lambda m, p, _: plug_in(m, p, plan), blocks,
                              pad_id(tiny_tokenizer))
    adapter = _nudged(model, plan, seed=1)
    held_out = collate(blocks[:8], pad_id(tiny_tokenizer))

    def error() -> float:
        with torch.no_grad():
            targets = target_layers(plan, "output")
            return alignment_losses(model, emulator, plan, held_out, targets, 0.0, lm=False)[1].item()

    plug_in(model, adapter, plan)
    plug_in(emulator, adapter, plan)
    before = error()
    record = realignment.before_round(1, adapter)
    assert error() < 0.8 * before
    assert record["emulators"]["2"]["error_after"] < 0.8 * record["emulators"]["2"]["error_before"]  # held out
    assert realignment.before_round(0, adapter) is None  # no pre-steps configured
    factors = get_factors(emulator, plan)
    assert {k.split(".")[0] for k in factors} == {"1", "4"}  # full-model block indices
    assert all(p.requires_grad is False for n, p in emulator.named_parameters() if "realign" in n)


def test_realignment_lora_sits_beside_an_offsite_lora_adapter_without_joining_its_payload(six_blocks):
    model = six_blocks
    plan = plan_split(model, 1, 1, emulator_layers=2, choose_middle=uniform_drop)
    emulator = add_lora(build_emulator(model, plan), LoraSpec(r=2), [0, 3])
    before = set(lora_names(emulator, plan))
    add_realign_lora(emulator, plan, RealignSettings(lora_r=2))
    assert set(lora_names(emulator, plan)) == before  # the tuning's payload is unchanged
    layers = [m for m in emulator.modules() if isinstance(m, BaseTunerLayer)]
    assert {tuple(m.active_adapters) for m in layers} == {("default",), ("realign",)}  # both adapters on
    names = realign_names(emulator, plan)
    assert len(names) == 2 * 2 * 7  # A and B of the 7 linear layers of each of the 2 middle blocks
    assert {k.split(".")[0] for k in names} == {str(i) for i in plan.kept_layers[1:3]}


def test_a_split_without_middle_blocks_and_a_full_model_method_are_refused(six_blocks):
    plan = plan_split(six_blocks, 1, 1, emulator_layers=0, choose_middle=uniform_drop)
    with pytest.raises(UserError, match="no middle block.*re-align"):
        add_realign_lora(build_emulator(six_blocks, plan), plan, RealignSettings())
    with pytest.raises(UserError, match="realign.* needs an offsite method"):
        validate({"method": "fedavg-full", "realign.steps": 5})
    with pytest.raises(UserError, match="realign.steps must be >= 0"):
        validate({"realign.steps": -1})


def test_clients_receive_and_apply_the_owners_factors_and_their_bytes_are_counted_apart(tiny_lm_dir, tmp_path):
    config = tiny_config(tiny_lm_dir, tmp_path / "run", **REALIGN, **{"results.tensorboard": True})
    grid = run(config, num_nodes=2)
    train = of_type(grid, "train")
    assert train and all("realign" in m.content.array_records for m in train)
    rounds = rounds_of(tmp_path / "run")
    assert rounds[0]["realign"]["steps"] == 4 and all(r["realign"]["steps"] == 3 for r in rounds[1:])
    last = [m for m in train if m.content["config"]["round"] == 2]
    sent = last[0].content["realign"].to_torch_state_dict()
    owner = RunFolder(tmp_path / "run").load_checkpoint().strategy_state["__realignment__"][2]
    assert sent.keys() == owner.keys() and all(torch.equal(sent[k], owner[k]) for k in sent)
    client_model = next(reversed(CACHE._models.values()))[0]  # the emulator a client trained on in round 2
    applied = get_factors(client_model, _plan(last[0]))
    assert all(torch.equal(applied[k], owner[k]) for k in owner)
    for record in rounds[1:]:
        traffic = record["communication"]
        per_node = last[0].content["realign"].count_bytes()
        assert traffic["realign_bytes_down"] == per_node * len(record["clients"])
        assert traffic["bytes_down"] == sum(c["bytes_down"] for c in record["clients"])  # the adapter's alone
        assert all(c["realign_bytes_down"] == per_node for c in record["clients"])
    assert rounds[-1]["communication"]["cumulative_realign_bytes_down"] == 2 * per_node * 2
    summary = summarize(tmp_path / "run")
    assert summary["realign_bytes_down_per_client_round"] == per_node
    assert summary["communication"]["realign_bytes_down"] == 2 * per_node * 2
    assert summary["owner_realign_seconds_per_round"] > 0
    assert "re-aligned its emulator before every round" in _markdown({"offsite": summary}, [])
    # TensorBoard holds the re-alignment of every round, 0 included (its records once broke the writer)
    scalars = tensorboard_scalars(tmp_path / "run")
    k = next(iter(rounds[0]["realign"]["emulators"]))
    assert scalars[f"realign/k{k}_error_after"] == pytest.approx([r["realign"]["emulators"][k]["error_after"]
                                                                  for r in rounds])
    assert scalars[f"realign/k{k}_last_loss"] == pytest.approx([r["realign"]["emulators"][k]["losses"][-1]
                                                                for r in rounds])


def _plan(message) -> SplitPlan:
    return SplitPlan.from_json(json.loads(message.content["config"]["split-plan"]))


def test_a_realigned_run_resumes_bit_identical(tiny_lm_dir, tmp_path):
    straight = tiny_config(tiny_lm_dir, tmp_path / "straight", **{**REALIGN, "num-rounds": 3})
    run(straight, num_nodes=2)
    resumed = {**straight, "results.dir": str(tmp_path / "resumed")}
    with pytest.raises(Crash):
        run(resumed, num_nodes=2, fault=crash_in_round(3))
    run(resumed, num_nodes=2)
    a = load_file(tmp_path / "straight" / "adapter.safetensors")
    b = load_file(tmp_path / "resumed" / "adapter.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    def state(d):
        return RunFolder(d).load_checkpoint().strategy_state["__realignment__"][2]

    x, y = state(tmp_path / "straight"), state(tmp_path / "resumed")
    assert all(torch.equal(x[k], y[k]) for k in x)
    scores = lambda d: [(r["eval"]["plugin"]["acc"], r["eval"]["emulator"]["acc"]) for r in rounds_of(d)]
    assert scores(tmp_path / "straight") == scores(tmp_path / "resumed")


@pytest.mark.parametrize("method", ["offsite-lora", "offsite-bottleneck"])
def test_realignment_under_the_other_tunings(tiny_lm_dir, tmp_path, method):
    config = tiny_config(tiny_lm_dir, tmp_path / "run", **{**REALIGN, "method": method, "num-rounds": 1})
    grid = run(config, num_nodes=2)
    (message, _) = of_type(grid, "train")
    owner = RunFolder(tmp_path / "run").load_checkpoint().strategy_state["__realignment__"][2]
    applied = get_factors(next(reversed(CACHE._models.values()))[0], _plan(message))
    assert owner.keys() == applied.keys() and all(torch.equal(applied[k], owner[k]) for k in owner)
    assert not any("realign" in name for name in message.content["arrays"].keys())  # the tuning's payload alone
    assert (tmp_path / "run" / "adapter.safetensors").is_file()
