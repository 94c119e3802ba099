"""lm-evaluation-harness parity: an exported task scores the same with lm-eval as with our scorer."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from fl_offsite.cli.main import main
from fl_offsite.data.models import load_model
from fl_offsite.data.tasks import load_task
from fl_offsite.learn.evaluate import choice_logliks, score_choices
from fl_offsite.surgery.split import ADAPTER_FILE, load_adapter, save_adapter

LIMIT = 12


def test_export_writes_an_lm_eval_task_folder(tmp_path, capsys):
    assert main(["export-task", "bbc-news", "--limit", "3", "--out", str(tmp_path / "tasks")]) == 0
    assert "--tasks fl_offsite_bbc_news_test --include_path" in capsys.readouterr().out
    rows = [json.loads(line) for line in (tmp_path / "tasks" / "fl_offsite_bbc_news_test.jsonl").open()]
    examples = load_task("bbc-news").test[:3]
    assert [r["context"] for r in rows] == [ex.context for ex in examples]
    assert [[" " + c for c in r["choices"]] for r in rows] == [ex.choices for ex in examples]
    config = (tmp_path / "tasks" / "fl_offsite_bbc_news_test.yaml").read_text()
    assert 'target_delimiter: " "' in config and "output_type: multiple_choice" in config
    assert main(["export-task", "bbc-news", "--limit", "0", "--out", str(tmp_path / "x")]) == 2


@pytest.mark.slow(seconds=8)
def test_lm_eval_gives_our_numbers_on_a_tiny_model_and_a_plugged_in_folder(tiny_lm_dir, tmp_path):
    pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install -e '.[test]' installs it)")
    # Room for whole contexts (RoPE: the same weights): past the model's length, lm-eval cuts each
    # (context, choice) row on its own, we cut a context once for its longest choice.
    config = json.loads((tiny_lm_dir / "config.json").read_text())
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_lm_dir, model_dir)
    (model_dir / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 4096}))
    assert main(["export-task", "bbc-news", "--limit", str(LIMIT), "--out", str(tmp_path / "tasks")]) == 0
    split = tmp_path / "split"
    assert main(["split", str(model_dir), "--adapter-layers", "1,1", "--emulator-layers", "2",
                 "--out", str(split)]) == 0
    adapter, plan = load_adapter(split / ADAPTER_FILE)
    torch.manual_seed(0)
    save_adapter(tmp_path / "tuned.safetensors", {k: v + 0.05 * torch.randn_like(v) for k, v in adapter.items()}, plan)
    assert main(["plug-in", str(model_dir), str(tmp_path / "tuned.safetensors"), "--out",
                 str(tmp_path / "plugged")]) == 0

    examples = load_task("bbc-news").test[:LIMIT]
    for folder in (model_dir, tmp_path / "plugged"):
        model, tokenizer = load_model(str(folder))
        ours = score_choices(model, tokenizer, examples, batch_size=4, progress=False)
        our_logliks = choice_logliks(model, tokenizer, examples, batch_size=4, progress=False)
        theirs, their_logliks = lm_eval_scores(folder, tmp_path / "tasks", "fl_offsite_bbc_news_test")
        print(f"{folder.name}: acc ours {ours['acc']:.4f} lm-eval {theirs['acc,none']:.4f}; "
              f"acc_norm ours {ours['acc_norm']:.4f} lm-eval {theirs['acc_norm,none']:.4f}; max |loglik diff| "
              f"{max(abs(a - b) for x, y in zip(our_logliks, their_logliks) for a, b in zip(x, y)):.2e}")
        assert ours["acc"] == pytest.approx(theirs["acc,none"]) and ours["acc_norm"] == pytest.approx(
            theirs["acc_norm,none"])
        assert ours["acc_stderr"] == pytest.approx(theirs["acc_stderr,none"])
        for mine, reference in zip(our_logliks, their_logliks, strict=True):
            assert mine == pytest.approx(reference, abs=1e-4)


def lm_eval_scores(model_dir, task_dir, name: str) -> tuple[dict, list[list[float]]]:
    """lm-eval's metrics and per-choice log-likelihoods of ``name`` for the model folder ``model_dir``."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=str(model_dir), batch_size=4, device="cpu", dtype="float32")
    # Only the exported folder: indexing lm-eval's own thousands of task files takes 10 s per call.
    tasks = TaskManager(include_path=str(task_dir), include_defaults=False)
    out = simple_evaluate(model=lm, tasks=[name], task_manager=tasks, log_samples=True)
    samples = sorted(out["samples"][name], key=lambda s: s["doc_id"])
    return out["results"][name], [[float(resp[0]) for resp in s["filtered_resps"]] for s in samples]
