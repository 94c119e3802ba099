"""Block discovery, the l-k-r split, and the extract / plug-in pair on tiny models of many families."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from fl_offsite.data.models import load_model
from fl_offsite.emulator.layer_choice import uniform_drop
from fl_offsite.errors import UserError
from fl_offsite.surgery.blocks import REPEATS_KEY, find_blocks
from fl_offsite.surgery.payload import extract_adapter, plug_in
from fl_offsite.surgery.split import (
    SplitPlan,
    build_emulator,
    load_adapter,
    plan_split,
    read_plan,
    save_adapter,
    write_split,
)
from fl_offsite.testing.models import FAMILIES, LAYERS, VOCAB, save_tiny_model, tiny_model

BLOCK_PATHS = {"gpt2": "transformer.h", "opt": "model.decoder.layers", "bloom": "transformer.h",
               "gpt_neox": "gpt_neox.layers", "falcon": "transformer.h"}


def logits(model, seed: int = 1) -> torch.Tensor:
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits


def block_ids(keys, prefix: str) -> set[int]:
    return {int(k[len(prefix) + 1:].split(".")[0]) for k in keys if k.startswith(prefix + ".")}


def test_uniform_drop_matches_the_paper_rule():
    # SmolLM2 2-8-2: 26 middle blocks (2..27), kept as in fidelity-probe.md.
    assert [2 + i for i in uniform_drop(26, 8)] == [2, 6, 9, 13, 16, 20, 23, 27]
    assert uniform_drop(5, 5) == [0, 1, 2, 3, 4]
    assert uniform_drop(5, 1) == [0]
    assert uniform_drop(5, 0) == []
    with pytest.raises(UserError, match="cannot keep 6 of 5 middle blocks"):
        uniform_drop(5, 6)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_split_of_every_family(family, tmp_path):
    folder = save_tiny_model(family, tmp_path / "full")
    model, _ = load_model(str(folder), with_tokenizer=False)
    prefix, blocks = find_blocks(model)
    assert prefix == BLOCK_PATHS.get(family, "model.layers") and len(blocks) == LAYERS

    plan = plan_split(model, 2, 1, emulator_layers=3)
    assert plan.kept_layers == (0, 1, 2, 4, 6, 7) and plan.adapter_layers == (0, 1, 7)
    write_split(tmp_path / "split", build_emulator(model, plan), extract_adapter(model, plan), plan)

    emulator = AutoModelForCausalLM.from_pretrained(tmp_path / "split" / "emulator")
    assert len(find_blocks(emulator)[1]) == 6
    assert emulator.config.get_text_config().num_hidden_layers == 6
    logits(emulator)  # runs standalone
    with safe_open(str(tmp_path / "split" / "emulator" / "model.safetensors"), "pt") as f:
        assert block_ids(f.keys(), prefix) == set(range(6))  # no tensor of a dropped block
    full_state, emu_state = model.state_dict(), emulator.state_dict()
    for pos, orig in enumerate(plan.kept_layers):
        for key, value in emu_state.items():
            if key.startswith(f"{prefix}.{pos}."):
                assert torch.equal(value, full_state[key.replace(f"{prefix}.{pos}.", f"{prefix}.{orig}.", 1)])
    assert read_plan(tmp_path / "split") == plan


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_emulator_keeping_every_block_equals_the_full_model(family):
    model = tiny_model(family)
    plan = plan_split(model, 1, 1, emulator_layers=LAYERS - 2)
    assert torch.allclose(logits(build_emulator(model, plan)), logits(model), atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt_neox", "bloom"])
def test_extract_and_plug_in_are_exact_inverses(family):
    model = tiny_model(family)
    plan = plan_split(model, 2, 2, emulator_layers=2)
    emulator = build_emulator(model, plan)
    before = logits(model)

    adapter = extract_adapter(model, plan)
    assert block_ids(adapter, plan.block_prefix) == set(plan.adapter_layers)
    from_emulator = extract_adapter(emulator, plan)
    assert adapter.keys() == from_emulator.keys()
    assert all(torch.equal(adapter[k], from_emulator[k]) for k in adapter)
    assert torch.equal(logits(plug_in(model, adapter, plan)), before)  # untrained: bit for bit

    # An adapter trained inside the emulator maps back to full-model names.
    with torch.no_grad():
        for p in emulator.parameters():
            p.add_(0.01)
    trained = extract_adapter(emulator, plan)
    plug_in(model, trained, plan)
    assert all(torch.equal(v, extract_adapter(model, plan)[k]) for k, v in trained.items())
    assert not torch.equal(logits(model), before)


def bad_adapters(adapter: dict[str, torch.Tensor]):
    first = sorted(adapter)[0]
    missing = dict(adapter)
    del missing[first]
    yield "lacks", first, missing
    yield "unexpected", "model.layers.3.extra.weight", {**adapter, "model.layers.3.extra.weight": torch.zeros(1)}
    yield "shape", first, {**adapter, first: torch.zeros(3)}
    yield "dtype", first, {**adapter, first: adapter[first].double()}
    yield "NaN", first, {**adapter, first: torch.full_like(adapter[first], float("nan"))}


def test_plug_in_rejects_bad_adapters_naming_the_key():
    model = tiny_model("llama")
    plan = plan_split(model, 1, 1, emulator_layers=2)
    adapter = extract_adapter(model, plan)
    before = logits(model)
    for what, key, bad in bad_adapters(adapter):
        with pytest.raises(UserError, match=what) as err:
            plug_in(model, bad, plan)
        assert repr(key) in str(err.value)
    assert torch.equal(logits(model), before)  # nothing was half-applied


def test_bad_splits_and_models_give_clear_errors():
    model = tiny_model("llama")
    with pytest.raises(UserError, match="does not fit"):
        plan_split(model, 5, 5, emulator_layers=1)
    with pytest.raises(UserError, match="cannot keep"):
        plan_split(model, 2, 2, emulator_layers=5)
    with pytest.raises(UserError, match="exactly one"):
        plan_split(model, 2, 2)
    with pytest.raises(UserError, match="no list of transformer blocks"):
        find_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    plan = plan_split(model, 1, 1, emulator_layers=2)
    with pytest.raises(UserError, match="wrong model"):
        extract_adapter(_three_block_llama(), plan)


def _three_block_llama():
    model = tiny_model("llama")
    model.model.layers = model.model.layers[:3]
    return model


def test_drop_ratio():
    model = tiny_model("llama")
    assert plan_split(model, 1, 1, drop_ratio=0.5).emulator_layers == 3
    assert plan_split(model, 1, 1, drop_ratio=0.0).emulator_layers == 6


def test_adapter_file_round_trip_and_corruption(tmp_path):
    model = tiny_model("llama")
    plan = plan_split(model, 1, 1, emulator_layers=2)
    adapter = extract_adapter(model, plan)
    save_adapter(tmp_path / "a.safetensors", adapter, plan)
    loaded, loaded_plan = load_adapter(tmp_path / "a.safetensors")
    assert loaded_plan == plan and all(torch.equal(loaded[k], adapter[k]) for k in adapter)
    data = (tmp_path / "a.safetensors").read_bytes()
    (tmp_path / "bad.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="corrupt"):
        load_adapter(tmp_path / "bad.safetensors")
    with pytest.raises(UserError, match="no such"):
        load_adapter(tmp_path / "missing.safetensors")
    assert json.loads(json.dumps(plan.to_json()))["split"] == "1-2-1"


def test_a_file_without_metadata_is_placed_by_its_names(tmp_path):
    from safetensors.torch import save_file

    from fl_offsite.surgery.split import SplitPlan, plan_from_names

    model = tiny_model("llama")
    plan = plan_split(model, 2, 1, emulator_layers=3)
    adapter = extract_adapter(model, plan)
    save_adapter(tmp_path / "ours.safetensors", adapter, plan)
    with safe_open(str(tmp_path / "ours.safetensors"), framework="pt") as f:
        assert f.metadata()["format"] == "pt"  # what transformers and accelerate expect
    save_file(adapter, tmp_path / "plain.safetensors")
    loaded, no_plan = load_adapter(tmp_path / "plain.safetensors")
    assert no_plan is None
    by_names = plan_from_names(model, loaded)
    assert by_names == SplitPlan(8, 2, 1, tuple(range(8)), "model.layers")
    assert by_names.adapter_layers == plan.adapter_layers
    plug_in(model, loaded, by_names)


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_a_shared_emulator_runs_as_the_full_depth_model_with_its_kept_blocks_in_the_dropped_slots(family, tmp_path):
    """CRaSh's layer sharing: each kept middle block also fills the dropped slots before it (the last one also
    those after it); the folder stores k middle blocks and its config the repeats, which loading applies."""
    model = tiny_model(family)
    plan = plan_split(model, 1, 1, emulator_layers=2, shared=True)
    repeats = plan.block_repeats()
    assert sum(repeats) == LAYERS and repeats[0] == repeats[-1] == 1 and max(repeats) > 1
    assert SplitPlan.from_json(json.loads(json.dumps(plan.to_json()))) == plan
    tail = plan_split(model, 1, 1, emulator_layers=2, choose_middle=lambda n, k: [0, 2], shared=True)
    assert tail.block_repeats() == [1, 1, 5, 1] and tail.last_slot(3) == 6 and tail.last_slot(1) == 1

    reference = copy.deepcopy(model)
    reference.config.use_cache = False
    _, full_blocks = find_blocks(model)
    _, slots = find_blocks(reference)
    slot = 0
    for original, count in zip(plan.kept_layers, repeats, strict=True):
        for _ in range(count):
            slots[slot].load_state_dict(full_blocks[original].state_dict())
            slot += 1
    emulator = build_emulator(model, plan)
    assert torch.allclose(logits(emulator), logits(reference), atol=1e-5)
    plain = build_emulator(model, plan_split(model, 1, 1, emulator_layers=2))
    assert not torch.allclose(logits(emulator), logits(plain), atol=1e-3)

    emulator.save_pretrained(tmp_path / "emulator")
    loaded, _ = load_model(str(tmp_path / "emulator"), with_tokenizer=False)
    assert len(find_blocks(loaded)[1]) == len(plan.kept_layers)  # k middle blocks stored, not the full depth
    assert torch.allclose(logits(loaded), logits(reference), atol=1e-5)

    config = json.loads((tmp_path / "emulator" / "config.json").read_text())
    for damaged in ([2, 2], [1] * (len(repeats) - 1) + [10_000], "3,3"):
        (tmp_path / "emulator" / "config.json").write_text(json.dumps({**config, REPEATS_KEY: damaged}))
        with pytest.raises(UserError, match="a damaged emulator config"):
            load_model(str(tmp_path / "emulator"), with_tokenizer=False)
    with pytest.raises(UserError, match="'shared' must be true or false"):
        SplitPlan.from_json({**plan.to_json(), "shared": "yes"})
