"""A simulation on a real Ray cluster of two raylets: ``ray start --head`` and ``ray start --address`` as
separate processes on this machine, each with one CPU and a resource of its own; ``fl-offsite simulate
--ray-address`` runs the clients there, on both raylets, and the cluster is stopped by its process ids."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import psutil
import pytest

from fl_offsite.ops.flower_cli import TAG_VAR, new_launch_tag, stop_processes, tagged_processes
from fl_offsite.ops.simulation import _free_port

RAY = str(Path(sys.executable).parent / "ray")


class ActorWatch(threading.Thread):
    """Notes, every 0.2 s, which raylets have a ClientApp actor among their worker processes (Ray's process
    titles name the actor class; the state API needs Ray's dashboard, which Flower does not install)."""

    def __init__(self, raylets: list[psutil.Process]) -> None:
        super().__init__(daemon=True)
        self.raylets, self.seen, self.stop = raylets, set[int](), threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.2):
            for raylet in self.raylets:
                with contextlib.suppress(psutil.Error):
                    if any("ClientAppActor" in " ".join(child.cmdline()) for child in raylet.children(recursive=True)):
                        self.seen.add(raylet.pid)


@pytest.mark.slow(seconds=90)
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the cluster's processes are found via /proc")
def test_the_clients_of_a_simulation_run_on_both_raylets_of_a_cluster(tmp_path, tiny_lm_dir, private_cache):
    from fl_offsite.cli.main import main

    port, tag = _free_port(), new_launch_tag()
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # Ray's socket paths must stay short
    env = {**os.environ, TAG_VAR: tag, "RAY_USAGE_STATS_ENABLED": "0"}
    common = ["--num-cpus", "1", "--object-store-memory", str(100 * 2**20), "--node-ip-address", "127.0.0.1",
              "--disable-usage-stats"]
    address = f"127.0.0.1:{port}"
    try:
        subprocess.run([RAY, "start", "--head", "--port", str(port), "--temp-dir", temp, "--include-dashboard",
                        "false", "--resources", json.dumps({"head": 1}), *common],
                       env=env, check=True, capture_output=True, timeout=120)
        subprocess.run([RAY, "start", "--address", address, "--resources", json.dumps({"second": 1}), *common],
                       env=env, check=True, capture_output=True, timeout=120)
        raylets = [p for p in tagged_processes(lambda value: value == tag) if p.name() == "raylet"]
        assert len(raylets) == 2
        watch = ActorWatch(raylets)
        watch.start()

        sets = {"model": tiny_lm_dir, "num-rounds": 1, "split.adapter-layers": "1,1", "split.emulator-layers": 2,
                "train.local-steps": 2, "train.batch-size": 4, "train.max-length": 64, "eval.limit": 6,
                "results.dir": str(tmp_path / "results")}
        assert main(["simulate", "--num-clients", "2", "--ray-address", address,
                     *[item for key, value in sets.items() for item in ("--set", f"{key}={value}")]]) == 0
        watch.stop.set()
        assert watch.seen == {raylet.pid for raylet in raylets}  # the clients ran on both raylets
        rounds = [json.loads(line) for line in (tmp_path / "results" / "metrics.jsonl").read_text().splitlines()]
        assert [r["round"] for r in rounds] == [0, 1] and len(rounds[1]["clients"]) == 2
    finally:
        stop_processes(lambda value: value == tag)  # the cluster's processes, by the PIDs their tag gives
        shutil.rmtree(temp, ignore_errors=True)
    assert not tagged_processes(lambda value: value == tag)
