"""Model cards (README.md with Hugging Face metadata) for plugged-in models, PEFT folders and run outputs.

A card says what the base model was and how the weights were trained: the split, the
emulator recipe and its corpus, the method, rounds, clients, task and the last metrics.
The same record (:func:`run_record`) travels in a trained adapter's safetensors metadata,
so ``fl-offsite plug-in`` can write the card of the model it makes.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fl_offsite.run.records import SCORED, RoundRecord
from fl_offsite.run.tables import markdown_table
from fl_offsite.surgery.split import SplitPlan

if TYPE_CHECKING:
    from huggingface_hub import ModelCardData

    from fl_offsite.config.settings import Settings
    from fl_offsite.data.models import BaseModel


def run_record(settings: Settings, plan: SplitPlan | None, round_record: RoundRecord, num_clients: int,
               distillation: dict | None) -> dict:
    """What a card tells about a run, after the round of ``round_record`` (JSON-serialisable)."""
    from fl_offsite.emulator.distill import ppl_summary

    record: dict[str, Any] = {"base_model": settings.model, "task": settings.task, "method": settings.method.name,
              "strategy": settings.strategy.name, "round": round_record.round,
              "num_rounds": settings.num_rounds, "clients": num_clients, "seed": settings.seed,
              "metrics": {model: {k: m[k] for k in SCORED} for model, m in round_record.scores.items()}}
    if plan is not None:
        record["emulator"] = settings.emulator.describe()
        if distillation:
            record["emulator"] += f"; {ppl_summary(distillation)}"
        if settings.realign.enabled:
            r = settings.realign
            record["emulator"] += (f"; re-aligned to the adapter by the model owner before every round ({r.steps} "
                                   f"steps, {r.pre_steps} before the first; LoRA r {r.lora_r} on the middle blocks)")
    if (lora := settings.tuning.lora) is not None:
        record["lora"] = {"r": lora.r, "alpha": lora.alpha, "dropout": lora.dropout}
    if round_record.privacy is not None:
        record["privacy"] = round_record.privacy.to_json()
    return record


def model_card(base_model: str, plan: SplitPlan | None, run: dict | None, usage: str,
               peft: bool = False) -> str:
    """A README.md that the Hugging Face Hub reads: metadata (base model's Hub id, license, pipeline, data set,
    the run's final scores as model-index results), then the facts and ``usage`` (markdown)."""
    from huggingface_hub import ModelCard

    from fl_offsite.data.models import describe_base_model

    base = describe_base_model(base_model)
    rows = [["base model", base.origin]]
    if plan is not None:
        rows.append(["split", f"{plan.name} of {plan.num_layers} blocks: adapter blocks {list(plan.adapter_layers)}"
                              + (f", emulator keeps {list(plan.kept_layers)}"
                                 if len(plan.kept_layers) < plan.num_layers else "")])
    if run:
        rows += [["method", run["method"]], ["task", run["task"]],
                 ["rounds", f"{run['round']} of {run['num_rounds']}"], ["clients (data owners)", str(run["clients"])],
                 ["strategy", run["strategy"]], ["seed", str(run["seed"])]]
        if "emulator" in run:
            rows.append(["emulator", run["emulator"]])
        if "lora" in run:
            rows.append(["LoRA", ", ".join(f"{k} {v}" for k, v in run["lora"].items())])
        if "privacy" in run:
            rows.append(["privacy", f"epsilon {run['privacy']['epsilon']:.3f} at delta {run['privacy']['delta']:g}"])
    title = f"{run['method']} on {run['task']}" if run else "adapter plugged in"
    if run is None:
        about = ("Adapter blocks plugged into the base model with `fl-offsite plug-in`; the adapter file carried "
                 "no record of the run that trained them.")
    elif plan is None:
        about = "Fine-tuned with fl-offsite (federated learning on Flower): the training data stayed with its owners."
    else:
        about = ("Fine-tuned with fl-offsite (federated offsite-tuning on Flower): data owners trained the adapter "
                 "blocks on an emulator of the model; neither the full model nor their data left its owner.")
    lines = [f"# {base.hub_id or base_model}: {title} (fl-offsite)", "", about, "", markdown_table(["", ""], rows), ""]
    if run:
        lines += [f"## Results after round {run['round']} (held-out test split, ± one standard error)", "",
                  markdown_table(["model", "n", "acc", "acc_norm"], [
                      [model, str(m["n"]), f"{m['acc']:.3f} ± {m['acc_stderr']:.3f}", f"{m['acc_norm']:.3f}"]
                      for model, m in run["metrics"].items()]), ""]
    lines += ["## Use", "", usage.strip(), ""]
    metadata = card_data(base, plan, run, peft).to_yaml()
    return str(ModelCard(f"---\n{metadata}\n---\n\n" + "\n".join(lines)))


def card_data(base: BaseModel, plan: SplitPlan | None, run: dict | None, peft: bool) -> ModelCardData:
    """The card's metadata; its model-index holds the final scores of the model the card describes."""
    from huggingface_hub import EvalResult, ModelCardData

    from fl_offsite.data.tasks import hub_dataset_id

    tags = ["fl-offsite", "federated-learning", "flower", *(["offsite-tuning"] if plan is not None else []),
            *(["lora"] if peft or (run and "lora" in run) else [])]
    dataset = hub_dataset_id(run["task"]) if run else None
    scores = (run or {}).get("metrics", {}).get("plugin" if plan is not None else "full")
    results = None
    if run and dataset and scores:
        split = f"{run['task']}: fl-offsite's held-out test split of {scores['n']} examples, seed {run['seed']}"
        results = [EvalResult(task_type="text-generation", dataset_type=dataset, dataset_name=split,
                              metric_type=metric, metric_name=name, metric_value=scores[key])
                   for key, metric, name in (("acc", "accuracy", "accuracy"),
                                             ("acc_norm", "accuracy", "accuracy (length-normalised)"))]
    return ModelCardData(
        base_model=base.hub_id, library_name="peft" if peft else "transformers", license=base.license,
        pipeline_tag="text-generation", tags=tags, datasets=[dataset] if dataset else None,
        model_name=f"{(base.hub_id or 'model').split('/')[-1]}-{run['method']}-{run['task']}" if run else None,
        eval_results=results)


def usage(weights: str, base: str, path: str) -> str:
    """How to load ``weights`` at ``path``: ``"adapter.safetensors"``, ``"model.safetensors"`` (onto the model
    ``base``), ``"peft"`` (a PEFT folder, onto ``base``) or ``"model"`` (a whole model folder)."""
    if weights == "adapter.safetensors":
        return (f"```bash\nfl-offsite plug-in {base} {path} --out plugged\n```\n\nthen "
                '`AutoModelForCausalLM.from_pretrained("plugged")`.')
    load = "from transformers import AutoModelForCausalLM\n{} = AutoModelForCausalLM.from_pretrained({!r})"
    if weights == "model":
        code = load.format("model", path)
    elif weights == "model.safetensors":
        code = (f"from safetensors.torch import load_file\n{load.format('base', base)}\n"
                f"base.load_state_dict(load_file({path!r}), strict=False)  # every parameter, tied ones once")
    elif weights == "peft":
        code = (f"from peft import PeftModel\n{load.format('base', base)}\n"
                f"model = PeftModel.from_pretrained(base, {path!r})")
    else:
        raise ValueError(f"no usage for {weights!r}")
    return f"```python\n{code}\n```"
