"""End-to-end: ``run_simulation_app`` runs a toy Flower app through ``flwr run`` on Ray and cleans up."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from fl_offsite.errors import UserError
from fl_offsite.ops.flower_app import app_dir
from fl_offsite.ops.flower_cli import tagged_processes
from fl_offsite.ops.simulation import run_simulation_app
from fl_offsite.testing.flower import checkpointed_round, rounds_of, run, wait_until

PYPROJECT = """\
[project]
name = "toyapp"
version = "1.0.0"
dependencies = []

[tool.flwr.app]
publisher = "fl-offsite-tests"

[tool.flwr.app.components]
serverapp = "toy:server_app"
clientapp = "toy:client_app"

[tool.flwr.app.config]
num-rounds = 1
out = ""
note = ""
lr = 0.5
flag = false
fail = false
"""

TOY = '''\
import json

import numpy as np
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

client_app = ClientApp()


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    arrays = ArrayRecord([a.numpy() + 1.0 for a in msg.content["arrays"].values()])
    return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": 1})}), reply_to=msg)


server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    config = dict(context.run_config)
    if config["fail"]:
        raise ValueError("boom from the toy ServerApp")
    rounds = []

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        rounds.append(server_round)
        return MetricRecord({})

    strategy = FedAvg(fraction_evaluate=0.0, min_train_nodes=2, min_available_nodes=2)
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord([np.zeros(3, dtype=np.float32)]),
                            num_rounds=config["num-rounds"], evaluate_fn=evaluate_fn)
    with open(config["out"], "w") as f:
        json.dump({"run_config": config, "rounds": max(rounds),
                   "arrays": [a.numpy().tolist() for a in result.arrays.values()]}, f)
'''

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/PID/environ")


@pytest.fixture
def toy_app(tmp_path: Path) -> Path:
    app = tmp_path / "toyapp"
    app.mkdir()
    (app / "pyproject.toml").write_text(PYPROJECT)
    (app / "toy.py").write_text(TOY)
    return app


def processes_of(flwr_home: Path) -> list[str]:
    """Live processes started for this FLWR_HOME: every process of a launch inherits the variable.
    (Reads /proc: Ray's setproctitle hides the environment from psutil.)"""
    needle = f"FLWR_HOME={flwr_home}".encode()
    found = []
    for process in psutil.process_iter(["cmdline", "status"]):
        try:
            environ = Path(f"/proc/{process.pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if needle in environ and process.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(f"{process.pid} {' '.join(process.info['cmdline'] or [])[:100]}")
    return found


@pytest.mark.slow(seconds=30)
@linux_only
def test_runs_app_with_overrides_and_cleans_up(toy_app: Path, tmp_path: Path) -> None:
    out, home = tmp_path / "result.json", tmp_path / "flwr-home"
    overrides = {"out": str(out), "note": "two words, 'single' and \"double\" quotes = \\ é",
                 "num-rounds": 2, "lr": 0.125, "flag": True}
    run_simulation_app(toy_app, overrides, num_supernodes=2, flwr_home=home, stream=False)

    result = json.loads(out.read_text())
    assert result["run_config"] == {**overrides, "fail": False}
    assert result["rounds"] == 2
    assert result["arrays"] == [[2.0, 2.0, 2.0]]  # each round the two clients add 1 to the average
    assert (home / "run.log").is_file()
    assert processes_of(home) == []


@pytest.mark.slow(seconds=25)
@linux_only
def test_failing_server_app_raises_and_cleans_up(toy_app: Path, tmp_path: Path) -> None:
    home = tmp_path / "flwr-home"
    with pytest.raises(RuntimeError, match=r"finished:failed.*boom from the toy ServerApp"):
        run_simulation_app(toy_app, {"fail": True}, num_supernodes=2, flwr_home=home, stream=False)
    assert processes_of(home) == []


def test_rejects_what_flwr_would_reject_late(toy_app: Path) -> None:
    with pytest.raises(UserError, match="not in \\[tool.flwr.app.config\\]"):
        run_simulation_app(toy_app, {"num-round": 2}, num_supernodes=2)
    with pytest.raises(UserError, match="whole number"):
        run_simulation_app(toy_app, {}, num_supernodes=2, cpus_per_client=0.5)
    with pytest.raises(UserError, match="no pyproject.toml"):
        run_simulation_app(toy_app.parent, {}, num_supernodes=2)


@pytest.mark.slow(seconds=70)
@linux_only
def test_sigterm_mid_round_stops_every_process_and_the_run_resumes(tmp_path: Path, tiny_lm_dir, private_cache
                                                                   ) -> None:
    """`fl-offsite simulate` as a batch scheduler or `timeout` stops it: SIGTERM once round 1 of 8 is checkpointed.
    Every process the command started (SuperLink, SuperExec, flwr-simulation, Ray's GCS, raylet and actors) is
    gone within seconds, the command exits 130, and the run resumes from its last checkpoint. Rounds of this tiny
    job take a second or two: with 3 of them, the run could end while the signal was being handled."""
    results, log = tmp_path / "results", tmp_path / "simulate.log"
    rounds = 8
    sets = {"model": tiny_lm_dir, "num-rounds": rounds, "split.adapter-layers": "1,1", "split.emulator-layers": 2,
            "train.local-steps": 2, "train.batch-size": 4, "train.max-length": 64, "eval.limit": 6,
            "results.dir": results}
    env = {**os.environ,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(app_dir()), os.environ.get("PYTHONPATH")]))}
    with log.open("wb") as out:
        launcher = subprocess.Popen(
            [sys.executable, "-m", "fl_offsite.cli", "simulate", "--num-clients", "2",
             "--cpus-per-client", str(os.cpu_count() or 1),  # one Ray actor takes both nodes' messages in turn
             *[item for key, value in sets.items() for item in ("--set", f"{key}={value}")]],
            env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    ours = lambda tag: tag.startswith(f"{launcher.pid}:")  # noqa: E731 - the launch tag starts with its pid
    try:
        wait_until(lambda: checkpointed_round(results) >= 1, launcher, "round 1", log.read_text, timeout=300)
        launcher.send_signal(signal.SIGTERM)  # at once: a scan of /proc first can outlast the run's last round
        sent = time.monotonic()
        running = len(tagged_processes(ours))  # for the report below: those the signal is stopping
        code = launcher.wait(timeout=60)
        stopped_s = time.monotonic() - sent
        left = [f"{p.pid} {' '.join(p.cmdline())[:80]}" for p in tagged_processes(ours)]
    finally:
        launcher.kill()
        for process in tagged_processes(ours):
            process.kill()
    assert not left, f"processes of the stopped run still running: {left}"
    assert code == 130 and "stopped; every process it started has ended" in log.read_text(), log.read_text()[-2000:]
    # well under the 60 s wait: the grace periods add up to 8 s (14 s with the waits after SIGKILL); with /proc
    # scans and process exits it took 21.8 s once on a 2-core machine at a load of about 13
    assert stopped_s < 40, f"stopping took {stopped_s:.1f} s"
    done = checkpointed_round(results)
    assert 1 <= done < rounds and [r["round"] for r in rounds_of(results)][-1] == done
    grid = run(json.loads((results / "config.json").read_text()), num_nodes=2)  # the same run, resumed
    assert [r["round"] for r in rounds_of(results)] == list(range(rounds + 1))
    assert {m.content["config"]["round"] for m in grid.sent if m.metadata.message_type == "train"} == \
        set(range(done + 1, rounds + 1))
    print(f"\nSIGTERM after round {done}: {running} processes stopped in {stopped_s:.1f} s")
