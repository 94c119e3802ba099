"""The comparison report, in process (`fl-offsite compare` end to end on Ray: tests/test_ray_cluster.py)."""
from __future__ import annotations

import json
import re

import pytest

from fl_offsite.run.compare import write_report
from fl_offsite.run.folder import RunFolder
from fl_offsite.testing.flower import run, tiny_config

pytestmark = pytest.mark.usefixtures("private_cache")


def test_report_of_offsite_and_fedavg_full(tiny_lm_dir, tmp_path):
    out = tmp_path / "compare"
    for method in ("zero-shot", "offsite", "fedavg-full"):
        run(tiny_config(tiny_lm_dir, out / method, method=method, **{"data.num-partitions": 2}), num_nodes=2)
    report = write_report(out, ["zero-shot", "offsite", "fedavg-full"])

    data = json.loads((out / "report.json").read_text())
    for method in ("offsite", "fedavg-full"):
        rounds = RunFolder(out / method).rounds()
        clients = [c for r in rounds[1:] for c in r.clients]
        summary = data[method]
        assert summary["client_peak_memory_mb"] == max(c.peak_memory_mb for c in clients)
        assert summary["bytes_up_per_client_round"] == sum(c.bytes_up for c in clients) / len(clients)
        assert [r["round"] for r in summary["rounds"]] == [0, 1, 2]
        budget = summary["communication"]  # every round's adapter bytes, all clients; deliveries apart
        assert [r["round"] for r in budget["rounds"]] == [1, 2]
        assert budget["adapter_bytes_up"] == sum(c.bytes_up for c in clients)
        assert budget["adapter_bytes_down"] == sum(c.bytes_down for c in clients)
        assert budget["one_time_bytes"] == RunFolder(out / method).delivered_bytes() > 0
    assert [r["round"] for r in data["zero-shot"]["rounds"]] == [0]  # evaluated, never trained
    zero_shot, offsite_round0 = data["zero-shot"]["rounds"][0], RunFolder(out / "offsite").rounds()[0].scores
    assert [zero_shot[m]["acc"] for m in ("plugin", "emulator")] == [offsite_round0[m]["acc"] for m in
                                                                     ("plugin", "emulator")]
    offsite, full = data["offsite"], data["fedavg-full"]
    assert offsite["bytes_up_per_client_round"] < full["bytes_up_per_client_round"]
    assert offsite["trainable_params"] < full["trainable_params"]
    assert offsite["communication"]["adapter_bytes_up"] < full["communication"]["adapter_bytes_up"]

    text = report.read_text()
    final = RunFolder(out / "offsite").rounds()[-1].scores
    assert f"| Offsite plug-in (full model + adapter) | {final['plugin']['acc']:.3f}" in text
    for row in ("Full zero-shot", "Emulator zero-shot", "FedAvg full fine-tuning", "Offsite emulator"):
        assert row in text
    for plot in ("accuracy.png", "client_cost.png"):
        assert (out / plot).read_bytes()[:4] == b"\x89PNG"


def test_report_compares_distilled_and_plain_emulators(tiny_lm_dir, tmp_path):
    out = tmp_path / "compare"
    distill = {"distill.steps": 3, "distill.batch-size": 2, "distill.block-size": 32, "distill.corpus": "model-samples"}
    for name, overrides in (("offsite", {}), ("distilled", distill)):
        run(tiny_config(tiny_lm_dir, out / name, **{"data.num-partitions": 2, "num-rounds": 1}, **overrides),
            num_nodes=2)
    report = write_report(out, ["offsite", "distilled"]).read_text()
    data = json.loads((out / "report.json").read_text())

    assert data["offsite"]["distillation"] is None
    record = data["distilled"]["distillation"]
    assert record["steps"] == 3 and len(record["losses"]) == 3
    # The run's emulator is the distilled one: its zero-shot differs from the plain emulator's.
    plain, distilled = (RunFolder(out / n).rounds()[0].scores["emulator"] for n in ("offsite", "distilled"))
    assert plain["acc"] == data["offsite"]["rounds"][0]["emulator"]["acc"]
    assert "Distilled emulator zero-shot [distilled]" in report and "| Emulator zero-shot " in report
    assert "| distilled emulator (emulator + adapter)" in report and "| Offsite plug-in" in report
    assert "## Emulator fidelity" in report
    assert f"{record['emulator_ppl_before']:.1f} | {record['emulator_ppl_after']:.1f}" in re.sub(r" +", " ", report)
    assert distilled["n"] == plain["n"] < plain["split_size"] == 496
    assert f"accuracy on {plain['n']} of the 496 held-out test examples (the seeded test split's first" in report
