"""Deployment engine on loopback: a SuperLink and SuperNodes started with the user's commands, TLS and
node authentication on, each node training on its own JSONL file; refusals give clear errors."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
import torch

from fl_offsite.certs import make_certs, make_node_key, server_names
from fl_offsite.cli import main
from fl_offsite.deploy import SuperLinkSettings, SuperNodeSettings, run_app, runtime_env
from fl_offsite.errors import UserError
from fl_offsite.local_data import write_examples
from fl_offsite.processes import TAG_VAR, app_dir, new_launch_tag, stop_processes, tagged_processes
from fl_offsite.split import load_adapter
from fl_offsite.tasks import BBC_TOPICS, ChoiceExample

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/PID/environ")
TOPICS = [f" {t}" for t in BBC_TOPICS]
ARTICLES = [("Quarterly profits at the media giant jumped as advert sales rose.", 0),
            ("The band released a new album and the film won an award.", 1),
            ("The minister told parliament the election will be held in May.", 2),
            ("The striker scored twice as the club won the cup final.", 3),
            ("The phone maker showed a faster chip and new software.", 4)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Federation:
    """Processes of one federation; every one carries ``tag`` in its environment."""

    root: Path
    port: int
    env: dict[str, str]
    tag: str
    superlink_args: list[str] = field(default_factory=list)
    netns: str | None = None  # the SuperLink's network namespace, if not this one
    processes: list[subprocess.Popen] = field(default_factory=list)

    def start(self, name: str, *args: str, netns: str | None = None) -> subprocess.Popen:
        """``fl-offsite ARGS`` in the background (in network namespace ``netns``), output in ROOT/NAME.log."""
        prefix = ["ip", "netns", "exec", netns] if netns else []  # it execs the command: same PID
        with (self.root / f"{name}.log").open("wb") as out:
            process = subprocess.Popen([*prefix, sys.executable, "-m", "fl_offsite.cli", *args], env=self.env,
                                       stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        self.processes.append(process)
        return process

    def start_superlink(self, name: str = "superlink") -> subprocess.Popen:
        link = self.start(name, "superlink", *self.superlink_args, netns=self.netns)
        self.wait_for(name, "SuperLink ready", link)
        return link

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")

    def wait_for(self, name: str, text: str, process: subprocess.Popen, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log(name):
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{name} never logged {text!r}:\n{self.log(name)[-3000:]}")
            time.sleep(0.3)

    def node(self, name: str, *extra: str, cache: str | None = None) -> subprocess.Popen:
        return self.start(name, "supernode", "--superlink", f"127.0.0.1:{self.port}", "--port", str(free_port()),
                          "--cache-dir", str(self.root / f"cache-{cache or name}"), *extra)

    def owner(self, name: str, log: str | None = None) -> subprocess.Popen:
        """Data owner NAME's SuperNode (alice: partition 0, bob: 1) on its own file, with its key."""
        return self.node(log or name, "--ca", str(self.root / "certs" / "ca.crt"), "--key",
                         str(self.root / "keys" / name), "--data-path", str(self.root / f"{name}.jsonl"),
                         "--partition-id", str(("alice", "bob").index(name)), cache=name)

    def run(self, name: str, config: dict) -> subprocess.Popen:
        """``fl-offsite run`` of ``config`` on this federation (in the SuperLink's namespace)."""
        sets = [item for key, value in config.items() for item in ("--set", f"{key}={value}")]
        return self.start(name, "run", "--connection", "fl-offsite-deploy", *sets, netns=self.netns)

    def stop(self) -> None:
        for process in self.processes:  # our own children first, by PID
            with contextlib.suppress(psutil.Error):
                for child in psutil.Process(process.pid).children(recursive=True):
                    child.terminate()
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        stop_processes(lambda tag: tag == self.tag)  # SuperExec and ClientApps run in sessions of their own


@contextlib.contextmanager
def federation(root: Path, cert_hosts: Sequence[str], *link_args: str, netns: str | None = None
               ) -> Iterator[Federation]:
    """Certificates for ``cert_hosts``, node keys for alice, bob and mallory, data files for alice and bob,
    and a SuperLink (``fl-offsite superlink LINK_ARGS``, in ``netns``) admitting alice and bob; every
    process is stopped on exit."""
    tag = new_launch_tag()
    env = runtime_env({"FLWR_HOME": str(root / "flwr-home"), TAG_VAR: tag,
                       "PYTHONPATH": os.pathsep.join(filter(None, [str(app_dir()), os.environ.get("PYTHONPATH")]))})
    port = free_port()
    make_certs(root / "certs", cert_hosts)
    for name in ("alice", "bob", "mallory"):
        make_node_key(root / "keys", name)
    for i, name in enumerate(("alice", "bob")):
        write_examples(root / f"{name}.jsonl", [ChoiceExample(f"Article: {text}\nTopic:", TOPICS, label)
                                                for text, label in ARTICLES[i:] + ARTICLES[:i]])
    args = ["--certs", str(root / "certs"), "--port", str(port), "--node-key", str(root / "keys" / "alice.pub"),
            "--node-key", str(root / "keys" / "bob.pub"), *link_args]
    fed = Federation(root, port, env, tag, args, netns)
    try:
        fed.start_superlink()
        yield fed
    finally:
        fed.stop()
        left = [p.pid for p in tagged_processes(lambda tag: tag == fed.tag)]
        assert not left, f"processes of the federation still running: {left}"


def tiny_run_config(model_dir: Path, results: Path) -> dict:
    """The tiny federated job of tests/test_federated.py, 2 rounds."""
    return {"model": str(model_dir), "task": "bbc-news", "num-rounds": 2, "split.adapter-layers": "1,1",
            "split.emulator-layers": 2, "train.local-steps": 2, "train.batch-size": 4, "train.max-length": 64,
            "train.lr": 1e-3, "eval.limit": 6, "results.dir": str(results), "strategy.round-timeout": 300.0}


@pytest.fixture
def loopback(tmp_path: Path, private_cache) -> Iterator[Federation]:
    with federation(tmp_path, ["127.0.0.1", "localhost"], "--host", "127.0.0.1") as fed:
        yield fed


@pytest.mark.slow
@linux_only
def test_two_data_owners_train_over_tls_and_an_unlisted_node_is_refused(loopback: Federation, tiny_lm_dir,
                                                                         tmp_path: Path, capsys) -> None:
    fed, keys = loopback, tmp_path / "keys"
    for name in ("alice", "bob"):
        fed.owner(name)
    mallory = fed.node("mallory", "--ca", str(tmp_path / "certs" / "ca.crt"), "--key", str(keys / "mallory"),
                       "--data-path", str(tmp_path / "alice.jsonl"))
    make_certs(tmp_path / "other-ca", ["127.0.0.1"])
    stranger = fed.node("stranger", "--ca", str(tmp_path / "other-ca" / "ca.crt"), "--key", str(keys / "bob"),
                        "--data-path", str(tmp_path / "bob.jsonl"))

    results = tmp_path / "results"
    config = tiny_run_config(tiny_lm_dir, results)
    start = time.perf_counter()
    run_app(app_dir(), "fl-offsite-deploy", config, env=fed.env, log_path=tmp_path / "run.log", stream=False)
    wall = time.perf_counter() - start

    rounds = [json.loads(line) for line in (results / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    for record in rounds[1:]:
        assert record["problems"] == [] and record["missing"] == 0
        assert sorted(c["partition-id"] for c in record["clients"]) == [0, 1]
        assert all(c["num-examples"] == 5 for c in record["clients"])  # each node's own file
    delivery = json.loads((results / "delivery.json").read_text())
    (first,) = delivery["deliveries"]
    assert sorted(first["bytes_per_node"].values()) == [delivery["package_bytes"]] * 2  # emulator sent once each
    assert (results / "adapter.safetensors").is_file()
    for name in ("alice", "bob"):
        assert list((tmp_path / f"cache-{name}").glob("model-*/model.safetensors"))

    # The refused nodes tried to join while the others trained.
    assert mallory.wait(timeout=60) == 2
    assert "refused this node: its public key" in fed.log("mallory") and "mallory.pub" in fed.log("mallory")
    assert "REFUSED a SuperNode whose public key is not registered" in fed.log("superlink")
    assert stranger.wait(timeout=60) == 2
    assert "TLS check of 127.0.0.1" in fed.log("stranger")
    with capsys.disabled():
        print(f"\ndeployment (TLS + node auth, 2 SuperNodes): run {wall:.1f} s, per round "
              f"{[round(r['seconds'], 1) for r in rounds[1:]]} s")


def _checkpointed_round(results: Path) -> int:
    """The round of the run's checkpoint, -1 while there is none (or it is being replaced)."""
    try:
        return json.loads((results / "checkpoint" / "round.json").read_text())["round"]
    except (OSError, ValueError):
        return -1


@pytest.mark.slow
@linux_only
def test_killed_superlink_and_supernode_come_back_and_the_run_resumes_to_the_same_adapter(
        tmp_path: Path, tiny_lm_dir, private_cache, capsys) -> None:
    """After round 1, SIGKILL the SuperLink with everything it started (SuperExec, ServerApp: its machine
    died) and bob's SuperNode. Then what docs/deployment.md tells the model owner and bob to do: start
    them again with the same commands (--database, --cache-dir), and `fl-offsite run` the same config."""
    start = time.perf_counter()
    results = tmp_path / "results"
    config = {**tiny_run_config(tiny_lm_dir, results), "num-rounds": 3}
    with federation(tmp_path, ["127.0.0.1"], "--host", "127.0.0.1", "--database", str(tmp_path / "state.db")) as fed:
        nodes = {name: fed.owner(name) for name in ("alice", "bob")}
        first = fed.run("run", config)
        metrics = results / "metrics.jsonl"
        deadline = time.monotonic() + 600
        while _checkpointed_round(results) < 1:  # round 1 on record and checkpointed (the record goes first)
            assert first.poll() is None and time.monotonic() < deadline, fed.log("run")[-3000:]
            time.sleep(0.3)
        round_1 = metrics.read_text().splitlines()[1]
        _kill_tree(fed.processes[0].pid)
        _kill_tree(nodes["bob"].pid)
        assert first.wait(timeout=120) != 0  # `fl-offsite run` lost its SuperLink
        killed_at = len(metrics.read_text().splitlines()) - 1

        fed.start_superlink("superlink-2")
        # bob's killed session counts as online until it misses two heartbeats; the node retries until then
        fed.wait_for("bob-2", "SuperNode ID:", fed.owner("bob", log="bob-2"))
        assert fed.run("run-2", config).wait(timeout=900) == 0, fed.log("run-2")[-3000:]
    wall = time.perf_counter() - start

    rounds = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["round"] for r in rounds] == [0, 1, 2, 3] and metrics.read_text().splitlines()[1] == round_1
    assert all(r["problems"] == [] and len(r["clients"]) == 2 for r in rounds[1:])
    first_start, restart = json.loads((results / "delivery.json").read_text())["deliveries"]
    assert set(restart["bytes_per_node"].values()) == {0}  # bob's restarted node still had the emulator
    assert "Resuming" in fed.log("run-2") and f"after round {killed_at}" in fed.log("run-2")
    straight = _in_process(config, tmp_path)
    resumed, _ = load_adapter(results / "adapter.safetensors")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    with capsys.disabled():
        print(f"\nSuperLink and SuperNode killed after round {killed_at} and restarted: {wall:.1f} s in all")


def _kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants at once, as a power cut would."""
    process = psutil.Process(pid)
    for victim in [*process.children(recursive=True), process]:
        with contextlib.suppress(psutil.NoSuchProcess):
            victim.kill()


def _in_process(config: dict, root: Path) -> dict[str, torch.Tensor]:
    """The same job uninterrupted, on the same nodes' files, with the ServerApp and ClientApp in this process."""
    from fl_offsite.client_app import app as client_app
    from fl_offsite.config import validate
    from fl_offsite.server_app import run_federated
    from flower_harness import InProcessGrid

    config = validate({**config, "results.dir": str(root / "straight")})
    grid = InProcessGrid(client_app, 2, config)
    for name, node in zip(("alice", "bob"), grid.node_ids):
        grid.contexts[node].node_config.update({"data-path": str(root / f"{name}.jsonl"),
                                                "cache-dir": str(root / f"cache-straight-{name}")})
    run_federated(grid, config)
    return load_adapter(root / "straight" / "adapter.safetensors")[0]


# --- fast checks: refusals before any process starts --------------------------------------

def test_insecure_is_refused_outside_loopback(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not loopback"):
        SuperLinkSettings(certs=None, host="0.0.0.0").check()
    with pytest.raises(UserError, match="not loopback"):
        SuperNodeSettings(superlink="example.org:9093", ca=None, key=None, partition_id=0).check()
    SuperNodeSettings(superlink="127.0.0.1:9093", ca=None, key=None, partition_id=0).check()


def test_missing_or_bad_files_give_clear_errors(tmp_path: Path, capsys) -> None:
    assert main(["superlink", "--certs", str(tmp_path / "nowhere")]) == 2
    assert "nowhere/ca.crt is missing: make the certificates with `fl-offsite certs" in capsys.readouterr().err
    assert main(["supernode", "--superlink", "127.0.0.1:9093", "--ca", str(tmp_path / "ca.crt"),
                 "--partition-id", "0"]) == 2
    assert "ca.crt: no such file; get ca.crt from the model owner" in capsys.readouterr().err
    make_certs(tmp_path / "certs", ["127.0.0.1"])
    (tmp_path / "key").write_text("not a key")
    node = {"superlink": "127.0.0.1:9093", "ca": tmp_path / "certs" / "ca.crt", "partition_id": 0}
    with pytest.raises(UserError, match="not an unencrypted OpenSSH private key"):
        SuperNodeSettings(key=tmp_path / "key", **node).check()
    with pytest.raises(UserError, match="--data-path FILE.jsonl"):
        SuperNodeSettings(**{**node, "partition_id": None}, key=None).check()


def test_certificates_and_keys_are_what_flower_loads(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key
    from flwr.cli.supernode.register import try_load_public_key

    make_certs(tmp_path / "certs", ["127.0.0.1", "fl.example.org"])
    assert server_names(tmp_path / "certs") == ["127.0.0.1", "fl.example.org"]
    assert oct((tmp_path / "certs" / "server.key").stat().st_mode & 0o777) == "0o600"
    with pytest.raises(UserError, match="exists"):
        make_certs(tmp_path / "certs", ["127.0.0.1"])
    private, public = make_node_key(tmp_path / "keys", "alice")
    load_ssh_private_key(private.read_bytes(), None)
    assert try_load_public_key(public)
    link = SuperLinkSettings(certs=tmp_path / "certs", host="0.0.0.0", port=9093)
    assert link.client_address() == "127.0.0.1:9093"
    make_certs(tmp_path / "public", ["fl.example.org"])  # 127.0.0.1 added: the SuperLink's SuperExec dials it
    assert server_names(tmp_path / "public") == ["fl.example.org", "127.0.0.1"]
    SuperLinkSettings(certs=tmp_path / "public", host="0.0.0.0").check()
    with pytest.raises(UserError, match="does not name ::1, where the SuperLink's own SuperExec connects"):
        SuperLinkSettings(certs=tmp_path / "public", host="::").check()
    node = SuperNodeSettings(superlink="fl.example.org:9093", ca=tmp_path / "certs" / "ca.crt", key=private,
                             data_path=tmp_path / "x y.jsonl", partition_id=1)
    assert node.node_config() == f'data-path="{tmp_path}/x y.jsonl" partition-id=1'
    from flwr.common.config import parse_config_args

    from fl_offsite.fleet import NodeProfile, node_profile
    from fl_offsite.settings import Settings

    small = dataclasses.replace(node, memory_budget_mb=2048.0, emulator_layers=2)  # as Flower parses --node-config
    assert node_profile(parse_config_args([small.node_config()]), Settings.from_config({}).fleet) == \
        NodeProfile(memory_budget_mb=2048.0, emulator_layers=2)
