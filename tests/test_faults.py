"""Hostile or lost clients, differential privacy, and a server killed with SIGKILL then resumed."""
from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.exception import PrivacyBudgetExhausted

from fl_offsite.app.client_app import app as client_app
from fl_offsite.app.server_app import run_federated
from fl_offsite.ops.flower_cli import tagged_processes
from fl_offsite.surgery.split import load_adapter
from fl_offsite.testing.flower import (
    Crash,
    InProcessGrid,
    checkpointed_round,
    crash_in_round,
    rounds_of,
    run,
    tiny_config,
    wait_until,
)

pytestmark = pytest.mark.usefixtures("private_cache")


def boosted_update(msg, node_index):
    """Node 0 returns the global adapter moved far away (a scaled, poisoned update)."""
    if msg.metadata.message_type != "train" or node_index != 0:
        return None
    bad = {k: v + 1.0 for k, v in msg.content["arrays"].to_torch_state_dict().items()}
    return Message(RecordDict({"arrays": ArrayRecord(bad), "metrics": MetricRecord({"num-examples": 10})}),
                   reply_to=msg)


def test_updates_beyond_the_norm_bound_are_rejected_and_logged(tiny_lm_dir, tmp_path):
    config = tiny_config(tiny_lm_dir, tmp_path / "run", **{"num-rounds": 1, "strategy.max-update-norm": 5.0})
    run(config, num_nodes=3, fault=boosted_update)
    record = rounds_of(tmp_path / "run")[-1]
    (problem,) = record["problems"]
    assert problem["kind"] == "rejected" and "exceeds strategy.max-update-norm = 5" in problem["reason"]
    assert len(record["clients"]) == 2 and all(0 < c["update-norm"] <= 5.0 for c in record["clients"])


def _corrupt(kind: str, arrays: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    first = sorted(arrays)[0]
    if kind == "wrong-shape":
        return {**arrays, first: arrays[first][..., :-1]}
    if kind == "missing-key":
        return {k: v for k, v in arrays.items() if k != first}
    if kind == "extra-key":
        return {**arrays, "model.layers.99.mlp.weight": arrays[first]}
    if kind == "wrong-dtype":
        return {**arrays, first: arrays[first].double()}
    return {**arrays, first: torch.full_like(arrays[first], float("inf"))}


@pytest.mark.parametrize("kind, reason", [("wrong-shape", "has shape"), ("missing-key", "lacks 1 tensor"),
                                          ("extra-key", "unexpected tensor"), ("wrong-dtype", "has dtype"),
                                          ("inf", "NaN or Inf")])
def test_malformed_updates_are_rejected_with_the_reason(tiny_lm_dir, tmp_path, kind, reason):
    def fault(msg, node_index):
        if msg.metadata.message_type != "train" or node_index != 0:
            return None
        bad = _corrupt(kind, msg.content["arrays"].to_torch_state_dict())
        return Message(RecordDict({"arrays": ArrayRecord(bad), "metrics": MetricRecord({"num-examples": 10})}),
                       reply_to=msg)

    run(tiny_config(tiny_lm_dir, tmp_path / "run", **{"num-rounds": 1}), num_nodes=3, fault=fault)
    record = rounds_of(tmp_path / "run")[-1]
    (problem,) = record["problems"]
    assert problem["kind"] == "rejected" and reason in problem["reason"]
    assert len(record["clients"]) == 2


def test_a_client_that_never_replies_is_counted_missing(tiny_lm_dir, tmp_path):
    """What a straggler cut off by the round timeout looks like to the strategy: no reply at all."""
    config = tiny_config(tiny_lm_dir, tmp_path / "run", **{"num-rounds": 1, "strategy.round-timeout": 7.0})
    grid = run(config, num_nodes=3,
               fault=lambda msg, i: False if msg.metadata.message_type == "train" and i == 2 else None)
    record = rounds_of(tmp_path / "run")[-1]
    assert record["missing"] == 1 and len(record["clients"]) == 2
    assert record["problems"] == [{"node": grid.node_ids[2], "kind": "missing",
                                   "reason": "no reply within strategy.round-timeout = 7 s"}]


def test_a_late_reply_to_an_earlier_round_is_never_aggregated(tiny_lm_dir, tmp_path):
    """Node 0 misses round 1; in round 2 its round-1 reply turns up instead of a round-2 one."""
    held = {}

    def late(msg, node_index):
        if msg.metadata.message_type != "train" or node_index != 0:
            return None
        if msg.content["config"]["round"] == 1:
            held["reply"] = client_app(msg, grid.contexts[msg.metadata.dst_node_id])  # computed, not delivered
            return False
        return held["reply"]

    config = tiny_config(tiny_lm_dir, tmp_path / "run", **{"num-rounds": 2, "strategy.min-train-nodes": 1})
    grid = InProcessGrid(client_app, 2, config, fault=late)
    run_federated(grid, config)
    first, second = rounds_of(tmp_path / "run")[1:]
    assert [p["kind"] for p in first["problems"]] == ["missing"]
    assert [(p["node"], p["kind"]) for p in second["problems"]] == [(grid.node_ids[0], "rejected"),
                                                                     (grid.node_ids[0], "missing")]
    assert "a reply to no message of this round" in second["problems"][0]["reason"]
    assert [(c["node"], c["round"]) for c in second["clients"]] == [(grid.node_ids[1], 2)]


def test_differential_privacy_clips_updates_and_reports_epsilon(tiny_lm_dir, tmp_path):
    dp = {"dp.noise-multiplier": 1.0, "dp.clipping-norm": 0.5, "num-rounds": 2}
    grid = run(tiny_config(tiny_lm_dir, tmp_path / "dp", **dp), num_nodes=2)
    rounds = rounds_of(tmp_path / "dp")
    epsilons = [r["privacy"]["epsilon"] for r in rounds[1:]]
    assert 0 < epsilons[0] < epsilons[1] and rounds[-1]["privacy"]["delta"] == 1e-5
    assert all(c["update-norm"] <= 0.5 + 1e-4 for r in rounds[1:] for c in r["clients"])  # clipped on the client
    assert all(m.content["config"]["clipping_norm"] == 0.5 for m in grid.sent if m.metadata.message_type == "train")

    # Resuming keeps the accountant: epsilon after round 2 is the same as without the interruption.
    resumed = tiny_config(tiny_lm_dir, tmp_path / "resumed", **dp)
    with pytest.raises(Crash):
        run(resumed, num_nodes=2, fault=crash_in_round(2))
    run(resumed, num_nodes=2)
    assert rounds_of(tmp_path / "resumed")[-1]["privacy"] == rounds[-1]["privacy"]


def test_privacy_budget_stops_the_run_before_it_is_exceeded(tiny_lm_dir, tmp_path):
    dp = {"dp.noise-multiplier": 1.0, "dp.max-epsilon": 1.0, "num-rounds": 3}
    with pytest.raises(PrivacyBudgetExhausted, match="exceed max_epsilon"):
        run(tiny_config(tiny_lm_dir, tmp_path / "dp", **dp), num_nodes=2)


def tiny_job(tiny_lm_dir, results) -> dict:
    """The tiny job of :func:`simulate`, as run-config keys."""
    return {"model": str(tiny_lm_dir), "num-rounds": 3, "split.adapter-layers": "1,1", "split.emulator-layers": 2,
            "train.local-steps": 2, "train.batch-size": 4, "train.max-length": 64, "eval.limit": 6,
            "results.dir": str(results)}


def simulate(tiny_lm_dir, results, *settings: str, actors: int = 2) -> subprocess.Popen:
    """`fl-offsite simulate` of the tiny job with 2 clients, in a session of its own, on ``actors`` Ray actors
    (1: one actor with all the CPUs takes both nodes' messages in turn, and imports the ClientApp once)."""
    cpus = (os.cpu_count() or 1) if actors == 1 else 1
    args = [sys.executable, "-m", "fl_offsite.cli", "simulate", "--num-clients", "2", "--cpus-per-client", str(cpus)]
    for item in [*(f"{k}={v}" for k, v in tiny_job(tiny_lm_dir, results).items()), *settings]:
        args += ["--set", item]
    with Path(f"{results}.log").open("wb") as out:
        return subprocess.Popen(args, start_new_session=True, stdout=out, stderr=subprocess.STDOUT)


def launch_log(results: Path):
    """What :func:`simulate` of ``results`` has written to its log so far."""
    return lambda: Path(f"{results}.log").read_text(errors="replace")


@pytest.mark.slow(seconds=110)
def test_server_killed_with_sigkill_resumes_to_the_same_result(tiny_lm_dir, tmp_path):
    """`fl-offsite simulate` on Ray, SIGKILLed (the launcher and its session) once round 1 is checkpointed, then
    run again: the new launch stops what the killed one left running, resumes from the checkpoint, and ends as the
    same job run uninterrupted (in process, as the simulation's 2 nodes: partitions 0 and 1 of 2)."""
    from fl_offsite.config.settings import validate

    rounds = 5  # a round of this tiny job takes a second or two: room for a slow scan of /proc before the kill
    run(validate({**tiny_job(tiny_lm_dir, tmp_path / "straight"), "data.num-partitions": 2, "num-rounds": rounds}),
        num_nodes=2)

    victim = simulate(tiny_lm_dir, tmp_path / "killed", f"num-rounds={rounds}", actors=1)
    # What it started in sessions of its own (SuperLink, SuperExec, the simulation, Ray) lives on and would finish
    # the run by itself: frozen here, so that the run can only end by resuming; the next launch must stop it.
    # Found once the models are delivered (a scan of /proc on a busy machine outlasts a round or two of this tiny
    # job), and frozen right after the kill, which comes as soon as round 1 is checkpointed.
    killed_launch = lambda tag: tag.startswith(f"{victim.pid}:")
    wait_until(lambda: (tmp_path / "killed" / "delivery.json").is_file(), victim, "the delivery",
               launch_log(tmp_path / "killed"))
    left = tagged_processes(killed_launch)
    wait_until(lambda: checkpointed_round(tmp_path / "killed") >= 1, victim, "round 1", launch_log(tmp_path / "killed"))
    os.killpg(victim.pid, signal.SIGKILL)  # the launcher and everything in its session, without warning
    for process in left:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.suspend()
    victim.wait()
    left = tagged_processes(killed_launch)  # and any it started since the first scan
    assert left
    for process in left:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.suspend()
    # killed before the last round; a resume starts from the checkpoint, which can be a round behind the records
    # (the record goes first)
    killed_at = checkpointed_round(tmp_path / "killed")
    assert 1 <= killed_at < rounds

    resumed = simulate(tiny_lm_dir, tmp_path / "killed", f"num-rounds={rounds}", actors=1)
    assert resumed.wait(timeout=600) == 0
    log = launch_log(tmp_path / "killed")()
    # stopped by a new launch: this one, or that of a test running beside it (any launch stops every stale one)
    assert not tagged_processes(killed_launch)
    assert re.search(rf"Resuming \S+ after round {killed_at}\b", log), log[-3000:]
    a, _ = load_adapter(tmp_path / "straight" / "adapter.safetensors")
    b, _ = load_adapter(tmp_path / "killed" / "adapter.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    rounds = lambda name: [(r["round"], r["eval"]["plugin"]["acc"], r["eval"]["emulator"]["acc"])
                           for r in rounds_of(tmp_path / name)]
    assert rounds("killed") == rounds("straight")


@pytest.mark.slow(seconds=120)
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds Ray's actors by /proc/PID/environ")
def test_a_straggler_is_cut_off_at_the_round_timeout_and_its_late_reply_is_never_aggregated(tiny_lm_dir, tmp_path,
                                                                                           capsys):
    """`fl-offsite simulate` on Ray: 2 nodes, 2 client actors. One actor is stopped (SIGSTOP) once the emulator
    is delivered, so it sleeps through round 1, and resumed (SIGCONT) when round 1 is on record: it then
    finishes its round-1 training and replies, late."""
    # rounds only (the delivery's first queries wait at least 600 s); round 1 imports the training stack in the
    # other actor: 20 s ran out for both nodes on a loaded 2-core machine
    timeout, start = 60, time.perf_counter()
    launcher = simulate(tiny_lm_dir, tmp_path / "run", "num-rounds=2", "strategy.min-train-nodes=1",
                        f"strategy.round-timeout={timeout}")
    ours = lambda tag: tag.startswith(f"{launcher.pid}:")
    wait_until(lambda: (tmp_path / "run" / "delivery.json").is_file(), launcher, "the delivery",
               launch_log(tmp_path / "run"))
    actors = wait_until(lambda: sorted(p.pid for p in tagged_processes(ours) if "ClientAppActor" in _cmdline(p)),
                        launcher, "the actors started", launch_log(tmp_path / "run"))
    assert len(actors) == 2
    assert {psutil.Process(pid).nice() for pid in actors} == {0}  # not Ray's default 15: RAY_worker_niceness
    os.kill(actors[0], signal.SIGSTOP)
    try:
        metrics = tmp_path / "run" / "metrics.jsonl"  # rounds 0 and 1 on record
        wait_until(lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 2, launcher, "round 1",
                   launch_log(tmp_path / "run"))
    finally:
        os.kill(actors[0], signal.SIGCONT)
    assert launcher.wait(timeout=600) == 0

    first, second = rounds_of(tmp_path / "run")[1:]
    (problem,) = first["problems"]
    assert problem["kind"] == "missing" and problem["reason"] == f"no reply within strategy.round-timeout = {timeout} s"
    (client,) = first["clients"]
    assert client["node"] != problem["node"] and client["round"] == 1 and first["missing"] == 1
    assert first["seconds"] >= timeout  # the round waited for the straggler, then closed with the other node
    assert second["problems"] == []  # the late round-1 reply was neither pulled nor averaged in
    assert sorted(c["node"] for c in second["clients"]) == sorted([client["node"], problem["node"]])
    assert [c["round"] for c in second["clients"]] == [2, 2]
    with capsys.disabled():
        print(f"\nstraggler test: {time.perf_counter() - start:.1f} s, round 1 {first['seconds']:.1f} s, "
              f"round 2 {second['seconds']:.1f} s")


def _cmdline(process) -> str:
    try:
        return " ".join(process.cmdline())
    except psutil.Error:
        return ""


@pytest.mark.parametrize("damaged", ["payload.safetensors", "strategy.safetensors", "strategy.json", "round.json"])
def test_a_corrupt_checkpoint_is_reported_not_loaded(tiny_lm_dir, tmp_path, damaged):
    from fl_offsite.errors import UserError

    config = tiny_config(tiny_lm_dir, tmp_path / "run", **{"num-rounds": 1})
    run(config, num_nodes=2)
    before = (tmp_path / "run" / "metrics.jsonl").read_bytes()
    path = tmp_path / "run" / "checkpoint" / damaged
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(UserError, match="corrupt|cannot be read|truncated"):
        run({**config, "num-rounds": 2}, num_nodes=2)
    assert (tmp_path / "run" / "metrics.jsonl").read_bytes() == before  # nothing finished is lost
