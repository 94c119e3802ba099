"""Smoke tests of the benchmark scripts on tiny settings (seconds; no timing is asserted)."""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest


def test_client_cost_runs_every_method_on_a_tiny_model(tmp_path, capsys):
    from benchmarks import client_cost

    out = tmp_path / "cc.json"
    assert client_cost.main(["--model", "tiny", "--rounds", "1", "--steps", "1", "--batch", "2", "--seq", "16",
                             "--no-rss", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    methods = result["methods"]
    assert set(methods) == set(client_cost.METHODS)
    full, offsite = methods["full"], methods["offsite"]
    # Full fine-tuning: backward is twice the forward (input and weight gradients everywhere).
    assert full["flops_per_row"]["backward"] == pytest.approx(2 * full["flops_per_row"]["forward"])
    assert offsite["flops_per_row"]["total"] < full["flops_per_row"]["total"]
    assert methods["offsite-head"]["flops_per_row"]["total"] > offsite["flops_per_row"]["total"]
    assert offsite["trainable"] < offsite["params"] < full["params"]
    assert offsite["tensor_memory"]["grads_mb"] < full["tensor_memory"]["grads_mb"]
    assert "speed-up" in capsys.readouterr().out


def test_client_cost_bf16_keeps_trainable_weights_in_fp32(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from benchmarks import client_cost

    args = argparse.Namespace(model="tiny", split=None, lora_r=4)
    full = AutoModelForCausalLM.from_config(client_cost.model_config("tiny"))
    model, trainable = client_cost.build("offsite", full, args)
    from fl_offsite.learn.train import half_frozen

    assert half_frozen(model, trainable) > 0
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    assert {dtypes[n] for n in trainable} == {torch.float32}
    assert {d for n, d in dtypes.items() if n not in trainable} == {torch.bfloat16}


def test_overhead_timeline_reads_phases_from_log_lines():
    from benchmarks import overhead

    lines = [(1.0, "Starting logstream for run_id `7`"), (3.0, "Split 1-2-1 of x"), (9.0, "Sending the model (1 MB)"),
             (10.0, "Starting FedAvg strategy:"), (12.0, "Initial global evaluation results: {}"),
             (15.0, "aggregate_train: Received 2 results"), (15.5, "Global evaluation"),
             (17.0, "└──> MetricRecord: {'a': 1}"), (18.0, "Results in /x")]
    phases = dict(overhead.timeline(lines, 1, 20.0))
    assert phases["Ray start-up: nodes connect"] == 6.0
    assert phases["round 1: server-side evaluation + checkpoint"] == 1.5
    assert sum(phases.values()) == 20.0


def test_scale_aggregation_memory_does_not_hold_copies_per_reply():
    from benchmarks import scale

    rows = scale.aggregation_child(1.0, [1, 4])
    assert [r["replies"] for r in rows] == [1, 4]
    # Running sum: the extra numpy memory is a few payloads, whatever the number of replies.
    assert rows[1]["aggregate_peak_extra_mb"] < rows[1]["replies_held_mb"]


def test_train_local_in_bf16_with_half_frozen_weights_moves_only_the_adapter(tiny_tokenizer):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from fl_offsite.config.sections import TrainSettings
    from fl_offsite.data.encode import encode_choice_example
    from fl_offsite.data.tasks import ChoiceExample
    from fl_offsite.learn.train import half_frozen, train_local
    from fl_offsite.surgery.split import adapter_names, plan_split

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "llama", vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2))
    plan = plan_split(model, 1, 1, emulator_layers=2)
    trainable = set(adapter_names(model, plan).values())
    half_frozen(model, trainable)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    features = [encode_choice_example(tiny_tokenizer, ChoiceExample("Article: The striker scored.\nTopic:",
                                                                     [" sport", " tech"], 0), 32)] * 2
    stats = train_local(model, trainable, features, TrainSettings(lr=1e-2, batch_size=2, local_steps=2,
                                                                  precision="bf16"), tiny_tokenizer.pad_token_id)
    assert math.isfinite(stats.loss) and stats.loss > 0
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]) != (name in trainable), name


def test_footprint_sets_the_fleets_estimate_beside_a_measured_node_peak(tiny_lm_dir, tmp_path, capsys):
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc to read a process's peak memory")
    from benchmarks import footprint

    out = tmp_path / "fp.json"
    assert footprint.main(["--model", str(tiny_lm_dir), "--ks", "1,2", "--adapter-layers", "1,1", "--batch-size", "2",
                           "--max-length", "32", "--steps", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [r["k"] for r in rows] == [1, 2] and result["footprint"]["per_block_mb"] > 0
    for row in rows:  # a tiny model's peak is its runtime: the estimate's overhead term dominates both
        assert 0.5 < row["estimate_over_peak"] < 2 and row["runtime_mb"] <= row["peak_mb"]
    assert "estimate / peak" in capsys.readouterr().out


def test_suite_table_averages_the_rows_beside_the_paper_and_plots_them(tmp_path, capsys):
    from benchmarks import suite_table

    measured = Path(__file__).resolve().parents[1] / "benchmarks" / "measurements"
    suite_table.main(["--row", f"piqa=plain@{measured / 'fidelity_piqa_budget30.json'}",
                      "--row", f"boolq=public-mix@{measured / 'fidelity_boolq.json'}", "--plot", str(tmp_path / "s.png")])
    lines = capsys.readouterr().out.splitlines()
    assert lines[2].startswith("| piqa | 30 x 4 | 0.603 ± 0.028 | 0.503 ± 0.029 | 0.550 | 0.623 | 0.630 | +0.007 |")
    assert lines[4] == ("| **average of the 2 rows** | | **0.507** | **0.439** | **0.588** | **0.619** | **0.630** "
                        "| +0.011 |")
    assert lines[5].startswith("| paper, OPT-1.3B, average of 8 tasks | | 0.425 | - | 0.466 | 0.490 | 0.499 |")
    assert (tmp_path / "s.png").stat().st_size > 10_000
    with pytest.raises(SystemExit, match="no FedAvg full fine-tuning"):
        suite_table.main(["--row", f"x=k16@{measured / 'fidelity_siqa_budget30_k16.json'}"])


def test_process_cpu_counts_the_cpu_of_processes_that_detach_from_the_command(tmp_path, capsys):
    """A child that burns ~1 s of CPU in a session of its own, which the command does not wait for."""
    import sys

    from benchmarks.process_cpu import main

    burner = "import time\nend = time.process_time() + 1.0\nwhile time.process_time() < end: pass\n"
    (tmp_path / "burn.py").write_text(burner)
    (tmp_path / "launch.py").write_text(
        "import subprocess, sys, time\n"
        f"subprocess.Popen([sys.executable, {str(tmp_path / 'burn.py')!r}, 'detached'], start_new_session=True)\n"
        "time.sleep(2.5)\n")
    assert main(["--every", "0.1", "--json", str(tmp_path / "cpu.json"), "--", sys.executable,
                 str(tmp_path / "launch.py")]) == 0
    groups = {g["kind"]: g for g in json.loads((tmp_path / "cpu.json").read_text())["groups"]}
    burned = [g for kind, g in groups.items() if "burn.py detached" in kind]
    assert len(burned) == 1 and burned[0]["processes"] == 1 and 0.8 < burned[0]["cpu_s"] < 1.5
    assert "CPU s in all" in capsys.readouterr().out
