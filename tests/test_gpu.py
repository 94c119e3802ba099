"""The GPU code paths on tiny models give what the CPU gives: training (fp32; bf16 autocast with
half-precision frozen weights; LoRA), evaluation, distillation, split / plug-in, the benchmark.

Each test runs on the CUDA device and compares with the same call on the CPU. Without a CUDA
device the tests are skipped; ``FL_OFFSITE_TEST_DEVICE=cuda`` (set by benchmarks/gpu_check.sh)
makes a missing GPU a failure instead, so a GPU check cannot pass by skipping.
"""
from __future__ import annotations

import copy
import dataclasses
import inspect
import json

import pytest
import torch

import fl_offsite.emulator.distill as distill_module
from fl_offsite.config.sections import DistillSettings, LoraSpec, TrainSettings
from fl_offsite.data.encode import collate
from fl_offsite.emulator.distill import distill, middle_positions
from fl_offsite.learn.evaluate import choice_logliks, perplexity, score_choices
from fl_offsite.learn.train import answer_loss, half_frozen, train_local
from fl_offsite.surgery.lora import add_lora, lora_blocks, lora_names
from fl_offsite.surgery.payload import extract_adapter, get_payload, plug_in, set_payload
from fl_offsite.surgery.split import adapter_names, build_emulator, plan_split
from fl_offsite.testing.models import CHOICE_EXAMPLES, CORPUS, VOCAB, tiny_model


def rows(n: int = 6, seq: int = 24, answer: int = 3, seed: int = 0) -> list[dict[str, list[int]]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, VOCAB, (seq,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * (seq - answer) + ids[-answer:]})
    return out


def split_pair(family: str, device: torch.device):
    """The full tiny model of ``family`` on the CPU, its 2-3-1 plan, and one emulator on the CPU and one on ``device``."""
    full = tiny_model(family)
    plan = plan_split(full, 2, 1, emulator_layers=3)
    emulator = build_emulator(full, plan)
    return full, plan, emulator, copy.deepcopy(emulator).to(device)


def states_close(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        torch.testing.assert_close(a[key].cpu(), b[key].cpu(), atol=atol, rtol=0, msg=key)


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_fp32_training_on_the_gpu_matches_the_cpu(family, cuda_device):
    _, plan, cpu, gpu = split_pair(family, cuda_device)
    trainable = set(adapter_names(cpu, plan).values())
    before = {k: v.clone() for k, v in gpu.state_dict().items()}
    batch = collate(rows()[:2], 0)
    with torch.no_grad():
        want = answer_loss(cpu, batch)
        got = answer_loss(gpu, {k: v.to(cuda_device) for k, v in batch.items()})
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-5)

    settings = TrainSettings(lr=1e-3, batch_size=2, local_steps=3)
    stats_cpu = train_local(cpu, trainable, rows(), settings, pad_id=0)
    stats_gpu = train_local(gpu, trainable, rows(), settings, pad_id=0)
    assert stats_gpu.loss == pytest.approx(stats_cpu.loss, rel=1e-2)  # Adam amplifies rounding after step 1
    assert stats_gpu.tokens == stats_cpu.tokens
    assert all(p.device.type == "cuda" for p in gpu.parameters())
    # The allocator's peak: at least the model itself, far below a process's RSS.
    weights_mb = sum(p.numel() * p.element_size() for p in gpu.parameters()) / 2**20
    assert weights_mb <= stats_gpu.peak_memory_mb < 256
    for key, value in gpu.state_dict().items():
        assert torch.equal(value, before[key]) != (key in trainable), key
    # Adam normalises each update to about lr: a gradient that differs in rounding moves a weight by
    # at most ~2 lr per step, so the adapters agree to 2 lr x steps whatever the kernels.
    states_close(extract_adapter(gpu, plan), extract_adapter(cpu, plan), atol=2 * 1e-3 * 3)


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
@pytest.mark.parametrize("lora", [False, True], ids=["adapter", "lora"])
def test_bf16_training_with_half_precision_frozen_weights_on_the_gpu(family, lora, cuda_device):
    _, plan, cpu, gpu = split_pair(family, cuda_device)
    if lora:
        spec = LoraSpec(r=2, alpha=4, dropout=0.0)
        cpu = add_lora(cpu, spec, lora_blocks(cpu, plan))
        gpu = add_lora(gpu, spec, lora_blocks(gpu, plan))
        trainable = set(lora_names(gpu, plan).values())
    else:
        trainable = set(adapter_names(gpu, plan).values())
    saved = half_frozen(gpu, trainable)
    assert saved > 0
    params = dict(gpu.named_parameters())
    assert {params[n].dtype for n in trainable} == {torch.float32}  # what travels stays fp32
    assert {p.dtype for n, p in params.items() if n not in trainable} == {torch.bfloat16}
    frozen_before = {n: p.detach().clone() for n, p in params.items() if n not in trainable}

    settings = TrainSettings(lr=1e-3, batch_size=2, local_steps=3)
    fp32 = train_local(cpu, trainable, rows(), settings, pad_id=0)
    bf16 = train_local(gpu, trainable, rows(), TrainSettings(**{**settings.__dict__, "precision": "bf16"}), pad_id=0)
    assert bf16.loss == pytest.approx(fp32.loss, rel=0.05)  # bf16 rounding only
    for name, param in gpu.named_parameters():
        if name in trainable:
            assert param.dtype == torch.float32
        else:
            assert torch.equal(param, frozen_before[name]), name
    names = lora_names(gpu, plan) if lora else adapter_names(gpu, plan)
    payload = get_payload(gpu, names)
    assert all(t.device.type == "cpu" and t.dtype == torch.float32 for t in payload.values())
    assert any(not torch.equal(payload[k], get_payload(cpu, names)[k]) for k in payload)  # it trained
    set_payload(cpu, payload, names)  # a GPU client's payload loads into a CPU model by name
    states_close(get_payload(cpu, names), payload, atol=0)


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_gpt2", "tiny_opt"])
def test_evaluation_on_the_gpu_matches_the_cpu(arch, tiny_tokenizer, cuda_device, request):
    cpu = request.getfixturevalue(arch)
    gpu = copy.deepcopy(cpu).to(cuda_device)
    for batch_size in (1, 3):
        got = choice_logliks(gpu, tiny_tokenizer, CHOICE_EXAMPLES, batch_size=batch_size, progress=False)
        want = choice_logliks(cpu, tiny_tokenizer, CHOICE_EXAMPLES, batch_size=batch_size, progress=False)
        for got_row, want_row in zip(got, want):
            assert got_row == pytest.approx(want_row, abs=1e-4)
    metrics = score_choices(gpu, tiny_tokenizer, CHOICE_EXAMPLES, progress=False)
    assert metrics["acc"] == score_choices(cpu, tiny_tokenizer, CHOICE_EXAMPLES, progress=False)["acc"]
    texts = CORPUS[:4]
    got = perplexity(gpu, tiny_tokenizer, texts, block_size=16, batch_size=3, progress=False)
    want = perplexity(cpu, tiny_tokenizer, texts, block_size=16, batch_size=3, progress=False)
    assert got["tokens"] == want["tokens"]
    assert got["nll"] == pytest.approx(want["nll"], rel=1e-5)


def test_split_and_plug_in_on_the_gpu(cuda_device):
    full = tiny_model("llama").to(cuda_device)
    plan = plan_split(full, 2, 1, emulator_layers=3)
    emulator = build_emulator(full, plan)
    assert {p.device.type for p in emulator.parameters()} == {"cuda"}  # built where the model is
    reference = build_emulator(tiny_model("llama"), plan)
    states_close(emulator.state_dict(), reference.state_dict(), atol=0)

    trainable = set(adapter_names(emulator, plan).values())
    train_local(emulator, trainable, rows(), TrainSettings(lr=1e-2, batch_size=2, local_steps=2), pad_id=0)
    adapter = extract_adapter(emulator, plan)
    assert all(t.device.type == "cpu" for t in adapter.values())
    plug_in(full, adapter, plan)  # CPU tensors into the GPU model, by name
    states_close(extract_adapter(full, plan), adapter, atol=0)
    cpu_full = plug_in(tiny_model("llama"), adapter, plan)
    ids = torch.tensor([rows(1)[0]["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(full(input_ids=ids.to(cuda_device)).logits.cpu(), cpu_full(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_distillation_on_the_gpu(precision, tiny_lm_dir, cuda_device, monkeypatch):
    """distill() on the GPU (bf16: under CUDA's autocast): the KD loss falls, only the middle trains,
    everything stays on the GPU."""
    from fl_offsite.data.models import load_model

    train_texts, held_out = CORPUS * 6, CORPUS[:3]
    settings = dataclasses.replace(DistillSettings(), steps=16, batch_size=4, block_size=16, lr=3e-3, eval_every=8,
                                   warmup_steps=0)
    if "precision" in {f.name for f in dataclasses.fields(settings)}:
        settings = dataclasses.replace(settings, precision=precision)
    texts = {}
    if "train_texts" in inspect.signature(distill).parameters:
        texts = {"train_texts": train_texts, "held_out": held_out}
    else:  # distill loads its corpus itself
        corpus = {"train": train_texts, "validation": held_out}
        monkeypatch.setattr(distill_module, "load_text_corpus", lambda name, split="train", seed=0: corpus[split])
    full, tokenizer = load_model(str(tiny_lm_dir))
    full.to(cuda_device)
    plan = plan_split(full, 1, 1, emulator_layers=2)
    emulator = build_emulator(full, plan).to(cuda_device)
    before = {k: v.detach().clone() for k, v in emulator.state_dict().items()}
    record = distill(full, emulator, plan, tokenizer, settings, **texts, progress=False)
    kd = [step["kd_loss"] for step in record["losses"]]
    assert len(kd) == 16 and all(torch.isfinite(torch.tensor(kd)))
    assert sum(kd[-4:]) / 4 < 0.8 * kd[0]
    assert record["emulator_ppl_after"] <= record["emulator_ppl_before"]
    middle = tuple(f"{plan.block_prefix}.{pos}." for pos in middle_positions(emulator, plan))
    for name, tensor in emulator.state_dict().items():
        assert tensor.device.type == "cuda", name
        if not name.startswith(middle):
            assert torch.equal(tensor, before[name]), name


def test_client_cost_benchmark_on_the_gpu(tmp_path, cuda_device):
    from benchmarks import client_cost

    out = tmp_path / "cc.json"
    assert client_cost.main(["--model", "tiny", "--protocol", "paper", "--device", "cuda", "--seq", "32",
                             "--rounds", "1", "--steps", "2", "--profile", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["gpu"] and result["precision"] == "bf16"
    for method, m in result["methods"].items():
        assert m["peak"] > m["tensor_memory"]["weights_mb"] * 0.5, method  # the allocator's peak, in MB
        assert m["tokens_per_s"] and result["profiles"][method]["device_ms_per_step"] > 0
        assert "matmul" in result["profiles"][method]["breakdown_ms_per_step"]


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_token_cross_entropy_equals_the_transposed_form(reduction):
    """The loss on (tokens, vocab) rows (fast on CUDA) is the (batch, vocab, positions) form's (slow there)."""
    from fl_offsite.learn.train import token_cross_entropy

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 50, generator=g)
    labels = torch.randint(0, 50, (3, 7), generator=g)
    labels[0, :4] = -100
    want = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction=reduction)
    torch.testing.assert_close(token_cross_entropy(logits, labels, reduction=reduction), want)
