"""`fl-offsite split` and `fl-offsite plug-in` on tiny models, and on the real offline model (slow)."""
from __future__ import annotations

import json

import pytest
import torch

from fl_offsite.cli import main
from fl_offsite.models import load_model
from fl_offsite.split import ADAPTER_FILE, load_adapter, read_plan, save_adapter
from tiny_models import save_tiny_model


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
    from fl_offsite.evaluate import perplexity
    from fl_offsite.corpora import load_text_corpus

    out = tmp_path / "split"
    assert main(["split", "smollm2-135m", "--adapter-layers", "2,2", "--emulator-layers", "8", "--out", str(out)]) == 0
    assert read_plan(out).kept_layers == (0, 1, 2, 6, 9, 13, 16, 20, 23, 27, 28, 29)
    emulator, tokenizer = load_model(str(out / "emulator"))
    full, _ = load_model("smollm2-135m")
    assert emulator.config.num_hidden_layers == 12 and tokenizer is not None
    texts = load_text_corpus("bbc-news", split="test")[:8]
    full_ppl = perplexity(full, tokenizer, texts, block_size=128)["ppl"]
    emulator_ppl = perplexity(emulator, tokenizer, texts, block_size=128)["ppl"]
    assert full_ppl < 100 < emulator_ppl


def test_eval_command_writes_json(tmp_path, tiny_tokenizer, capsys):
    from tiny_models import save_tiny_lm

    folder = save_tiny_lm(tmp_path / "tiny", tiny_tokenizer)
    out = tmp_path / "split"
    assert main(["split", str(folder), "--adapter-layers", "1,1", "--emulator-layers", "2", "--out", str(out)]) == 0
    for model, extra in ((str(folder), []), (str(out / "emulator"), ["--adapter", str(out / ADAPTER_FILE)])):
        assert main(["eval", model, "--task", "bbc-news", "--limit", "4", "--json", str(tmp_path / "r.json"), *extra]) == 0
        result = json.loads((tmp_path / "r.json").read_text())
        assert result["task"] == "bbc-news" and result["n"] == 4
        assert 0.0 <= result["acc"] <= 1.0 and 0.0 <= result["acc_norm"] <= 1.0
    assert "acc_norm" in capsys.readouterr().out
    assert main(["eval", str(folder), "--task", "nope"]) == 2
    assert "unknown task" in capsys.readouterr().err
