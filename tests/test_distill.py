"""Emulator distillation: it lowers the KD loss, keeps the best emulator, is cached, and feeds the app."""
from __future__ import annotations

import json

import pytest
import torch

import fl_offsite.emulator.distill as distill_module
from fl_offsite.cli.main import main
from fl_offsite.config.sections import DistillSettings
from fl_offsite.data.models import load_model
from fl_offsite.emulator.distill import held_out_texts, middle_positions, normalized_mse
from fl_offsite.emulator.recipe import public_texts
from fl_offsite.learn.evaluate import perplexity
from fl_offsite.surgery.split import SPLIT_FILE, build_emulator, read_plan

pytestmark = pytest.mark.usefixtures("private_cache")

ARGS = ["--adapter-layers", "1,1", "--emulator-layers", "2", "--steps", "24", "--eval-every", "8",
        "--batch-size", "4", "--block-size", "64", "--corpus", "model-samples", "--lr", "3e-3"]


@pytest.fixture(scope="module")
def distilled(tiny_lm_dir, tmp_path_factory):
    """One distillation of the tiny model through the CLI, with a cache of its own."""
    cache = tmp_path_factory.mktemp("cache")
    out = tmp_path_factory.mktemp("distilled") / "split"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FL_OFFSITE_CACHE", str(cache))
        assert main(["distill", str(tiny_lm_dir), *ARGS, "--out", str(out)]) == 0
    return out, cache


def test_distillation_lowers_the_kd_loss_and_trains_only_the_middle(distilled, tiny_lm_dir):
    out, _ = distilled
    record = json.loads((out / SPLIT_FILE).read_text())["distillation"]
    kd = [step["kd_loss"] for step in record["losses"]]
    assert len(kd) == 24
    assert sum(kd[-4:]) / 4 < 0.7 * kd[0]
    assert [p["step"] for p in record["perplexity"]] == [0, 8, 16, 24]
    assert record["emulator_ppl_after"] < record["emulator_ppl_before"]

    full, _ = load_model(str(tiny_lm_dir))
    plan = read_plan(out)
    before = build_emulator(full, plan).state_dict()
    after, tokenizer = load_model(str(out / "emulator"))
    middle = {f"{plan.block_prefix}.{pos}." for pos in middle_positions(after, plan)}
    for name, tensor in after.state_dict().items():
        changed = not torch.equal(tensor, before[name])
        assert changed == any(name.startswith(m) for m in middle), name

    # The saved emulator is the best one seen, with the recorded held-out perplexity.
    held_out = held_out_texts(public_texts("model-samples", "validation", full, tokenizer, "bbc-news", 1234, count=16,
                                           length=256), DistillSettings())
    ppl = perplexity(after, tokenizer, held_out, block_size=256, progress=False)["ppl"]
    assert ppl == pytest.approx(record["emulator_ppl_after"], rel=1e-4)
    assert ppl == pytest.approx(min(p["ppl"] for p in record["perplexity"]), rel=1e-4)


def test_second_call_is_a_cache_hit(distilled, tiny_lm_dir, tmp_path, monkeypatch, capsys):
    out, cache = distilled
    monkeypatch.setenv("FL_OFFSITE_CACHE", str(cache))
    monkeypatch.setattr(distill_module, "distill", lambda *a, **k: pytest.fail("distilled again"))
    again = tmp_path / "again"
    assert main(["distill", str(tiny_lm_dir), *ARGS, "--out", str(again)]) == 0
    assert "cached in" in capsys.readouterr().out
    assert json.loads((again / SPLIT_FILE).read_text()) == json.loads((out / SPLIT_FILE).read_text())


def test_other_settings_are_not_served_from_the_cache(distilled, tiny_lm_dir, tmp_path, monkeypatch):
    _, cache = distilled
    monkeypatch.setenv("FL_OFFSITE_CACHE", str(cache))
    calls = []
    monkeypatch.setattr(distill_module, "distill", lambda *a, **k: calls.append(a[4]) or {"steps": 0})
    monkeypatch.setattr(distill_module, "ppl_summary", lambda record: "")
    monkeypatch.setattr("fl_offsite.emulator.recipe.ppl_summary", lambda record: "")
    main(["distill", str(tiny_lm_dir), *ARGS[:-2], "--lr", "1e-3", "--out", str(tmp_path / "other")])
    assert len(calls) == 1 and calls[0].lr == 1e-3


def test_normalized_mse_ignores_padding_and_scales_by_the_teacher():
    teacher = torch.tensor([[[3.0, 4.0], [1.0, 1.0]]])
    student = torch.tensor([[[0.0, 0.0], [100.0, 100.0]]])
    mask = torch.tensor([[1.0, 0.0]])
    rms = (12.5) ** 0.5
    assert normalized_mse(teacher, student, mask).item() == pytest.approx((9 + 16) / 2 / rms**2)


def test_a_split_without_middle_blocks_is_refused(tiny_lm_dir, tmp_path, capsys):
    assert main(["distill", str(tiny_lm_dir), "--adapter-layers", "1,1", "--emulator-layers", "0", "--steps", "2",
                 "--out", str(tmp_path / "x")]) == 2
    assert "nothing to distill" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_the_cache_key_changes_with_the_weights_not_only_the_name():
    from fl_offsite.surgery.split import plan_split
    from fl_offsite.testing.models import tiny_model

    model = tiny_model("llama")
    plan = plan_split(model, 1, 1, emulator_layers=2)
    key = distill_module.cache_key("same-name", model, plan, DistillSettings(steps=2), ["text"])
    assert distill_module.cache_key("same-name", model, plan, DistillSettings(steps=2), ["text"]) == key
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    assert distill_module.cache_key("same-name", model, plan, DistillSettings(steps=2), ["text"]) != key


def test_a_shared_emulator_distils_each_kept_block_to_the_last_slot_it_fills(tiny_lm_dir, tmp_path, capsys):
    """``--sharing``: the kept blocks run at the full depth while they learn, and the folder keeps it."""
    out = tmp_path / "shared"
    assert main(["distill", str(tiny_lm_dir), *ARGS, "--sharing", "--out", str(out)]) == 0
    assert "each run [1, 1, 3, 1] times (shared)" in capsys.readouterr().out
    plan = read_plan(out)
    assert plan.shared and plan.last_slot(plan.kept_layers[2]) == 4 == plan.kept_layers[2]
    record = json.loads((out / SPLIT_FILE).read_text())["distillation"]
    kd = [step["kd_loss"] for step in record["losses"]]
    assert sum(kd[-4:]) / 4 < 0.7 * kd[0] and record["emulator_ppl_after"] < record["emulator_ppl_before"]
    emulator, _ = load_model(str(out / "emulator"), with_tokenizer=False)
    assert emulator.config.fl_offsite_block_repeats == [1, 1, 3, 1] and not emulator.config.use_cache
