"""The ServerApp logic and the ClientApp driven in process (no Ray): delivery, rounds, records, resume."""
from __future__ import annotations

import json
import re

import pytest
import torch

from fl_offsite.config.settings import Settings
from fl_offsite.data.tasks import load_task
from fl_offsite.run.folder import RunFolder
from fl_offsite.surgery.split import load_adapter
from fl_offsite.testing.flower import Crash, crash_in_round, of_type, rounds_of, run, tiny_config

pytestmark = pytest.mark.usefixtures("private_cache")


def test_offsite_run_sends_the_emulator_once_and_only_the_adapter_each_round(tiny_lm_dir, tmp_path):
    config = tiny_config(tiny_lm_dir, tmp_path / "run", **{"results.tensorboard": True})
    grid = run(config)

    deliveries = of_type(grid, "query.model")
    assert sorted(m.metadata.dst_node_id for m in deliveries) == grid.node_ids  # once per node
    trains = of_type(grid, "train")
    assert len(trains) == 3 * 2
    adapter, plan = load_adapter(tmp_path / "run" / "adapter.safetensors")
    assert plan.kept_layers == (0, 1, 4, 5) and plan.adapter_layers == (0, 5)
    for msg in trains:  # adapter blocks only, full-model names
        assert set(msg.content["arrays"].keys()) == set(adapter)

    rounds = rounds_of(tmp_path / "run")
    assert [r["round"] for r in rounds] == [0, 1, 2]
    for record in rounds:
        assert {"plugin", "emulator"} <= record["eval"].keys()
        assert record["eval"]["plugin"]["n"] == 6
    adapter_bytes = sum(t.numel() * t.element_size() for t in adapter.values())
    for record in rounds[1:]:
        assert len(record["clients"]) == 3 and record["problems"] == []
        for client in record["clients"]:
            assert client["bytes_down"] == client["bytes_up"]  # the records' own byte counts
            assert adapter_bytes <= client["bytes_up"] < 1.1 * adapter_bytes
            assert client["num-examples"] > 0 and client["train-steps"] == 2
    delivery = json.loads((tmp_path / "run" / "delivery.json").read_text())
    assert delivery["package_bytes"] > 3 * adapter_bytes
    (first,) = delivery["deliveries"]
    assert set(first["bytes_per_node"].values()) == {delivery["package_bytes"]}
    # Round 0 is the zero-shot full model and emulator; training moved the adapter.
    assert not torch.equal(adapter[sorted(adapter)[0]], _initial(tmp_path / "run")[sorted(adapter)[0]])

    # The communication budget: each round's adapter bytes (all clients), running totals, deliveries apart.
    down = [sum(c["bytes_down"] for c in r["clients"]) for r in rounds[1:]]
    up = [sum(c["bytes_up"] for c in r["clients"]) for r in rounds[1:]]
    budget = [r["communication"] for r in rounds[1:]]
    assert [b["bytes_down"] for b in budget] == down and [b["bytes_up"] for b in budget] == up
    assert budget[1]["cumulative_bytes_down"] == sum(down) and budget[1]["cumulative_bytes_up"] == sum(up)
    assert {b["one_time_bytes"] for b in budget} == {3 * delivery["package_bytes"]}

    # TensorBoard holds every round's scalars, as in metrics.jsonl.
    scalars = tensorboard_scalars(tmp_path / "run")
    for model in ("plugin", "emulator"):
        assert scalars[f"eval/{model}/acc"] == pytest.approx([r["eval"][model]["acc"] for r in rounds])
    assert scalars["train/loss"] == pytest.approx(
        [sum(c["train-loss"] for c in r["clients"]) / 3 for r in rounds[1:]], rel=1e-6)
    assert scalars["communication/MB_up_cumulative"] == pytest.approx([sum(up[:1]) / 1e6, sum(up) / 1e6])
    assert len(scalars["time/round_seconds"]) == 2


def tensorboard_scalars(run_dir) -> dict[str, list[float]]:
    """Every scalar series under ``run_dir/tensorboard``, read back with TensorBoard's own event reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard")).Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def _initial(run_dir):
    return load_adapter(run_dir / "split" / "adapter.safetensors")[0]


def test_resume_continues_from_the_last_round_and_matches_an_uninterrupted_run(tiny_lm_dir, tmp_path):
    straight = tiny_config(tiny_lm_dir, tmp_path / "straight", **{"num-rounds": 3})
    run(straight, num_nodes=2)

    resumed = {**straight, "results.dir": str(tmp_path / "resumed"), "results.tensorboard": True}
    with pytest.raises(Crash):
        run(resumed, num_nodes=2, fault=crash_in_round(3))
    grid = run(resumed, num_nodes=2)
    assert of_type(grid, "query.model") == []  # nodes kept the emulator on disk
    deliveries = json.loads((tmp_path / "resumed" / "delivery.json").read_text())["deliveries"]
    assert len(deliveries) == 2 and set(deliveries[1]["bytes_per_node"].values()) == {0}  # both starts on record
    assert {m.content["config"]["round"] for m in of_type(grid, "train")} == {3}

    a, _ = load_adapter(tmp_path / "straight" / "adapter.safetensors")
    b, _ = load_adapter(tmp_path / "resumed" / "adapter.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    straight_rounds, resumed_rounds = rounds_of(tmp_path / "straight"), rounds_of(tmp_path / "resumed")
    assert [r["round"] for r in resumed_rounds] == [0, 1, 2, 3]
    accuracy = lambda rounds: [r["eval"][m]["acc"] for r in rounds for m in ("plugin", "emulator")]
    assert accuracy(straight_rounds) == accuracy(resumed_rounds)
    # The adapter traffic's running totals go on across the restart; deliveries are counted apart.
    traffic = lambda rounds: [{k: v for k, v in r["communication"].items() if k != "one_time_bytes"} for r in rounds]
    assert traffic(straight_rounds[1:]) == traffic(resumed_rounds[1:])
    assert resumed_rounds[-1]["communication"]["one_time_bytes"] == RunFolder(tmp_path / "resumed").delivered_bytes()
    assert tensorboard_scalars(tmp_path / "resumed")["eval/plugin/acc"] == \
        pytest.approx([r["eval"]["plugin"]["acc"] for r in resumed_rounds])  # each round once, across both starts


@pytest.mark.parametrize("name", ["fedadam", "fedavgm"])  # float64 steps; arrays paired by position
def test_a_server_optimizer_resumes_with_its_moments_to_the_same_adapter(tiny_lm_dir, tmp_path, name):
    straight = tiny_config(tiny_lm_dir, tmp_path / "straight", **{"num-rounds": 3, "strategy.name": name})
    run(straight, num_nodes=2)
    resumed = {**straight, "results.dir": str(tmp_path / "resumed")}
    with pytest.raises(Crash):
        run(resumed, num_nodes=2, fault=crash_in_round(3))
    run(resumed, num_nodes=2)
    a, _ = load_adapter(tmp_path / "straight" / "adapter.safetensors")
    b, _ = load_adapter(tmp_path / "resumed" / "adapter.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fedavg_full_sends_every_parameter(tiny_lm_dir, tmp_path):
    config = tiny_config(tiny_lm_dir, tmp_path / "full", method="fedavg-full", **{"num-rounds": 1})
    grid = run(config, num_nodes=2)
    from fl_offsite.data.models import load_model
    model, _ = load_model(str(tiny_lm_dir), with_tokenizer=False)
    for msg in of_type(grid, "train"):
        assert set(msg.content["arrays"].keys()) == {n for n, _ in model.named_parameters()}
    record = rounds_of(tmp_path / "full")[-1]
    assert set(record["eval"]) == {"full"}


def test_fedavg_full_delivers_no_weights_once_and_trains_as_if_it_had(tiny_lm_dir, tmp_path, monkeypatch):
    """Every round carries the whole model, so the one-time delivery is its config and tokenizer only."""
    from safetensors.torch import load_file

    from fl_offsite.app.owner import ModelOwner

    def trained(name: str) -> tuple[dict, dict[str, torch.Tensor]]:
        config = tiny_config(tiny_lm_dir, tmp_path / name, method="fedavg-full", **{"num-rounds": 2})
        run(config, num_nodes=2)
        delivery = json.loads((tmp_path / name / "delivery.json").read_text())
        return delivery, load_file(tmp_path / name / "model.safetensors")

    light, light_model = trained("light")
    stored = list((tmp_path / "cache").glob(f"nodes/*/model-{light['digests'][0]}/model.safetensors"))
    assert len(stored) == 2 and all(not load_file(f) for f in stored)  # no weights on the nodes
    monkeypatch.setattr(ModelOwner, "carried_weights", lambda self: frozenset())
    heavy, heavy_model = trained("heavy")
    assert light["package_bytes"] * 20 < heavy["package_bytes"]  # the tiny model's weights dwarf its files
    assert light_model.keys() == heavy_model.keys()
    assert all(torch.equal(light_model[k], heavy_model[k]) for k in light_model)


def nan_update(msg, node_index):
    """Node 0 trains normally but returns NaN; the others are honest."""
    if msg.metadata.message_type != "train" or node_index != 0:
        return None
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

    bad = {k: torch.full_like(v, float("nan")) for k, v in msg.content["arrays"].to_torch_state_dict().items()}
    return Message(RecordDict({"arrays": ArrayRecord(bad), "metrics": MetricRecord({"num-examples": 10})}),
                   reply_to=msg)


def test_bad_and_failed_clients_are_left_out_and_logged(tiny_lm_dir, tmp_path):
    from flwr.app import Error, Message

    config = tiny_config(tiny_lm_dir, tmp_path / "run", **{"num-rounds": 1})

    def failing_and_nan(msg, node_index):
        if msg.metadata.message_type == "train" and node_index == 1:
            return Message(Error(code=0, reason="RuntimeError: disk full"), reply_to=msg)
        return nan_update(msg, node_index)

    with pytest.raises(RuntimeError, match="only 1 of 3 clients returned a usable update.*disk full"):
        run(config, num_nodes=3, fault=failing_and_nan)

    run(config, num_nodes=4, fault=nan_update)  # 3 good replies of 4: the round goes on
    record = rounds_of(tmp_path / "run")[-1]
    assert len(record["clients"]) == 3
    (problem,) = record["problems"]
    assert problem["kind"] == "rejected" and "NaN" in problem["reason"]
    adapter, _ = load_adapter(tmp_path / "run" / "adapter.safetensors")
    assert all(torch.isfinite(t).all() for t in adapter.values())


@pytest.mark.parametrize("method", ["offsite-lora", "fedavg-lora"])
def test_lora_methods_send_only_lora_factors(tiny_lm_dir, tmp_path, method):
    from fl_offsite.data.models import load_model
    from fl_offsite.surgery.split import plan_split

    config = tiny_config(tiny_lm_dir, tmp_path / method, method=method, **{"num-rounds": 1})
    grid = run(config, num_nodes=2)
    model, _ = load_model(str(tiny_lm_dir), with_tokenizer=False)
    blocks = {0, 5} if method == "offsite-lora" else set(range(6))
    for msg in of_type(grid, "train"):
        keys = set(msg.content["arrays"].keys())
        assert keys and all(".lora_A.weight" in k or ".lora_B.weight" in k for k in keys)
        assert {int(k.split(".")[2]) for k in keys} == blocks  # full-model block indices
    record = rounds_of(tmp_path / method)[-1]
    client = record["clients"][0]
    assert client["trainable-params"] == sum(msg.content["arrays"][k].numpy().size
                                             for msg in of_type(grid, "train")[:1] for k in msg.content["arrays"])
    if method == "offsite-lora":  # the owner merged LoRA into the adapter it keeps
        adapter, plan = load_adapter(tmp_path / method / "adapter.safetensors")
        assert plan == plan_split(model, 1, 1, emulator_layers=2)
        base = {k: v for k, v in model.state_dict().items() if k in adapter}
        assert any(not torch.equal(adapter[k], base[k]) for k in adapter)
    else:
        assert (tmp_path / method / "lora.safetensors").is_file()


@pytest.mark.parametrize("method", ["offsite-lora", "fedavg-lora"])
def test_lora_runs_write_a_peft_folder_that_peft_loads_and_model_cards(tiny_lm_dir, tmp_path, method):
    from peft import PeftModel
    from safetensors import safe_open

    from fl_offsite.cli.main import main
    from fl_offsite.data.models import load_model
    from fl_offsite.surgery.lora import add_lora, lora_names
    from fl_offsite.surgery.payload import plug_in, set_payload
    from fl_offsite.weights import load_tensors

    out = tmp_path / method
    config = tiny_config(tiny_lm_dir, out, method=method, **{"num-rounds": 1, "train.lr": 2e-2})
    run(config, num_nodes=2)
    fresh = lambda: load_model(str(tiny_lm_dir), with_tokenizer=False)[0]
    peft_model = PeftModel.from_pretrained(fresh(), out / "peft").eval()
    if method == "offsite-lora":  # ours: the merged adapter, plugged into the full model
        adapter, plan = load_adapter(out / "adapter.safetensors")
        ours = plug_in(fresh(), adapter, plan)
    else:  # ours: the averaged LoRA factors on a LoRA-wrapped full model
        ours = add_lora(fresh(), Settings.from_config(config).tuning.lora, list(range(6)))
        set_payload(ours, load_tensors(out / "lora.safetensors"), lora_names(ours, None))
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, base = ours.eval()(input_ids=ids).logits, fresh()(input_ids=ids).logits
        torch.testing.assert_close(peft_model(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-5)
    assert (expected - base).abs().max() > 1e-3  # the LoRA factors trained: not the base model's logits

    for path in (out / "peft" / "adapter_model.safetensors", out / "checkpoint" / "payload.safetensors",
                 out / ("adapter.safetensors" if method == "offsite-lora" else "lora.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            assert f.metadata()["format"] == "pt", path
    cells = lambda path: re.sub(r" +", " ", path.read_text())  # table cells without their padding
    for card in (out / "peft" / "README.md", out / "README.md"):
        text = cells(card)
        assert f"| base model | the local folder `{tiny_lm_dir}` |" in text and f"| method | {method} |" in text
        assert "base_model:" not in text  # a local folder has no Hub id to link to
        assert "| rounds | 1 of 1 |" in text and "| clients (data owners) | 2 |" in text and "| LoRA | r 4" in text
        assert ("| plugin |" if method == "offsite-lora" else "| full |") in text
    assert "library_name: peft" in (out / "peft" / "README.md").read_text()
    assert json.loads((out / "peft" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_lm_dir)
    if method == "offsite-lora":  # plug-in's card tells the run that trained the adapter
        assert main(["plug-in", str(tiny_lm_dir), str(out / "adapter.safetensors"), "--out", str(tmp_path / "p")]) == 0
        card = cells(tmp_path / "p" / "README.md")
        assert "| split | 1-2-1 of 6 blocks: adapter blocks [0, 5], emulator keeps [0, 1, 4, 5] |" in card
        for row in ("| emulator | layers uniform |", "| task | bbc-news |", "| method | offsite-lora |"):
            assert row in card


FLOWER_CLASS = {"fedavg": "FedAvg", "fedprox": "FedProx", "fedavgm": "FedAvgM", "fedadam": "FedAdam",
                "fedyogi": "FedYogi", "fedadagrad": "FedAdagrad", "fedmedian": "FedMedian",
                "fedtrimmedavg": "FedTrimmedAvg", "krum": "Krum"}


@pytest.mark.parametrize("name", FLOWER_CLASS)
def test_every_configured_strategy_builds_the_flower_class_it_names_and_aggregates_two_replies(name):
    import numpy as np
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
    from flwr.serverapp import strategy as fl
    from flwr.serverapp.strategy.fedopt import FedOpt
    from flwr.supercore.task_identity import TaskIdentity

    from fl_offsite.config.settings import CHOICES
    from strategies.aggregation import aggregation_strategy

    assert set(FLOWER_CLASS) == set(CHOICES["strategy.name"])
    settings = Settings.from_config({"strategy.name": name})
    strategy = aggregation_strategy(settings.strategy, settings.dp, num_nodes=4)
    assert type(strategy) is getattr(fl, FLOWER_CLASS[name])
    assert strategy.fraction_evaluate == 0.0  # the owner evaluates, not the clients

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1
    start = {"w": np.zeros(3, dtype=np.float32)}
    if isinstance(strategy, FedOpt):  # set by configure_train in a run
        strategy.current_arrays = start
    elif isinstance(strategy, fl.FedAvgM):
        strategy.current_arrays = ArrayRecord({k: torch.from_numpy(v) for k, v in start.items()})
    replies = []
    for node, (value, examples) in enumerate([(1.0, 10), (3.0, 30)], start=1):
        content = RecordDict({"arrays": ArrayRecord({"w": torch.full((3,), value)}),
                              "metrics": MetricRecord({"num-examples": examples})})
        reply = Message(content, reply_to=Message(RecordDict(), dst_node_id=node, message_type="train"))
        reply.metadata.__dict__["_src_node_id"] = node
        replies.append(reply)
    arrays, _ = strategy.aggregate_train(1, replies)
    result = arrays.to_torch_state_dict()["w"]
    assert result.shape == (3,) and torch.isfinite(result).all()
    expected = {"fedavg": 2.5, "fedprox": 2.5, "fedmedian": 2.0, "fedtrimmedavg": 2.0}  # weighted, plain means
    if name in expected:
        assert torch.allclose(result, torch.full((3,), expected[name]))
    elif name == "krum":  # one of the replies, as sent
        assert float(result[0]) in (1.0, 3.0)
    else:  # a server optimizer's step from the start, towards the replies
        assert (result > 0).all()


def test_a_stateful_strategy_runs_and_sends_its_settings(tiny_lm_dir, tmp_path):
    config = tiny_config(tiny_lm_dir, tmp_path / "prox", **{"num-rounds": 1, "strategy.name": "fedprox"})
    grid = run(config, num_nodes=2)
    assert {m.content["config"]["proximal-mu"] for m in of_type(grid, "train")} == {0.01}
    assert rounds_of(tmp_path / "prox")[-1]["problems"] == []


def test_bf16_clients_train_and_return_fp32_adapters(tiny_lm_dir, tmp_path):
    config = tiny_config(tiny_lm_dir, tmp_path / "bf16", **{"num-rounds": 1, "train.precision": "bf16"})
    grid = run(config, num_nodes=2)
    record = rounds_of(tmp_path / "bf16")[-1]
    assert record["problems"] == [] and len(record["clients"]) == 2
    assert all(c["train-loss"] > 0 for c in record["clients"])
    for msg in of_type(grid, "train"):
        assert {a.dtype for a in msg.content["arrays"].values()} == {"float32"}


def test_bf16_clients_get_the_emulator_in_bf16_and_train_exactly_as_with_an_fp32_download(tiny_lm_dir, tmp_path,
                                                                                          monkeypatch):
    config = lambda name: tiny_config(tiny_lm_dir, tmp_path / name, **{"num-rounds": 1, "train.precision": "bf16"})
    grid = run(config("half"), num_nodes=2)
    (delivery,) = of_type(grid, "query.model")[:1]
    assert set(delivery.content["model"]["bf16-tensors"]) == set(delivery.content["weights"])  # every weight
    half = json.loads((tmp_path / "half" / "delivery.json").read_text())["package_bytes"]

    monkeypatch.setattr("fl_offsite.app.server_app.HALF", {})  # the same run, the emulator sent in fp32
    run(config("full"), num_nodes=2)
    full = json.loads((tmp_path / "full" / "delivery.json").read_text())["package_bytes"]
    assert half < 0.6 * full
    trained = [load_adapter(tmp_path / name / "adapter.safetensors")[0] for name in ("half", "full")]
    assert trained[0].keys() == trained[1].keys()
    assert all(torch.equal(trained[0][k], trained[1][k]) for k in trained[0])


def test_eval_every_scores_the_named_rounds_and_the_report_skips_the_others(tiny_lm_dir, tmp_path):
    from fl_offsite.run.compare import write_report
    from fl_offsite.run.tables import round_table

    run(tiny_config(tiny_lm_dir, tmp_path / "out" / "offsite", **{"num-rounds": 3, "eval.every": 2}), num_nodes=2)
    rounds = rounds_of(tmp_path / "out" / "offsite")
    assert [sorted(r["eval"]) for r in rounds] == [["emulator", "plugin"], [], ["emulator", "plugin"],
                                                   ["emulator", "plugin"]]
    assert round_table(RunFolder(tmp_path / "out" / "offsite").rounds()).splitlines()[3].startswith("| 1     | -")
    report = json.loads((write_report(tmp_path / "out", ["offsite"]).parent / "report.json").read_text())
    assert [r["round"] for r in report["offsite"]["rounds"]] == [0, 2, 3]

    run(tiny_config(tiny_lm_dir, tmp_path / "ends", **{"num-rounds": 3, "eval.every": 0}), num_nodes=2)
    assert [bool(r["eval"]) for r in rounds_of(tmp_path / "ends")] == [True, False, False, True]


def test_zero_shot_scores_are_shared_by_methods_on_the_same_weights(tiny_lm_dir, tmp_path, monkeypatch):
    import fl_offsite.app.owner

    scored = []
    score = fl_offsite.app.owner.evaluate_task
    monkeypatch.setattr(fl_offsite.app.owner, "evaluate_task", lambda model, *a, **k: scored.append(k["desc"]) or
                        score(model, *a, **k))
    config = lambda method, **keys: tiny_config(tiny_lm_dir, tmp_path / method, method=method,
                                                **{"num-rounds": 1, **keys})
    run(config("offsite"), num_nodes=2)
    assert scored == ["scoring plugin", "scoring emulator"] * 2
    scored.clear()
    run(config("fedavg-full"), num_nodes=2)  # round 0: the full model, already scored as offsite's plug-in
    assert scored == ["scoring full"]
    zero_shot = [rounds_of(tmp_path / m)[0]["eval"][k] for m, k in (("offsite", "plugin"), ("fedavg-full", "full"))]
    assert zero_shot[0] == zero_shot[1]

    scored.clear()
    run(config("fedavg-full", **{"eval.precision": "bf16", "results.dir": str(tmp_path / "bf16")}), num_nodes=2)
    assert scored == ["scoring full", "scoring full"]  # another precision: scored again


def test_eval_limit_zero_scores_the_whole_test_split(tiny_lm_dir, tmp_path):
    """On a task of short questions (cheap to score) whose test split is larger than the default limit."""
    from fl_offsite.config.settings import DEFAULTS
    from fl_offsite.data.downloads import cache_dir

    examples = [{"input": f"Is {i} odd?", "target_scores": {"yes": i % 2, "no": 1 - i % 2}} for i in range(1100)]
    (cache_dir("tasks", "bigbench") / "parity.json").write_text(json.dumps({"name": "parity", "examples": examples}))
    test_split = len(load_task("bigbench:parity", seed=1234).test)
    assert test_split > DEFAULTS["eval.limit"]
    run(tiny_config(tiny_lm_dir, tmp_path / "zs", method="zero-shot", task="bigbench:parity", **{"eval.limit": 0}),
        num_nodes=2)
    (record,) = rounds_of(tmp_path / "zs")
    assert {m["n"] for m in record["eval"].values()} == {test_split}


def test_a_users_jsonl_task_trains_scores_and_evaluates(tiny_lm_dir, tmp_path, private_cache, monkeypatch):
    """``jsonl:<folder>``: a federated offsite run on the user's own files, scored on the whole test file, then
    ``fl-offsite eval`` of the adapter it wrote. The nodes train on their shares of it: their operator lists the
    folder in ``FL_OFFSITE_TASK_FOLDERS`` (``fl-offsite simulate`` does it for its own run)."""
    from fl_offsite.cli.main import main

    folder = tmp_path / "mine"
    folder.mkdir()
    for split, first, count in (("train", 0, 40), ("validation", 40, 4), ("test", 44, 10)):
        (folder / f"{split}.jsonl").write_text("".join(
            json.dumps({"context": f"Is {i} odd?", "choices": [" no", " yes"], "label": i % 2}) + "\n"
            for i in range(first, first + count)))
    monkeypatch.setenv("FL_OFFSITE_TASK_FOLDERS", str(folder))
    run(tiny_config(tiny_lm_dir, tmp_path / "run", task=f"jsonl:{folder}", **{"eval.limit": 0}), num_nodes=2)
    records = rounds_of(tmp_path / "run")
    assert len(records) == 3 and {m["n"] for m in records[-1]["eval"].values()} == {10}
    assert main(["eval", str(tiny_lm_dir), "--task", f"jsonl:{folder}", "--adapter",
                 str(tmp_path / "run" / "adapter.safetensors"), "--json", str(tmp_path / "eval.json")]) == 0
    scored = json.loads((tmp_path / "eval.json").read_text())
    assert scored["n"] == 10 and scored["acc"] == records[-1]["eval"]["plugin"]["acc"]


def test_a_shared_emulator_travels_as_k_blocks_and_runs_at_full_depth_on_the_nodes(tiny_lm_dir, tmp_path):
    """``emulator.sharing``: the package holds the kept blocks only, its config the repeats; the node's
    emulator runs each block as often as the owner's plan says."""
    from fl_offsite.app.client_training import CACHE
    from fl_offsite.surgery.blocks import REPEATS_KEY, find_blocks

    grid = run(tiny_config(tiny_lm_dir, tmp_path / "run", **{"num-rounds": 1, "emulator.sharing": True}), num_nodes=2)
    _, plan = load_adapter(tmp_path / "run" / "adapter.safetensors")
    assert plan is not None and plan.shared and plan.kept_layers == (0, 1, 4, 5)
    assert plan.block_repeats() == [1, 1, 3, 1] and sum(plan.block_repeats()) == plan.num_layers
    delivery = of_type(grid, "query.model")[0]
    assert json.loads(bytes(delivery.content["files"]["config.json"]))[REPEATS_KEY] == plan.block_repeats()
    blocks = {int(k.split(".")[2]) for k in delivery.content["weights"] if k.startswith("model.layers.")}
    assert blocks == set(range(len(plan.kept_layers)))  # 4 blocks travel, not the 6 they run as
    node_emulator = next(reversed(CACHE._models.values()))[0]
    assert [getattr(b, "_fl_offsite_repeats", 1) for b in find_blocks(node_emulator)[1]] == plan.block_repeats()
    assert rounds_of(tmp_path / "run")[1]["problems"] == []
