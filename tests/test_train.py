"""Local training: the answer-only loss, and only the trainable tensors move."""
from __future__ import annotations

import pytest
import torch

from fl_offsite.config.sections import TrainSettings
from fl_offsite.data.encode import collate, encode_choice_example
from fl_offsite.data.tasks import ChoiceExample
from fl_offsite.learn.train import answer_loss, train_local
from fl_offsite.surgery.payload import extract_adapter
from fl_offsite.surgery.split import adapter_names, plan_split

EXAMPLES = [ChoiceExample("Article: The striker scored twice.\nTopic:", [" sport", " tech"], 0),
            ChoiceExample("Article: The phone maker showed a faster chip and new software.\nTopic:",
                          [" sport", " tech"], 1)]


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_gpt2", "tiny_opt"])
def test_answer_loss_equals_the_models_own_loss(name, request, tiny_tokenizer):
    model = request.getfixturevalue(name)
    batch = collate([encode_choice_example(tiny_tokenizer, ex, 64) for ex in EXAMPLES], tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        assert torch.allclose(answer_loss(model, batch), model(**batch).loss, atol=1e-5)


def test_train_local_moves_only_the_adapter(tiny_tokenizer):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)
    model = AutoModelForCausalLM.from_config(config)
    plan = plan_split(model, 1, 1, emulator_layers=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    features = [encode_choice_example(tiny_tokenizer, ex, 64) for ex in EXAMPLES]
    stats = train_local(model, set(adapter_names(model, plan).values()), features,
                        TrainSettings(lr=1e-2, batch_size=2, local_steps=3), tiny_tokenizer.pad_token_id)
    assert stats.steps == 3 and stats.examples == 6 and stats.trainable_params > 0
    adapter = extract_adapter(model, plan)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]) != (key in adapter), key


def test_half_weights_score_in_bf16_and_give_the_exact_weights_back(tiny_llama, tiny_tokenizer):
    from fl_offsite.learn.train import half_weights, precision_autocast

    batch = collate([encode_choice_example(tiny_tokenizer, ex, 64) for ex in EXAMPLES], tiny_tokenizer.pad_token_id)
    before = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    with torch.no_grad(), precision_autocast(torch.device("cpu"), "bf16"):
        autocast_loss = answer_loss(tiny_llama, batch)
        with half_weights(tiny_llama, "bf16"):
            assert {p.dtype for p in tiny_llama.parameters()} == {torch.bfloat16}
            half_loss = answer_loss(tiny_llama, batch)
    assert torch.allclose(half_loss, autocast_loss, rtol=0.02)
    after = tiny_llama.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())
    with half_weights(tiny_llama, "fp32"):
        assert {p.dtype for p in tiny_llama.parameters()} == {torch.float32}


def test_bf16_on_an_x86_cpu_without_bf16_instructions_warns_once(monkeypatch, caplog):
    from fl_offsite.learn import train

    monkeypatch.setattr(train.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    train.warn_slow_cpu_bf16.cache_clear()
    with caplog.at_level("WARNING", logger="fl_offsite.learn.train"):
        for _ in range(2):
            with train.precision_autocast(torch.device("cpu"), "bf16"):
                pass
        with train.precision_autocast(torch.device("cpu"), "fp32"):
            pass
    assert [r.message.startswith("bf16 on this CPU") for r in caplog.records] == [True]
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert train.native_cpu_bf16()
    train.warn_slow_cpu_bf16.cache_clear()
