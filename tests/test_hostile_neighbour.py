"""A hostile neighbour: a data owner who holds ``ca.crt``, a registered node key and the SuperLink's address, and
tries to use Flower's other APIs there (start its own app, list runs and nodes, take the ServerApp's task).

flwr 1.42 serves its Fleet, Control and runtime APIs on one port, and the Control API has no authentication in
Flower's open edition. ``fl-offsite superlink`` binds the SuperLink to loopback and gives the data owners a gate
that passes only the Fleet API (``fl_offsite.ops.fleet_gate``). Also here: a node started with
``--trusted-entities`` refuses an app no trusted key signed (in flwr 1.42, every app not from Flower Hub).
"""
from __future__ import annotations

import json
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from flwr.superlink.routers.control import router as control_router
from flwr.superlink.routers.fleet.router import router as fleet_router
from test_deploy import federation, linux_only
from test_launch import PYPROJECT

from fl_offsite.ops.fleet_gate import MAX_REQUEST_BYTES, gate_app, passes
from fl_offsite.ops.flower_cli import executable, write_connection

PROBE = '''\
import json
import time

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

client_app = ClientApp()


@client_app.query("hello")
def hello(msg: Message, context: Context) -> Message:
    answer = ConfigRecord({"partition": context.node_config["partition-id"]})
    return Message(RecordDict({"answer": answer}), reply_to=msg)


server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    deadline = time.monotonic() + 120
    while len(nodes := list(grid.get_node_ids())) < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    asks = [Message(RecordDict({"q": ConfigRecord({})}), dst_node_id=n, message_type="query.hello") for n in nodes]
    replies = list(grid.send_and_receive(asks, timeout=120))
    with open(context.run_config["out"], "w") as f:
        json.dump({"answered": [r.content["answer"]["partition"] for r in replies if not r.has_error()],
                   "refused": [r.error.reason for r in replies if r.has_error()]}, f)
'''


def test_the_gate_passes_the_fleet_api_and_nothing_else() -> None:
    fleet = [route.path for route in fleet_router.routes]
    control = [route.path for route in control_router.routes]
    assert len(fleet) == 12 and all(passes("POST", path) for path in fleet)
    assert control and not any(passes("POST", path) for path in control)
    for method, path in [("POST", "/v1/runtime/acquire-task"), ("POST", "/v1/runtime/pull-messages"),
                         ("GET", "/docs"), ("GET", "/openapi.json"), ("GET", "/v1/fleet/pull-messages"),
                         ("POST", "/v1/fleet/../control/start-run"), ("POST", "/v1/fleet/"),
                         ("POST", "/v1/fleet/pull-messages/x"), ("POST", "/v1/fleetx/pull-messages"),
                         ("POST", "/V1/fleet/pull-messages"), ("POST", "/health")]:
        assert not passes(method, path), (method, path)
    assert passes("GET", "/health") and passes("HEAD", "/health")


def test_the_gate_answers_what_it_refuses_itself() -> None:
    """In process, no SuperLink behind it: refused paths get 404, an oversized body 413, both before any
    connection to the SuperLink; a Fleet call to a SuperLink that is down gets 502."""
    from starlette.testclient import TestClient

    with TestClient(gate_app("http://127.0.0.1:9", verify=False)) as gate:
        assert gate.post("/v1/control/start-run", content=b"x").status_code == 404
        assert gate.get("/docs").status_code == 404
        assert gate.post("/v1/fleet/push-object", content=b"\0" * (MAX_REQUEST_BYTES + 1)).status_code == 413
        assert gate.post("/v1/fleet/pull-messages", content=b"").status_code == 502


def _toy_app(root: Path) -> Path:
    app = root / "probeapp"
    app.mkdir()
    (app / "pyproject.toml").write_text(PYPROJECT.replace('"toy:', '"probe:'))
    (app / "probe.py").write_text(PROBE)
    return app


def _trusted_entities(path: Path) -> Path:
    """A YAML file naming one Ed25519 key (the model owner's, say) as the only entity whose apps may run."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    public = Ed25519PrivateKey.generate().public_key().public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH)
    path.write_text(f"fpk_model_owner: '{public.decode()}'\n")
    return path


def _flwr(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([executable("flwr"), *args], env=env, stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=timeout, check=False)


@pytest.mark.slow(seconds=35)
@linux_only
def test_a_data_owner_cannot_start_a_run_and_a_node_that_asks_for_signatures_refuses_an_unsigned_app(
        tmp_path: Path) -> None:
    """alice (ca.crt, registered key, node running) points Flower's CLI at the address she was given: every
    Control API call and the runtime API's task are refused there, and no run of hers exists; her own node's
    runtime API refuses a task to a caller without the node's SuperExec secret. The model owner's
    own run, from its machine, reaches both nodes: alice's answers, bob's (started with --trusted-entities)
    refuses the app, which no trusted key signed."""
    start = time.perf_counter()
    app, out = _toy_app(tmp_path), tmp_path / "replies.json"
    ca = tmp_path / "certs" / "ca.crt"
    with federation(tmp_path, ["127.0.0.1"], "--host", "127.0.0.1") as fed:
        nodes = {name: fed.node(name, "--ca", str(ca), "--key", str(tmp_path / "keys" / name), "--partition-id",
                                str(i), "--num-partitions", "2", *extra)
                 for i, (name, extra) in enumerate([("alice", ()), ("bob", (
                     "--trusted-entities", str(_trusted_entities(tmp_path / "trusted.yaml"))))])}
        for name, node in nodes.items():
            fed.wait_for(name, "SuperNode ID:", node, timeout=120)

        neighbour = {**fed.env, "FLWR_HOME": str(tmp_path / "alice-flwr")}
        write_connection("given", f"127.0.0.1:{fed.port}", ca, tmp_path / "alice-flwr")
        attempts = {"run": _flwr(neighbour, "run", str(app), "given", "--run-config", f'out="{tmp_path}/x.json"'),
                    "ls": _flwr(neighbour, "ls", "given"), "nodes": _flwr(neighbour, "supernode", "list", "given")}
        trust = ssl.create_default_context(cafile=str(ca))
        task = {port: httpx.post(f"https://127.0.0.1:{port}/v1/runtime/acquire-task", verify=trust, content=b"",
                                 headers={"content-type": "application/protobuf"}).status_code
                for port in (fed.port, fed.control_port)}
        node_task = httpx.post(f"http://127.0.0.1:{fed.runtime_ports['alice']}/v1/runtime/acquire-task",
                               content=b"", headers={"content-type": "application/protobuf"})
        runs = _flwr(fed.env, "ls", "fl-offsite-deploy", "--format", "json")

        owner = _flwr(fed.env, "run", str(app), "fl-offsite-deploy", "--stream", "--run-config", f'out="{out}"',
                      timeout=300)
    wall = time.perf_counter() - start

    for what, attempt in attempts.items():
        output = attempt.stdout + attempt.stderr
        assert attempt.returncode != 0 and "404 Not Found" in output, (what, output[-2000:])
    assert "Successfully started run" not in attempts["run"].stdout
    assert task == {fed.port: 404, fed.control_port: 200}  # flwr 1.42 hands its task out to anyone who asks
    # alice's own node hands its ClientApp tasks only to its SuperExec, which holds the node's secret
    assert node_task.status_code == 401 and "Authentication failed" in node_task.text, node_task.text
    assert json.loads(runs.stdout[runs.stdout.index("{"):])["runs"] == []  # alice started nothing
    assert "REFUSED POST /v1/control/start-run" in fed.log("superlink")
    assert out.is_file(), owner.stdout[-3000:] + owner.stderr[-2000:]
    assert json.loads(out.read_text()) == {"answered": [0], "refused": ["The FAB could not be verified."]}
    assert "REFUSED the run's app: no key in --trusted-entities signed it" in fed.log("bob")
    print(f"\nhostile neighbour refused, unsigned app refused by the node: {wall:.1f} s", file=sys.stderr)
