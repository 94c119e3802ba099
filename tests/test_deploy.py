"""Deployment engine on loopback: a SuperLink and SuperNodes started with the user's commands, TLS and
node authentication on, each node training on its own JSONL file; refusals give clear errors."""
from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from fl_offsite.cli import app_dir, main
from fl_offsite.deploy import (
    SuperLinkSettings,
    SuperNodeSettings,
    make_certs,
    make_node_key,
    run_app,
    runtime_env,
)
from fl_offsite.errors import UserError
from fl_offsite.launch import TAG_VAR, _stop_processes, _tagged_processes
from fl_offsite.local_data import write_examples
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
    """Processes of one loopback federation; every one carries ``tag`` in its environment."""

    root: Path
    port: int
    env: dict[str, str]
    tag: str
    processes: list[subprocess.Popen] = field(default_factory=list)

    def start(self, name: str, *args: str) -> subprocess.Popen:
        """``fl-offsite ARGS`` in the background, output in ROOT/NAME.log."""
        with (self.root / f"{name}.log").open("wb") as out:
            process = subprocess.Popen([sys.executable, "-m", "fl_offsite.cli", *args], env=self.env,
                                       stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        self.processes.append(process)
        return process

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")

    def wait_for(self, name: str, text: str, process: subprocess.Popen, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log(name):
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{name} never logged {text!r}:\n{self.log(name)[-3000:]}")
            time.sleep(0.3)

    def node(self, name: str, *extra: str) -> subprocess.Popen:
        return self.start(name, "supernode", "--superlink", f"127.0.0.1:{self.port}", "--port", str(free_port()),
                          "--cache-dir", str(self.root / f"cache-{name}"), *extra)

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
        _stop_processes(lambda tag: tag == self.tag)  # SuperExec and ClientApps run in sessions of their own


@contextlib.contextmanager
def loopback_federation(root: Path) -> Iterator[Federation]:
    """Certificates, node keys for alice, bob and mallory, data files for alice and bob, and a SuperLink
    on 127.0.0.1 admitting alice and bob; every process is stopped on exit."""
    me = psutil.Process()
    tag = f"{me.pid}:{me.create_time()!r}:{uuid.uuid4().hex}"  # the launcher's tag format: never taken for stale
    env = runtime_env({"FLWR_HOME": str(root / "flwr-home"), TAG_VAR: tag,
                       "PYTHONPATH": os.pathsep.join(filter(None, [str(app_dir()), os.environ.get("PYTHONPATH")]))})
    fed = Federation(root, free_port(), env, tag)
    make_certs(root / "certs", ["127.0.0.1", "localhost"])
    for name in ("alice", "bob", "mallory"):
        make_node_key(root / "keys", name)
    for i, name in enumerate(("alice", "bob")):
        write_examples(root / f"{name}.jsonl", [ChoiceExample(f"Article: {text}\nTopic:", TOPICS, label)
                                                for text, label in ARTICLES[i:] + ARTICLES[:i]])
    try:
        link = fed.start("superlink", "superlink", "--certs", str(root / "certs"), "--host", "127.0.0.1",
                         "--port", str(fed.port), "--node-key", str(root / "keys" / "alice.pub"),
                         "--node-key", str(root / "keys" / "bob.pub"))
        fed.wait_for("superlink", "SuperLink ready", link)
        yield fed
    finally:
        fed.stop()
        left = [p.pid for p in _tagged_processes(lambda tag: tag == fed.tag)]
        assert not left, f"processes of the federation still running: {left}"


def tiny_run_config(model_dir: Path, results: Path) -> dict:
    """The tiny federated job of tests/test_federated.py, 2 rounds."""
    return {"model": str(model_dir), "task": "bbc-news", "num-rounds": 2, "split.adapter-layers": "1,1",
            "split.emulator-layers": 2, "train.local-steps": 2, "train.batch-size": 4, "train.max-length": 64,
            "train.lr": 1e-3, "eval.limit": 6, "results.dir": str(results), "strategy.round-timeout": 300.0}


@pytest.fixture
def federation(tmp_path: Path, private_cache) -> Iterator[Federation]:
    with loopback_federation(tmp_path) as fed:
        yield fed


@pytest.mark.slow
@linux_only
def test_two_data_owners_train_over_tls_and_an_unlisted_node_is_refused(federation: Federation, tiny_lm_dir,
                                                                         tmp_path: Path, capsys) -> None:
    fed, keys = federation, tmp_path / "keys"
    for name in ("alice", "bob"):
        fed.node(name, "--ca", str(tmp_path / "certs" / "ca.crt"), "--key", str(keys / name),
                 "--data-path", str(tmp_path / f"{name}.jsonl"), "--partition-id", str(("alice", "bob").index(name)))
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

    from fl_offsite.deploy import server_names

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
    node = SuperNodeSettings(superlink="fl.example.org:9093", ca=tmp_path / "certs" / "ca.crt", key=private,
                             data_path=tmp_path / "x y.jsonl", partition_id=1)
    assert node.node_config() == f'data-path="{tmp_path}/x y.jsonl" partition-id=1'
