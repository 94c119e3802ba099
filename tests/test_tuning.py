"""PEFT on the adapter: LoRA, BitFit and bottleneck adapters travel alone and plug in exactly."""
from __future__ import annotations

import pytest
import torch

from fl_offsite.app.owner import ModelOwner, final_weights
from fl_offsite.cli.main import main
from fl_offsite.config.sections import LoraSpec, Tuning
from fl_offsite.config.settings import Settings
from fl_offsite.errors import UserError
from fl_offsite.run.folder import RunFolder
from fl_offsite.surgery.payload import get_payload, plug_in, set_payload
from fl_offsite.surgery.split import build_emulator, plan_split, save_adapter
from fl_offsite.surgery.tuning import apply_tuning, prepare_for_adapter, tuned_names
from fl_offsite.testing.models import save_tiny_model, tiny_model

TUNINGS = {
    "lora": Tuning("lora", LoraSpec(r=2, alpha=4, dropout=0.0)),
    "bitfit": Tuning("bitfit"),
    "bottleneck": Tuning("bottleneck", bottleneck_size=4),
}


def _tuned(kind: str):
    """A tiny GPT-2 (it has biases), its 2-3-1 plan, and the tuned full model and emulator."""
    full = tiny_model("gpt2")
    plan = plan_split(full, 2, 1, emulator_layers=3)
    emulator = build_emulator(full, plan)
    tuning = TUNINGS[kind]
    return plan, tuning, apply_tuning(tuning, full, plan, seed=1), apply_tuning(tuning, emulator, plan, seed=1)


@pytest.mark.parametrize("kind", TUNINGS)
def test_payload_is_only_the_trainable_tensors_of_the_adapter_blocks(kind):
    plan, tuning, full, emulator = _tuned(kind)
    names = tuned_names(tuning, full, plan)
    assert names and tuned_names(tuning, emulator, plan).keys() == names.keys()  # the same travelling names
    assert {int(n.split(".")[2]) for n in names} == set(plan.adapter_layers)  # full-model block indices
    marker = {"lora": ".lora_", "bitfit": ".bias", "bottleneck": ".bottleneck."}[kind]
    assert all(marker in name for name in names)
    others = dict(full.named_parameters())
    assert sum(others[local].numel() for local in names.values()) < 0.2 * sum(p.numel() for p in others.values())
    # Both copies start equal: the owner's initial payload fits every client's emulator.
    set_payload(emulator, get_payload(full, names), tuned_names(tuning, emulator, plan))


@pytest.mark.parametrize("kind", TUNINGS)
def test_merged_adapter_plugged_into_the_full_model_equals_the_tuned_model(kind, tmp_path):
    plan, tuning, full, _ = _tuned(kind)
    names = tuned_names(tuning, full, plan)
    torch.manual_seed(0)
    trained = {name: t + 0.1 * torch.randn_like(t) for name, t in get_payload(full, names).items()}
    set_payload(full, trained, names)
    ids = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        expected = full(input_ids=ids).logits

    owner = ModelOwner(Settings.from_config({}), full, None, plan, None, tmp_path, None, tuning, RunFolder(tmp_path))
    file_name, adapter = final_weights(owner, trained)
    assert file_name == "adapter.safetensors"
    save_adapter(tmp_path / file_name, adapter, plan)
    fresh = tiny_model("gpt2")
    plug_in(prepare_for_adapter(fresh, adapter, plan), adapter, plan)
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind, named", [("lora", "LoRA payload"), ("bitfit", "BitFit payload"),
                                         ("bottleneck", "bottleneck payload")])
def test_a_refused_payload_is_named_by_its_kind(kind, named):
    plan, tuning, full, emulator = _tuned(kind)
    payload = get_payload(full, tuned_names(tuning, full, plan))
    first = sorted(payload)[0]
    del payload[first]
    with pytest.raises(UserError, match=rf"^{named} lacks 1 tensor\(s\), first {first!r}"):
        set_payload(emulator, payload, tuned_names(tuning, emulator, plan), tuning.payload_kind(plan))
    assert Tuning().payload_kind(None) == "full-model payload" and Tuning().payload_kind(plan) == "adapter"


def test_a_reply_lists_its_tensors_in_the_order_of_the_request():
    plan, tuning, full, emulator = _tuned("lora")
    request = dict(reversed(get_payload(full, tuned_names(tuning, full, plan)).items()))
    set_payload(emulator, request, tuned_names(tuning, emulator, plan))
    assert list(get_payload(emulator, tuned_names(tuning, emulator, plan), order=request)) == list(request)


def test_bottleneck_adapters_start_as_the_identity():
    full = tiny_model("gpt2")
    ids = torch.randint(0, 96, (1, 8))
    with torch.no_grad():
        before = full(input_ids=ids).logits
        apply_tuning(Tuning("bottleneck", bottleneck_size=4), full, plan_split(full, 1, 1, emulator_layers=2))
        torch.testing.assert_close(full(input_ids=ids).logits, before)


def test_bitfit_needs_biases():
    llama = tiny_model("llama")
    with pytest.raises(UserError, match="no bias terms for BitFit"):
        apply_tuning(Tuning("bitfit"), llama, plan_split(llama, 1, 1, emulator_layers=2))


def test_plug_in_command_refuses_bottleneck_adapters(tmp_path, capsys):
    plan, tuning, full, _ = _tuned("bottleneck")
    owner = ModelOwner(Settings.from_config({}), full, None, plan, None, tmp_path, None, tuning, RunFolder(tmp_path))
    _, adapter = final_weights(owner, get_payload(full, tuned_names(tuning, full, plan)))
    save_adapter(tmp_path / "adapter.safetensors", adapter, plan)
    folder = save_tiny_model("gpt2", tmp_path / "gpt2")
    assert main(["plug-in", str(folder), str(tmp_path / "adapter.safetensors"), "--out", str(tmp_path / "o")]) == 2
    assert "bottleneck adapters" in capsys.readouterr().err and not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def tiny_gpt2_dir(tmp_path_factory, tiny_tokenizer):
    from fl_offsite.testing.models import save_tiny_lm

    return save_tiny_lm(tmp_path_factory.mktemp("gpt2") / "tiny", tiny_tokenizer, family="gpt2")


@pytest.mark.usefixtures("private_cache")
@pytest.mark.parametrize("method", ["offsite-bitfit", "offsite-bottleneck"])
def test_federated_run_trains_and_sends_only_the_peft_tensors(tiny_gpt2_dir, tmp_path, method):
    from fl_offsite.surgery.split import load_adapter
    from fl_offsite.testing.flower import of_type, rounds_of, run, tiny_config

    config = tiny_config(tiny_gpt2_dir, tmp_path / method, method=method, **{"num-rounds": 1, "train.lr": 1e-2})
    grid = run(config, num_nodes=2)
    marker = ".bias" if method == "offsite-bitfit" else ".bottleneck."
    sent = [set(msg.content["arrays"].keys()) for msg in of_type(grid, "train")]
    assert sent[0] and all(keys == sent[0] for keys in sent) and all(marker in k for k in sent[0])
    assert {int(k.split(".")[2]) for k in sent[0]} == {0, 5}
    rounds = rounds_of(tmp_path / method)
    assert rounds[-1]["problems"] == [] and rounds[-1]["eval"]["plugin"]["n"] == 6
    adapter, _ = load_adapter(tmp_path / method / "adapter.safetensors")
    assert sent[0] <= adapter.keys()  # the kept adapter holds the trained tensors
    initial, _ = load_adapter(tmp_path / method / "split" / "adapter.safetensors")
    changed = {k for k in initial if not torch.equal(initial[k], adapter[k])}
    assert changed <= sent[0]  # nothing but the trained tensors moved
    if method == "offsite-bitfit":
        assert changed
    else:  # the adapters started as the identity (up-projection zero) and training moved them
        assert all(adapter[k].abs().sum() > 0 for k in sent[0] if k.endswith("up.weight"))


@pytest.mark.usefixtures("private_cache")
def test_lora_factors_are_averaged_separately_weighted_by_examples(tiny_lm_dir, tmp_path):
    """FedAvg-LoRA's rule: A and B each averaged (weighted by examples), not their product."""
    from fl_offsite.app.client_app import app as client_app
    from fl_offsite.app.server_app import run_federated
    from fl_offsite.testing.flower import InProcessGrid, tiny_config
    from fl_offsite.weights import load_tensors

    config = tiny_config(tiny_lm_dir, tmp_path / "lora", method="fedavg-lora", **{"num-rounds": 1})
    replies = []

    def capture(msg, node_index):
        if msg.metadata.message_type != "train":
            return None
        reply = client_app(msg, grid.contexts[grid.node_ids[node_index]])
        replies.append((reply.content["metrics"]["num-examples"], reply.content["arrays"].to_torch_state_dict()))
        return reply

    grid = InProcessGrid(client_app, 2, config, fault=capture)
    run_federated(grid, config)
    total = sum(n for n, _ in replies)
    final = load_tensors(tmp_path / "lora" / "lora.safetensors")
    assert final.keys() == replies[0][1].keys()
    for name, tensor in final.items():
        expected = sum(n * arrays[name] for n, arrays in replies) / total
        torch.testing.assert_close(tensor, expected, rtol=1e-5, atol=1e-7)
    assert any(".lora_A." in n for n in final) and any(".lora_B." in n for n in final)
