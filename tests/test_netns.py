"""The SuperLink and two SuperNodes on separate network stacks, as on separate machines.

Three Linux network namespaces made by the test: the model owner's holds a bridge with 198.18.0.1,
each data owner's a veth to it with its own address (198.18.0.0/15 is set aside for network tests;
it is used only inside these namespaces, so all traffic stays on this machine). The SuperLink has a
certificate for 198.18.0.1 and admits registered nodes only; every process is ended by its PID and
the namespaces are deleted.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fl_offsite.tasks import load_task
from test_deploy import federation, free_port, tiny_run_config

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


@pytest.mark.slow
@pytest.mark.skipif(bool(reason := _no_namespaces()), reason=reason or "")
def test_separate_network_stacks_tls_node_auth_and_a_refused_node(tmp_path: Path, tiny_lm_dir, private_cache,
                                                                   capsys) -> None:
    load_task("bbc-news")  # the model owner's task, cached while this machine reaches PyPI: the namespaces do not
    start = time.perf_counter()
    with namespaces() as ns, federation(tmp_path, [LINK], netns=ns["link"]) as fed:
        def node(name: str, where: str, data: str) -> subprocess.Popen:
            """NAME's SuperNode (its key), in data owner WHERE's namespace, training on DATA's file."""
            return fed.start(name, "supernode", "--superlink", f"{LINK}:{fed.port}", "--port", str(free_port()),
                             "--ca", str(tmp_path / "certs" / "ca.crt"), "--key", str(tmp_path / "keys" / name),
                             "--data-path", str(tmp_path / f"{data}.jsonl"), "--cache-dir",
                             str(tmp_path / f"cache-{name}"), "--partition-id", str(list(OWNERS).index(data)),
                             netns=ns[where])

        for owner in OWNERS:
            node(owner, owner, owner)
        mallory = node("mallory", "alice", "alice")  # not registered, from alice's network

        results = tmp_path / "results"
        run = fed.run("run", {**tiny_run_config(tiny_lm_dir, results), "num-rounds": 1})
        assert run.wait(timeout=900) == 0, fed.log("run")[-3000:]
        assert mallory.wait(timeout=60) == 2
        unreachable = _connects(ns["alice"], "127.0.0.1", fed.port)  # the SuperLink is not on alice's loopback
    wall = time.perf_counter() - start

    rounds = [json.loads(line) for line in (results / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [0, 1]
    for record in rounds[1:]:
        assert record["problems"] == [] and sorted(c["partition-id"] for c in record["clients"]) == [0, 1]
    delivery = json.loads((results / "delivery.json").read_text())
    assert sorted(delivery["deliveries"][0]["bytes_per_node"].values()) == [delivery["package_bytes"]] * 2
    assert (results / "adapter.safetensors").is_file()
    assert "refused this node: its public key" in fed.log("mallory")
    assert "REFUSED a SuperNode whose public key is not registered" in fed.log("superlink")
    assert not unreachable
    with capsys.disabled():
        print(f"\nseparate network stacks: {wall:.1f} s in all, rounds "
              f"{[round(r['seconds'], 1) for r in rounds[1:]]} s")


def _connects(netns: str, host: str, port: int) -> bool:
    probe = f"import socket; socket.create_connection(({host!r}, {port}), timeout=3)"
    return subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", probe], capture_output=True,
                           check=False).returncode == 0
