"""Config validation, and the Flower app's bundle (FAB)."""
from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from fl_offsite.cli.main import main
from fl_offsite.config.keys import load_file, parse_sets
from fl_offsite.config.settings import CHOICES, DEFAULTS, validate
from fl_offsite.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def test_the_fab_carries_the_apps_code_and_license_only_with_flower_142_metadata():
    """What every node receives with each run, as `flwr run .` builds it from this checkout and as
    `fl-offsite` builds it from the app laid out in the cache: no benchmarks, measurements, docs, tests or CLI.
    Flower's own FAB builder validates fab-format-version 1 (license file, flwr-version-target in range)."""
    import io
    import zipfile
    from importlib.metadata import version

    from flwr.cli.build import build_fab_from_disk, build_fab_from_files
    from flwr.cli.utils import collect_files
    from packaging.requirements import Requirement

    from fl_offsite.ops.flower_app import app_dir

    fab, metadata = build_fab_from_files(collect_files(ROOT))
    assert (metadata.fab_format_version, metadata.flwr_version_target) == (1, "1.42.0")
    names = zipfile.ZipFile(io.BytesIO(fab)).namelist()
    assert "LICENSE" in names and "fl_offsite/app/client_app.py" in names and "strategies/offsite.py" in names
    assert not [n for n in names if n.startswith(("benchmarks/", "docs/", "tests/", "fl_offsite/testing/",
                                                  "fl_offsite/cli/", "simulations/"))]
    assert len(fab) < 600_000
    assert sorted(zipfile.ZipFile(io.BytesIO(build_fab_from_disk(app_dir()))).namelist()) == sorted(names)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    (flwr,) = [Requirement(d) for d in project["dependencies"] if Requirement(d).name == "flwr"]
    assert version("flwr") in flwr.specifier  # the version installed here, the one this app ran on
    assert "1.43.0" not in flwr.specifier and "2.0.0" not in flwr.specifier


def test_unknown_key_suggests_the_right_one():
    with pytest.raises(UserError, match="did you mean 'train.lr'"):
        validate({"train.lrr": 0.1})


@pytest.mark.parametrize("overrides, message", [
    ({"num-rounds": "three"}, "must be int"),
    ({"results.resume": "maybe"}, "true or false"),
    ({"method": "magic"}, "not one of"),
    ({"strategy.name": "fedsgd"}, "not one of"),
    ({"split.adapter-layers": "2"}, "two integers"),
    ({"strategy.fraction-train": 0.0}, "fraction-train"),
    ({"train.local-steps": 0, "train.local-epochs": 0.0}, "local-steps or train.local-epochs"),
])
def test_bad_values_are_refused(overrides, message):
    with pytest.raises(UserError, match=message):
        validate(overrides)


def test_strings_from_the_command_line_are_typed():
    config = validate(parse_sets(["num-rounds=5", "train.lr=3e-4", "results.resume=false", "data.alpha=1"]))
    assert config["num-rounds"] == 5 and config["train.lr"] == 3e-4 and config["results.resume"] is False
    assert config["data.alpha"] == 1.0
    with pytest.raises(UserError, match="key=value"):
        parse_sets(["oops"])


def test_config_files_flatten_tables(tmp_path):
    (tmp_path / "c.toml").write_text('num-rounds = 2\n[train]\nlr = 0.5\n')
    assert load_file(tmp_path / "c.toml") == {"num-rounds": 2, "train.lr": 0.5}
    (tmp_path / "bad.toml").write_text("num-rounds = = 2")
    with pytest.raises(UserError, match="not valid TOML"):
        load_file(tmp_path / "bad.toml")


def test_simulate_refuses_a_bad_key_in_one_line(capsys):
    assert main(["simulate", "--set", "strategy.nmae=fedavg"]) == 2
    assert "did you mean 'strategy.name'" in capsys.readouterr().err


def test_shipped_configs_are_valid():
    from fl_offsite.data.corpora import check_public
    from fl_offsite.run.compare import load_compare_config

    plan = load_compare_config(ROOT / "simulations" / "demo.toml", {})
    runs, clients, config = plan.runs, plan.num_clients, plan.config
    assert [run["method"] for run in runs.values()] == ["offsite", "fedavg-full"]  # offsite beside its baseline
    distilled = validate({**config, **runs["offsite-distilled"]})
    assert distilled["distill.steps"] > 0
    check_public(distilled["distill.corpus"], config["task"])  # the demo never distils on the data owners' text
    assert clients == 4 and config["model"] == "smollm2-135m"
    assert 0.5 / config["eval.limit"] ** 0.5 <= 0.036  # 200 test articles: one standard error at most 3.5 points
    validate(load_file(ROOT / "simulations" / "smoke.toml"))


def test_compare_variants_are_named_runs_with_their_own_keys(tmp_path):
    from fl_offsite.run.compare import load_compare_config

    path = tmp_path / "c.toml"
    path.write_text('num-rounds = 1\n[compare]\nmethods = ["offsite", "distilled"]\n'
                    '[compare.runs.distilled]\nmethod = "offsite"\n"distill.steps" = 50\n')
    plan = load_compare_config(path, {})
    assert plan.runs == {"offsite": {"method": "offsite"}, "distilled": {"method": "offsite", "distill.steps": 50}}
    assert plan.config["distill.steps"] == 0
    assert plan.cpus_per_client == {"offsite": 1, "distilled": 1}

    path.write_text('[compare]\nmethods = ["offsite", "big"]\n"cpus-per-client" = 2\n'
                    '[compare.runs.big]\nmethod = "fedavg-full"\n"cpus-per-client" = 1\n')
    plan = load_compare_config(path, {})
    assert plan.cpus_per_client == {"offsite": 2, "big": 1} and plan.runs["big"] == {"method": "fedavg-full"}
    assert load_compare_config(path, {}, cpus_per_client=3).cpus_per_client == {"offsite": 3, "big": 3}
    assert plan.ray_address is None

    path.write_text('[compare]\nmethods = ["offsite"]\n"ray-address" = "10.0.0.1:6379"\n')
    assert load_compare_config(path, {}).ray_address == "10.0.0.1:6379"
    assert load_compare_config(path, {}, ray_address="10.0.0.2:6379").ray_address == "10.0.0.2:6379"

    path.write_text('[compare]\nmethods = ["offsite"]\n[compare.runs.distilled]\nmethod = "offsite"\n')
    with pytest.raises(UserError, match=r"\[compare.runs.distilled\] is not listed"):
        load_compare_config(path, {})
    path.write_text('[compare]\nmethods = ["x"]\n[compare.runs.x]\n"distill.step" = 5\n')
    with pytest.raises(UserError, match="needs a method"):
        load_compare_config(path, {})
    path.write_text('[compare]\nmethods = ["x"]\n[compare.runs.x]\nmethod = "offsite"\n"distill.step" = 5\n')
    with pytest.raises(UserError, match="did you mean 'distill.steps'"):
        load_compare_config(path, {})


@pytest.mark.parametrize("setting, message", [
    ("task=bbc-newz", "unknown task 'bbc-newz'"),
    (f"model={ROOT / 'no-such-model'}", "not a loadable hub id"),
    ("split.emulator-layers=5", "needs 7 blocks but"),
])
def test_simulate_refuses_configs_that_cannot_run_before_starting_anything(setting, message, tmp_path, capsys,
                                                                          tiny_lm_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    results = tmp_path / "run"
    tiny = ["--set", f"model={tiny_lm_dir}", "--set", "split.adapter-layers=1,1", "--set", "split.emulator-layers=2"]
    assert main(["simulate", *tiny, "--set", setting, "--set", f"results.dir={results}"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not results.exists()


def test_simulate_refuses_more_clients_than_the_task_can_fill(tmp_path, capsys, tiny_lm_dir):
    assert main(["simulate", "--num-clients", "1600", "--set", f"model={tiny_lm_dir}", "--set", "method=fedavg-full",
                 "--set", f"results.dir={tmp_path / 'run'}"]) == 2
    assert "cannot fill 1600 partitions" in capsys.readouterr().err


def test_simulate_refuses_distilling_on_the_tasks_own_text(tmp_path, capsys, tiny_lm_dir):
    results = tmp_path / "run"
    sets = [f"model={tiny_lm_dir}", "split.adapter-layers=1,1", "split.emulator-layers=2", "distill.steps=5",
            "distill.corpus=bbc-news", "task=bbc-news", f"results.dir={results}"]
    assert main(["simulate", *[a for s in sets for a in ("--set", s)]]) == 2
    err = capsys.readouterr().err
    assert "must not distill on their data" in err and len(err.strip().splitlines()) == 1
    assert not results.exists()


def test_every_method_is_parsed_into_an_explicit_kind_and_tuning():
    from fl_offsite.config.method import FEDAVG, OFFSITE, ZERO_SHOT, Method

    parsed = {name: Method.parse(name) for name in CHOICES["method"]}
    assert {name: (m.kind, m.tuning) for name, m in parsed.items()} == {
        "offsite": (OFFSITE, "all"), "offsite-lora": (OFFSITE, "lora"), "offsite-bitfit": (OFFSITE, "bitfit"),
        "offsite-bottleneck": (OFFSITE, "bottleneck"), "fedavg-full": (FEDAVG, "all"),
        "fedavg-lora": (FEDAVG, "lora"), "zero-shot": (ZERO_SHOT, "all")}
    assert [n for n, m in parsed.items() if m.trains_full_model] == ["fedavg-full", "fedavg-lora"]
    assert [n for n, m in parsed.items() if not m.trains] == ["zero-shot"]
    assert parsed["zero-shot"].uses_emulator and not parsed["fedavg-full"].uses_emulator
    with pytest.raises(UserError, match="method = 'fedavg' is not one of offsite, "):
        Method.parse("fedavg")


def test_strategies_are_imported_by_the_server_app_alone_and_import_no_app_module():
    import ast

    def imported(path: Path) -> set[str]:
        tree = ast.parse(path.read_text())
        return {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module} | \
            {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}

    users = sorted(p.name for p in (ROOT / "fl_offsite").rglob("*.py")
                   if any(m.split(".")[0] == "strategies" for m in imported(p)))
    assert users == ["server_app.py"]
    app = {"fl_offsite.app.server_app", "fl_offsite.app.client_app", "fl_offsite.cli.main", "fl_offsite.cli.runs", "fl_offsite.app.owner",
           "fl_offsite.run.outputs", "fl_offsite.run.compare"}
    for path in (ROOT / "strategies").glob("*.py"):
        assert not imported(path) & app, path


def test_keys_lists_every_declared_key_with_its_default(capsys):
    assert main(["keys"]) == 0
    listed = {line.split(" = ")[0]: line.split(" = ")[1] for line in capsys.readouterr().out.splitlines()
              if not line.startswith(" ")}
    assert listed.keys() == DEFAULTS.keys()
    assert listed["strategy.name"].startswith("'fedavg'  [fedavg | fedprox")
    assert main(["keys", "lora."]) == 0
    assert [line.split(" = ")[0] for line in capsys.readouterr().out.splitlines() if not line.startswith(" ")] == \
        ["lora.r", "lora.alpha", "lora.dropout"]


def test_each_key_is_declared_once_and_read_into_its_field():
    from dataclasses import replace

    from fl_offsite.config.settings import Settings

    settings = Settings.from_config({"lora.r": 7, "method": "offsite-lora", "distill.steps": 5,
                                     "distill.block-size": 64, "split.drop-ratio": 0.5, "fleet.emulator-layers": "2,3"})
    assert settings.tuning.lora.r == 7 and settings.emulator.distill.steps == 5
    assert settings.realign.block_size == 64  # shared with distill.block-size, declared there
    assert settings.emulator.drop_ratio == 0.5 and settings.emulator.emulator_layers is None
    assert settings.fleet.emulator_layers == (2, 3)
    defaults, seeded = Settings(), Settings.from_config({})  # the fields' defaults are the config's, but for the
    assert seeded == replace(defaults, train=replace(defaults.train, seed=1234),  # run seed, which from_config
                             realign=replace(defaults.realign, seed=1234))  # hands to the sections that draw


@pytest.mark.parametrize("key, value, message", [
    ("train.lr", "-1", "train.lr must be > 0"), ("strategy.max-update-norm", "nan", "must be a finite number"),
    ("dp.noise-multiplier", "inf", "must be a finite number"), ("strategy.min-train-nodes", "0", "must be >= 1"),
    ("data.alpha", "0", "data.alpha must be > 0"), ("train.weight-decay", "-0.1", "must be >= 0")])
def test_numbers_out_of_range_or_not_finite_are_refused(key, value, message):
    with pytest.raises(UserError, match=message):
        validate({key: value})
