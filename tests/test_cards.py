"""Model cards and PEFT folders that the Hugging Face Hub links to its base model: read back with
huggingface_hub's own parser."""
from __future__ import annotations

import copy
import json

from huggingface_hub import ModelCard

from fl_offsite.data.models import OFFLINE_MODELS
from fl_offsite.run.card import model_card

HUB_ID = OFFLINE_MODELS["smollm2-135m"].hub_id
SCORES = {"n": 496, "acc": 0.9, "acc_stderr": 0.01, "acc_norm": 0.88}


def _run(method: str, task: str, metrics: dict) -> dict:
    return {"method": method, "task": task, "round": 2, "num_rounds": 2, "clients": 4, "strategy": "fedavg",
            "seed": 1, "metrics": metrics}


def test_the_card_of_an_offline_alias_names_its_hub_model_license_data_set_and_final_scores():
    card = ModelCard(model_card("smollm2-135m", None, _run("fedavg-full", "piqa", {"full": SCORES}), "use it"))
    data = card.data
    assert (data.base_model, data.license, data.pipeline_tag, data.library_name) == (
        HUB_ID, "apache-2.0", "text-generation", "transformers")
    assert data.datasets == ["ybisk/piqa"] and "fl-offsite" in data.tags and "flower" in data.tags
    assert [(r.metric_type, r.metric_value, r.dataset_type) for r in data.eval_results] == [
        ("accuracy", 0.9, "ybisk/piqa"), ("accuracy", 0.88, "ybisk/piqa")]
    assert "496 examples" in data.eval_results[0].dataset_name
    assert "Q4_1.gguf" in card.text and "dequantized" in card.text  # what the base weights really are


def test_a_local_model_and_the_users_own_task_give_no_hub_links(tmp_path):
    card = ModelCard(model_card(str(tmp_path), None, _run("fedavg-full", "jsonl:/data/x", {"full": SCORES}), "u"))
    assert card.data.base_model is None and card.data.datasets is None and card.data.eval_results is None
    assert f"the local folder `{tmp_path}`" in card.text


def test_the_peft_folder_names_the_hub_model_and_the_live_model_keeps_its_path(tiny_llama, tmp_path):
    from fl_offsite.config.sections import LoraSpec
    from fl_offsite.surgery.lora import add_lora, save_peft_folder

    model = add_lora(copy.deepcopy(tiny_llama), LoraSpec(), [0, 1])
    model.peft_config["default"].base_model_name_or_path = "/cache/models/smollm2-135m"
    save_peft_folder(model, tmp_path / "peft", model_card("smollm2-135m", None, None, "u", peft=True), HUB_ID)
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["base_model_name_or_path"] == HUB_ID
    assert ModelCard.load(tmp_path / "peft" / "README.md").data.library_name == "peft"
    assert model.peft_config["default"].base_model_name_or_path == "/cache/models/smollm2-135m"
