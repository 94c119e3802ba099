"""Deployment engine: a SuperLink and SuperNodes started with the user's commands, TLS and node authentication
on, each node training on its own JSONL file; refusals give clear errors; a killed SuperLink and SuperNode come
back and the run resumes.

Where this machine can make Linux network namespaces (root, iproute2), the federation runs on separate network
stacks, as on separate machines: the model owner's namespace holds a bridge with 198.18.0.1, each data owner's
a veth to it with its own address (198.18.0.0/15 is set aside for network tests; it is used only inside these
namespaces, so all traffic stays on this machine). Elsewhere it runs on loopback. Every process is ended by its
PID and the namespaces are deleted.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
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

from fl_offsite.cli.main import main
from fl_offsite.data.local_file import write_examples
from fl_offsite.data.tasks import BBC_TOPICS, ChoiceExample, load_task
from fl_offsite.errors import UserError
from fl_offsite.ops.certs import make_certs, make_node_key, server_names
from fl_offsite.ops.deployment import SuperLinkSettings, SuperNodeSettings, runtime_env, superlink_command
from fl_offsite.ops.flower_app import app_dir
from fl_offsite.ops.flower_cli import TAG_VAR, new_launch_tag, stop_processes, tagged_processes
from fl_offsite.surgery.split import load_adapter
from fl_offsite.testing.flower import InProcessGrid, checkpointed_round, wait_until

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
    port: int  # the data owners' port (the Fleet gate)
    control_port: int  # the SuperLink's own, with the Control API, on the model owner's loopback
    env: dict[str, str]
    tag: str
    superlink_args: list[str] = field(default_factory=list)
    netns: str | None = None  # the SuperLink's network namespace, if not this one
    host: str = "127.0.0.1"  # the SuperLink's address, as the nodes dial it
    owner_netns: dict[str, str] = field(default_factory=dict)  # data owner -> their network namespace
    processes: list[subprocess.Popen] = field(default_factory=list)
    runtime_ports: dict[str, int] = field(default_factory=dict)  # node -> its local runtime API's port

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
        wait_until(lambda: text in self.log(name), process, f"{name} logged {text!r}", lambda: self.log(name),
                   timeout)

    def node(self, name: str, *extra: str, cache: str | None = None, owner: str | None = None) -> subprocess.Popen:
        """A SuperNode NAME (on data owner OWNER's network, if it has one of its own)."""
        self.runtime_ports[name] = free_port()
        return self.start(name, "supernode", "--superlink", f"{self.host}:{self.port}", "--port",
                          str(self.runtime_ports[name]),
                          "--cache-dir", str(self.root / f"cache-{cache or name}"), *extra,
                          netns=self.owner_netns.get(owner or ""))

    def owner(self, name: str, *extra: str, log: str | None = None) -> subprocess.Popen:
        """Data owner NAME's SuperNode (alice: partition 0, bob: 1) on its own file, with its key."""
        return self.node(log or name, "--ca", str(self.root / "certs" / "ca.crt"), "--key",
                         str(self.root / "keys" / name), "--data-path", str(self.root / f"{name}.jsonl"),
                         "--partition-id", str(("alice", "bob").index(name)), *extra, cache=name, owner=name)

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
def federation(root: Path, cert_hosts: Sequence[str], *link_args: str, netns: str | None = None,
               owner_netns: dict[str, str] | None = None) -> Iterator[Federation]:
    """Certificates for ``cert_hosts`` (the first: the address the nodes dial), node keys for alice, bob and
    mallory, data files for alice and bob, and a SuperLink (``fl-offsite superlink LINK_ARGS``, in ``netns``)
    admitting alice and bob; the owners' nodes run in ``owner_netns``; every process is stopped on exit."""
    tag = new_launch_tag()
    env = runtime_env({"FLWR_HOME": str(root / "flwr-home"), TAG_VAR: tag,
                       "PYTHONPATH": os.pathsep.join(filter(None, [str(app_dir()), os.environ.get("PYTHONPATH")]))})
    port, control_port = free_port(), free_port()
    make_certs(root / "certs", cert_hosts)
    for name in ("alice", "bob", "mallory"):
        make_node_key(root / "keys", name)
    for i, name in enumerate(("alice", "bob")):
        write_examples(root / f"{name}.jsonl", [ChoiceExample(f"Article: {text}\nTopic:", TOPICS, label)
                                                for text, label in ARTICLES[i:] + ARTICLES[:i]])
    args = ["--certs", str(root / "certs"), "--port", str(port), "--control-port", str(control_port),
            "--node-key", str(root / "keys" / "alice.pub"), "--node-key", str(root / "keys" / "bob.pub"), *link_args]
    fed = Federation(root, port, control_port, env, tag, args, netns, cert_hosts[0], owner_netns or {})
    try:
        fed.start_superlink()
        yield fed
    finally:
        fed.stop()
        left = [p.pid for p in tagged_processes(lambda tag: tag == fed.tag)]
        assert not left, f"processes of the federation still running: {left}"


LINK = "198.18.0.1"
OWNERS = {"alice": "198.18.0.2", "bob": "198.18.0.3"}


def _no_namespaces() -> str | None:
    """Why this machine cannot make network namespaces, or None when it can."""
    if not sys.platform.startswith("linux"):
        return "network namespaces are Linux only"
    if os.geteuid() != 0:
        return "making network namespaces needs root"
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2)"
    probe = f"fl-probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, check=False)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], check=True)
    return None


@contextlib.contextmanager
def namespaces() -> Iterator[dict[str, str]]:
    """Namespaces ``link`` (bridge with LINK) and one per data owner (veth to the bridge); deleted on exit."""
    tag = f"fl{os.getpid() % 100_000}"
    names = {role: f"{tag}-{role}" for role in ("link", *OWNERS)}
    ip = lambda *args: subprocess.run(["ip", *args], check=True, capture_output=True)
    made: list[str] = []
    try:
        for ns in names.values():
            ip("netns", "add", ns)
            made.append(ns)
            ip("-n", ns, "link", "set", "lo", "up")
        link = names["link"]
        ip("-n", link, "link", "add", "br0", "type", "bridge")
        ip("-n", link, "addr", "add", f"{LINK}/24", "dev", "br0")
        ip("-n", link, "link", "set", "br0", "up")
        for i, (owner, address) in enumerate(OWNERS.items()):
            veth = f"{tag}v{i}"  # made here, then both ends moved: nothing is left in this namespace
            ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", names[owner])
            ip("link", "set", veth, "netns", link)
            ip("-n", link, "link", "set", veth, "master", "br0", "up")
            ip("-n", names[owner], "addr", "add", f"{address}/24", "dev", "eth0")
            ip("-n", names[owner], "link", "set", "eth0", "up")
        yield names
    finally:
        for i in range(len(OWNERS)):  # only if a step above failed before the move
            subprocess.run(["ip", "link", "del", f"{tag}v{i}"], capture_output=True, check=False)
        for ns in made:  # deletes the veths and the bridge inside
            subprocess.run(["ip", "netns", "del", ns], check=False)


def _connects(netns: str, host: str, port: int) -> bool:
    probe = f"import socket; socket.create_connection(({host!r}, {port}), timeout=3)"
    return subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", probe], capture_output=True,
                          check=False).returncode == 0


def tiny_run_config(model_dir: Path, results: Path) -> dict:
    """The tiny federated job of tests/test_federated.py, 2 rounds."""
    return {"model": str(model_dir), "task": "bbc-news", "num-rounds": 2, "split.adapter-layers": "1,1",
            "split.emulator-layers": 2, "train.local-steps": 2, "train.batch-size": 4, "train.max-length": 64,
            "train.lr": 1e-3, "eval.limit": 6, "results.dir": str(results), "strategy.round-timeout": 300.0}


@pytest.mark.slow(seconds=220)
@linux_only
def test_two_data_owners_train_over_tls_refuse_strangers_and_resume_after_a_kill_to_the_same_adapter(
        tmp_path: Path, tiny_lm_dir, private_cache, capsys) -> None:
    """One federation (TLS, node authentication; on separate network stacks where this machine can make them):
    alice and bob train on their own files (ClientApps forked warm) while a node signed by another CA is turned
    away. After round 1, SIGKILL the SuperLink with everything it started (SuperExec, ServerApp: its machine
    died) and bob's SuperNode. Then what docs/deployment.md tells the model owner and bob to do: start them
    again with the same commands (--database, --cache-dir; bob's ClientApps now cold), and `fl-offsite run` the
    same config; meanwhile mallory, whose key is not registered, tries to join the restarted SuperLink from
    alice's network."""
    load_task("bbc-news")  # the model owner's task, cached while this machine reaches PyPI: the namespaces do not
    start = time.perf_counter()
    results, keys = tmp_path / "results", tmp_path / "keys"
    config = tiny_run_config(tiny_lm_dir, results)  # 2 rounds: killed after round 1, resumed for round 2
    with contextlib.ExitStack() as stack:
        ns = None if _no_namespaces() else stack.enter_context(namespaces())
        host, link_args = (LINK, []) if ns else ("127.0.0.1", ["--host", "127.0.0.1"])
        fed = stack.enter_context(federation(
            tmp_path, [host, "localhost"], *link_args, "--database", str(tmp_path / "state.db"),
            netns=ns and ns["link"], owner_netns={owner: ns[owner] for owner in OWNERS} if ns else {}))
        nodes = {name: fed.owner(name) for name in ("alice", "bob")}
        make_certs(tmp_path / "other-ca", [host])
        stranger = fed.node("stranger", "--ca", str(tmp_path / "other-ca" / "ca.crt"), "--key", str(keys / "bob"),
                            "--data-path", str(tmp_path / "bob.jsonl"), owner="bob")
        first = fed.run("run", config)
        metrics = results / "metrics.jsonl"
        # round 1 on record and checkpointed (the record goes first)
        wait_until(lambda: checkpointed_round(results) >= 1, first, "round 1", lambda: fed.log("run"))
        round_1 = metrics.read_text().splitlines()[1]
        _kill_tree(fed.processes[0].pid)
        _kill_tree(nodes["bob"].pid)
        assert first.wait(timeout=120) != 0  # `fl-offsite run` lost its SuperLink
        killed_at = checkpointed_round(results)  # what a resume starts from (a record can be ahead of it)
        assert stranger.wait(timeout=60) == 2  # it tried while the others trained
        assert f"TLS check of {host}" in fed.log("stranger")

        fed.start_superlink("superlink-2")
        mallory = fed.node("mallory", "--ca", str(tmp_path / "certs" / "ca.crt"), "--key", str(keys / "mallory"),
                           "--data-path", str(tmp_path / "alice.jsonl"), owner="alice")
        bob = fed.owner("bob", "--cold-clientapps", log="bob-2")  # Flower's own: a fresh process per message
        straight = _in_process(config, tmp_path)  # the same job uninterrupted, while bob waits
        # bob's killed session counts as online until it misses two heartbeats; the node retries until then
        fed.wait_for("bob-2", "SuperNode ID:", bob)
        assert fed.run("run-2", config).wait(timeout=900) == 0, fed.log("run-2")[-3000:]
        assert mallory.wait(timeout=120) == 2  # refused for the whole of the node's retries (75 s)
        unreachable = ns and _connects(ns["alice"], "127.0.0.1", fed.port)  # not on alice's loopback
        control_reachable = ns and _connects(ns["alice"], LINK, fed.control_port)  # on the owner's loopback only
    wall = time.perf_counter() - start

    rounds = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["round"] for r in rounds] == [0, 1, 2] and metrics.read_text().splitlines()[1] == round_1
    for record in rounds[1:]:
        assert record["problems"] == [] and record["missing"] == 0
        assert sorted(c["partition-id"] for c in record["clients"]) == [0, 1]
        assert all(c["num-examples"] == 5 for c in record["clients"])  # each node's own file
    delivery = json.loads((results / "delivery.json").read_text())
    first_start, restart = delivery["deliveries"]
    assert sorted(first_start["bytes_per_node"].values()) == [delivery["package_bytes"]] * 2  # emulator sent once each
    assert set(restart["bytes_per_node"].values()) == {0}  # bob's restarted node still had the emulator
    for name in ("alice", "bob"):
        assert list((tmp_path / f"cache-{name}").glob("model-*/model.safetensors"))
    assert "Resuming" in fed.log("run-2") and f"after round {killed_at}" in fed.log("run-2")
    for name, warm in (("alice", True), ("bob", True), ("bob-2", False)):  # ClientApps forked warm, or cold
        assert ("forked from the warm process" in fed.log(name)) == warm, name
        assert "reached its handler" in fed.log(name) and "fork server unavailable" not in fed.log(name)
    assert "refused this node: its public key" in fed.log("mallory") and "mallory.pub" in fed.log("mallory")
    assert "REFUSED a SuperNode whose public key is not registered" in fed.log("superlink-2")
    assert not unreachable and not control_reachable
    resumed, _ = load_adapter(results / "adapter.safetensors")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    with capsys.disabled():
        print(f"\ndeployment ({'separate network stacks' if ns else 'loopback'}, TLS + node auth, 2 SuperNodes), "
              f"SuperLink and SuperNode killed after round {killed_at} and restarted: {wall:.1f} s in all, "
              f"per round {[round(r['seconds'], 1) for r in rounds[1:]]} s")


def _kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants at once, as a power cut would."""
    process = psutil.Process(pid)
    for victim in [*process.children(recursive=True), process]:
        with contextlib.suppress(psutil.NoSuchProcess):
            victim.kill()


def _in_process(config: dict, root: Path) -> dict[str, torch.Tensor]:
    """The same job uninterrupted, on the same nodes' files, with the ServerApp and ClientApp in this process."""
    from fl_offsite.app.client_app import app as client_app
    from fl_offsite.app.server_app import run_federated
    from fl_offsite.config.settings import validate

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
    with pytest.raises(UserError, match="binds 10.0.0.1, which is not loopback"):
        SuperLinkSettings(certs=None, control_host="10.0.0.1").check()
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
    link = SuperLinkSettings(certs=tmp_path / "certs", host="0.0.0.0", port=9093, control_port=9092)
    assert link.client_address() == "127.0.0.1:9092"  # the Control API, for flwr on this machine
    with pytest.raises(UserError, match="--port and --control-port are both 9093"):
        SuperLinkSettings(certs=tmp_path / "certs", host="0.0.0.0", control_port=9093).check()
    make_certs(tmp_path / "public", ["fl.example.org"])  # 127.0.0.1 added: the SuperLink's SuperExec dials it
    assert server_names(tmp_path / "public") == ["fl.example.org", "127.0.0.1"]
    SuperLinkSettings(certs=tmp_path / "public", host="0.0.0.0").check()
    with pytest.raises(UserError, match="does not name ::1, where the SuperLink's own SuperExec connects"):
        SuperLinkSettings(certs=tmp_path / "public", host="0.0.0.0", control_host="::").check()
    node = SuperNodeSettings(superlink="fl.example.org:9093", ca=tmp_path / "certs" / "ca.crt", key=private,
                             data_path=tmp_path / "x y.jsonl", partition_id=1)
    assert node.node_config() == f'data-path="{tmp_path}/x y.jsonl" partition-id=1'
    from flwr.common.config import parse_config_args

    from fl_offsite.app.profile import NodeProfile, node_profile
    from fl_offsite.config.settings import Settings

    small = dataclasses.replace(node, memory_budget_mb=2048.0, emulator_layers=2)  # as Flower parses --node-config
    assert node_profile(parse_config_args([small.node_config()]), Settings.from_config({}).fleet) == \
        NodeProfile(memory_budget_mb=2048.0, emulator_layers=2)


def test_flower_flags_after_a_double_dash_reach_flower_but_cannot_undo_ours(tmp_path: Path, capsys) -> None:
    """`fl-offsite supernode ... -- --max-retries 0`: flower-supernode gives up at once and the node's error says
    why, read from Flower's exit code 305. A flag fl-offsite sets, or --insecure, is refused before any start."""
    node = ["supernode", "--superlink", "127.0.0.1:1", "--insecure", "--partition-id", "0", "--num-partitions", "2"]
    assert main([*node, "--", "--max-retries", "0"]) == 2
    assert "could not reach the SuperLink at 127.0.0.1:1" in capsys.readouterr().err
    for flag in ("--insecure", "--node-config=x=1"):
        assert main([*node, "--", flag]) == 2
        assert f"{flag.split('=')[0]} after --: fl-offsite supernode sets it" in capsys.readouterr().err
    make_certs(tmp_path / "certs", ["127.0.0.1"])
    link = SuperLinkSettings(certs=tmp_path / "certs", flower_args=("--isolation", "subprocess"))
    assert superlink_command(link)[-2:] == ["--isolation", "subprocess"]
    with pytest.raises(UserError, match="--ssl-keyfile after --"):
        superlink_command(dataclasses.replace(link, flower_args=("--ssl-keyfile", "other.key")))
    with pytest.raises(SystemExit):
        main(["simulate", "--", "--insecure"])
    assert "only `fl-offsite superlink` and `fl-offsite supernode` take them" in capsys.readouterr().err


def test_a_stopped_fl_offsite_run_stops_its_run_on_the_superlink(tmp_path: Path, monkeypatch) -> None:
    """Ctrl-C or SIGTERM to `fl-offsite run` ends the local `flwr run` and sends `flwr stop` for the run."""
    from fl_offsite.ops import deployment
    from fl_offsite.ops.flower_cli import RunInterrupted

    def interrupted(*args, **kwargs):
        raise RunInterrupted(7)

    calls = []
    monkeypatch.setattr(deployment, "flwr_run", interrupted)
    monkeypatch.setattr(deployment, "connection_address", lambda connection, env: "127.0.0.1:9092")
    monkeypatch.setattr(deployment.subprocess, "run", lambda command, **kwargs: calls.append(command))
    with pytest.raises(KeyboardInterrupt):
        deployment.run_app(tmp_path, "fl-offsite-deploy", {}, env={})
    assert [c[1:] for c in calls] == [["stop", "7", "fl-offsite-deploy"]]
