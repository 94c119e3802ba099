"""benchmarks/fidelity.py end to end on a tiny model: the five settings, seeds, resume, plot."""
from __future__ import annotations

import json
import statistics

import pytest


@pytest.fixture(scope="module")
def fidelity():
    from benchmarks import fidelity

    return fidelity


def test_fidelity_scores_every_setting_over_seeds_and_resumes(fidelity, tiny_lm_dir, tmp_path, private_cache,
                                                             monkeypatch, capsys):
    out = tmp_path / "fid.json"
    args = ["--model", str(tiny_lm_dir), "--task", "bbc-news", "--seeds", "1,2", "--clients", "2", "--rounds", "1",
            "--local-steps", "1", "--batch-size", "2", "--max-length", "64", "--limit", "6",
            "--recipe", "plain=split.adapter-layers=1,1;split.emulator-layers=2",
            "--recipe", "small=split.adapter-layers=1,1;split.emulator-layers=1",
            "--fleet", "mixed=small,plain", "--fleet", "same=plain,plain", "--out", str(out)]
    assert fidelity.main(args) == 0
    data = json.loads(out.read_text())
    units = data["units"]
    assert set(units) == {"full-zero-shot", "fedavg-full/1", "fedavg-full/2", "plain/emulator-zero-shot",
                          "plain/1", "plain/2", "small/emulator-zero-shot", "small/1", "small/2",
                          "fleet:mixed/1", "fleet:mixed/2", "fleet:same/1", "fleet:same/2"}
    assert units["plain/emulator-zero-shot"]["kept_layers"] == [0, 1, 4, 5]
    assert all(units[k]["n"] == 6 for k in ("full-zero-shot", "fedavg-full/1"))
    summary = data["summary"]
    plugin = [units[f"plain/{s}"]["plugin"]["acc"] for s in (1, 2)]
    assert summary["plain: plug-in"]["mean"] == pytest.approx(statistics.fmean(plugin))
    gap = [units[f"plain/{s}"]["plugin"]["acc"] - units[f"plain/{s}"]["emulator"]["acc"] for s in (1, 2)]
    assert summary["plain: privacy gap (plug-in - emulator + adapter)"]["values"] == pytest.approx(gap)
    # A fleet of one recipe is that recipe's run; a mixed one scores the plug-in and each emulator it used.
    assert units["fleet:same/1"]["plugin"] == units["plain/1"]["plugin"]
    mixed = units["fleet:mixed/2"]
    assert mixed["members"] == ["small", "plain"] and set(mixed["emulators"]) == {"small", "plain"}
    assert summary["fleet mixed: plug-in"]["values"] == [units[f"fleet:mixed/{s}"]["plugin"]["acc"] for s in (1, 2)]
    assert "fleet mixed: emulator + adapter on small (1 clients)" in summary
    assert "FedAvg full fine-tuning" in capsys.readouterr().out
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"

    # A rerun resumes: nothing is trained or scored again.
    monkeypatch.setattr(fidelity, "fedavg", lambda *a, **k: pytest.fail("trained again"))
    monkeypatch.setattr(fidelity, "score", lambda *a, **k: pytest.fail("scored again"))
    assert fidelity.main(args) == 0
    with pytest.raises(SystemExit, match="one per client"):
        fidelity.main([*args[:-2], "--fleet", "odd=plain", "--out", str(out)])
    with pytest.raises(SystemExit, match="other settings"):
        fidelity.main([*args[:-2], "--rounds", "2", "--out", str(out)])


def test_fidelity_measures_a_realigned_recipe_beside_its_bytes_and_owner_time(fidelity, tiny_lm_dir, tmp_path,
                                                                             private_cache, capsys):
    out = tmp_path / "realign.json"
    realign = "realign.steps=2;realign.pre-steps=1;realign.lora-r=2;realign.batch-size=2;distill.block-size=32"
    assert fidelity.main([
        "--model", str(tiny_lm_dir), "--task", "bbc-news", "--seeds", "1", "--clients", "2", "--rounds", "2",
        "--local-steps", "1", "--batch-size", "2", "--max-length", "64", "--limit", "6", "--no-ft",
        "--recipe", f"aligned=split.adapter-layers=1,1;split.emulator-layers=2;distill.corpus=model-samples;{realign}",
        "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    record = data["units"]["aligned/1"]["realign"]["aligned"]
    assert [r["round"] for r in record["rounds"]] == [0, 1, 2]  # pre-alignment, then before each round
    assert all(r["bytes_per_client"] > 0 and r["clients"] == 2 for r in record["rounds"])
    assert record["adapter_bytes_per_client_round"] > record["rounds"][0]["bytes_per_client"]
    assert data["recipes"]["aligned"]["realign"]["steps"] == 2
    assert set(data["realign_summary"]) == {"aligned"}
    assert "re-alignment (the model owner" in capsys.readouterr().out
    fedbiot = fidelity.recipes_of([f"b={realign};strategy.name=fedprox;strategy.proximal-mu=2"])["b"]
    assert fedbiot[2].steps == 2 and fedbiot[3] == 2.0  # FedBiOT's client term is FedProx's, mu = 2 x eps
