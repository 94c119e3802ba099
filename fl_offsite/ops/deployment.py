"""Flower's deployment engine for real data owners: the SuperLink, the SuperNodes, and runs on them.

Roles (flwr 1.42):

* The **model owner** runs one ``flower-superlink``. flwr 1.42 serves the Fleet API (SuperNodes), the
  Control API (``flwr run``, ``flwr ls``, ``flwr supernode register``; no authentication in Flower's open
  edition) and the ServerApp's runtime API on one HTTPS port. So the SuperLink listens on 127.0.0.1
  (``control_host``, ``control_port``) and the address the data owners are given (``host``, ``port``, default
  9093) is a gate that passes only the Fleet API (:mod:`fl_offsite.ops.fleet_gate`).
* Each **data owner** runs one ``flower-supernode`` that dials out to the SuperLink (no inbound
  port needed); every message starts a fresh ``flwr-clientapp`` process on the node.

Security is on by default: TLS with a CA made by :func:`fl_offsite.ops.certs.make_certs`, and
SuperNode authentication (``--enable-supernode-auth``): only the public keys made by
:func:`fl_offsite.ops.certs.make_node_key` and registered (``flwr supernode register``) may join.
``insecure=True`` turns both off and is refused outside loopback.
"""
from __future__ import annotations

import ipaddress
import json
import logging
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from fl_offsite.errors import UserError
from fl_offsite.ops.certs import CA_CERT, SERVER_CERT, SERVER_KEY, server_names
from fl_offsite.ops.fleet_gate import FleetGate
from fl_offsite.ops.flower_cli import (
    STARTUP_TIMEOUT_S,
    RunInterrupted,
    RunNotStarted,
    connection_address,
    executable,
    flower_env,
    flower_exit_code,
    flwr_run,
    forward_output,
    json_reply,
    signals_held,
    sigterm_interrupts,
    terminate,
    wait_foreground,
    wait_healthy,
    write_connection,
)

log = logging.getLogger(__name__)

DEFAULT_PORT = 9093  # the data owners' port: the Fleet gate (flwr's default 8000 is often taken)
DEFAULT_CONTROL_PORT = 9092  # the SuperLink itself: Control, runtime and Fleet APIs, on loopback by default
DEFAULT_CONNECTION = "fl-offsite-deploy"
ACTIVATION_RETRY_S = 75.0  # flwr 1.42 keeps a vanished node online for 2 missed heartbeats of 30 s
REFUSED = "[code: 2004]"  # flower-supernode: activation refused (unknown key, or the node still online)
ACTIVATED = "SuperNode ID:"  # flower-supernode, once the SuperLink has activated it
# flower-supernode's exit codes (Flower's reference of exit codes; flwr exports no public names for them)
NODE_KEY_INVALID, TRUSTED_ENTITIES_INVALID, CONNECTION_ERROR, ADDRESS_INVALID = 302, 304, 305, 600


def is_loopback(host: str) -> bool:
    """Whether ``host`` is this machine only (where insecure mode is allowed)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


# --- the model owner's SuperLink ---------------------------------------------------------

@dataclass(frozen=True)
class SuperLinkSettings:
    certs: Path | None  # folder made by make_certs; None = insecure (loopback only)
    host: str = "127.0.0.1"  # where the data owners' SuperNodes connect (the Fleet gate); 0.0.0.0 for all interfaces
    port: int = DEFAULT_PORT
    control_host: str = "127.0.0.1"  # where the SuperLink listens: its Control API has no authentication
    control_port: int = DEFAULT_CONTROL_PORT
    node_keys: tuple[Path, ...] = ()  # public keys (or folders of *.pub) allowed to join
    node_auth: bool = True
    database: Path | None = None  # keeps runs and registered nodes across restarts
    connection: str = DEFAULT_CONNECTION
    log_file: Path | None = None
    flower_args: tuple[str, ...] = ()  # more flower-superlink flags, given after --

    def check(self) -> None:
        if self.port == self.control_port and _overlap(self.host, self.control_host):
            raise UserError(f"--port and --control-port are both {self.port}: the Fleet gate and the SuperLink "
                            "need a port each")
        if self.certs is None:
            for host in (self.host, self.control_host):
                if not is_loopback(host):
                    raise UserError(f"--insecure binds {host}, which is not loopback: outside loopback the "
                                    "SuperLink needs TLS (make certificates with `fl-offsite certs --host NAME`)")
            if self.node_keys:
                raise UserError("node authentication needs TLS: drop --insecure or the node keys")
            return
        for name in (CA_CERT, SERVER_CERT, SERVER_KEY):
            if not (self.certs / name).is_file():
                raise UserError(f"{self.certs / name} is missing: make the certificates with "
                                f"`fl-offsite certs --host NAME --out {self.certs}`")
        own = self.control_dial_host()  # where flwr's SuperExec, the gate and local flwr commands dial it
        if own not in server_names(self.certs):
            raise UserError(f"{self.certs / SERVER_CERT} does not name {own}, where the SuperLink's own SuperExec "
                            f"connects when it binds {self.control_host}: remake the certificates with `fl-offsite "
                            "certs` (it adds 127.0.0.1), or bind --control-host to a name in the certificate")
        if not self.node_auth and not is_loopback(self.host):
            raise UserError(f"node authentication is off and the SuperLink binds {self.host}: anyone who can reach "
                            "it could join; list the data owners' public keys with --node-key instead")

    @property
    def node_auth_on(self) -> bool:
        return self.certs is not None and self.node_auth

    def public_keys(self) -> list[Path]:
        keys: list[Path] = []
        for path in self.node_keys:
            found = sorted(path.glob("*.pub")) if path.is_dir() else [path]
            if not found or not all(p.is_file() for p in found):
                raise UserError(f"{path}: no such public key file (or no *.pub in that folder)")
            keys += found
        return keys

    def control_dial_host(self) -> str:
        """The host that reaches the SuperLink from this machine (what SuperExec dials when it binds all)."""
        return {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(self.control_host, self.control_host)

    def client_address(self) -> str:
        """The SuperLink's address for local ``flwr`` commands and the gate (the Control API's)."""
        host = self.control_dial_host()
        return f"[{host}]:{self.control_port}" if ":" in host else f"{host}:{self.control_port}"


def _overlap(a: str, b: str) -> bool:
    """Whether two bind addresses can clash on one port."""
    return a == b or {a, b} & {"0.0.0.0", "::"} != set()


def superlink_command(s: SuperLinkSettings) -> list[str]:
    command = [executable("flower-superlink"), "--host", s.control_host, "--port", str(s.control_port),
               "--disable-runtime-dependency-installation"]
    if s.certs is None:
        command.append("--insecure")
    else:
        command += ["--ssl-ca-certfile", str(s.certs / CA_CERT), "--ssl-certfile", str(s.certs / SERVER_CERT),
                    "--ssl-keyfile", str(s.certs / SERVER_KEY)]
        if s.node_auth:
            command.append("--enable-supernode-auth")
    if s.database is not None:
        command += ["--database", str(s.database)]
    if s.log_file is not None:
        command += ["--log-file", str(s.log_file)]
    return with_flower_args(command, s.flower_args, "superlink")


def with_flower_args(command: list[str], extra: tuple[str, ...], name: str) -> list[str]:
    """``command`` and the user's own Flower flags, which may neither repeat a flag fl-offsite sets nor turn TLS
    off (fl-offsite's options do that, with their checks)."""
    owned = {arg for arg in command if arg.startswith("--")} | {"--insecure"}
    for arg in extra:
        if arg.split("=", 1)[0] in owned:
            raise UserError(f"{arg.split('=', 1)[0]} after --: fl-offsite {name} sets it; use its own option "
                            f"(`fl-offsite {name} --help`)")
    return [*command, *extra]


def register_nodes(connection: str, keys: Sequence[Path], env: dict[str, str]) -> dict[Path, str]:
    """Register the public keys at the SuperLink (``flwr supernode register``); key -> node id or note."""
    registered = {}
    for key in keys:
        result = subprocess.run([executable("flwr"), "supernode", "register", str(key), connection,
                                 "--name", key.stem, "--format", "json"],
                                env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False)
        reply = json_reply(result.stdout)
        error = str(reply.get("error-message") or result.stderr)
        if reply.get("success") and str(reply.get("node-id")).isdigit():
            registered[key] = str(reply["node-id"])
        elif "already in use" in error:  # the SuperLink's refusal has no code of its own
            registered[key] = "registered before"
        else:
            raise UserError(f"could not register {key} at the SuperLink: {error.strip()[-500:]}")
    return registered


def serve_superlink(s: SuperLinkSettings) -> int:
    """Run the SuperLink in the foreground: start it on the control address, open the Fleet gate on the public
    one, register the node keys, write the connection, wait; Ctrl-C or SIGTERM stops both."""
    s.check()
    keys = s.public_keys() if s.node_auth_on else []
    if s.node_auth_on and not keys:
        log.warning("Node authentication is on and no node key is listed: no SuperNode can join until one is "
                    "registered (`flwr supernode register KEY.pub %s`)", s.connection)
    if not is_loopback(s.control_host):
        log.warning("The Control API listens on %s: anyone who reaches that address and holds ca.crt can start "
                    "runs (no authentication in Flower's open edition); keep it behind a firewall", s.control_host)
    env = runtime_env()
    process = subprocess.Popen(superlink_command(s), env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, encoding="utf-8", errors="replace")
    forward = forward_output(process.stdout, _superlink_note)
    gate = None
    try:
        ca = s.certs / CA_CERT if s.certs else None
        if not wait_healthy(s.control_dial_host(), s.control_port, process, ca):
            if process.poll() is not None:
                raise RuntimeError(f"flower-superlink exited with code {process.returncode}; see its log above")
            raise RuntimeError(f"flower-superlink did not answer on port {s.control_port} within "
                               f"{STARTUP_TIMEOUT_S:.0f} s")
        scheme = "https" if s.certs else "http"
        gate = FleetGate(s.host, s.port, f"{scheme}://{s.client_address()}", s.certs and s.certs / SERVER_CERT,
                         s.certs and s.certs / SERVER_KEY, ca).start()
        config_file = write_connection(s.connection, s.client_address(), ca)
        for key, node in register_nodes(s.connection, keys, env).items():
            log.info("Registered node key %s (node %s)", key, node)
        _log_ready(s, config_file)
        return wait_foreground(process, forward, before_stop=gate.stop)
    finally:
        if gate is not None:
            gate.stop()
        terminate(process)


def _log_ready(s: SuperLinkSettings, config_file: Path) -> None:
    mode = ("TLS, only registered nodes may join" if s.node_auth_on else
            "TLS, any node may join" if s.certs else "INSECURE: no TLS, any node may join")
    log.info("SuperLink ready: SuperNodes connect to %s:%d (%s; Fleet API only), the Control API is on %s. "
             "Connection %r written to %s; run the app with:\n"
             "    flwr run . %s --stream --run-config 'results.dir=\"/abs/path\"'\n"
             "or  fl-offsite run CONFIG.toml --connection %s", s.host, s.port, mode, s.client_address(),
             s.connection, config_file, s.connection, s.connection)


def _superlink_note(line: str) -> str | None:
    if "activate-node" in line and "No SuperNode found with the given public key" in line:
        return ("fl-offsite: REFUSED a SuperNode whose public key is not registered; to admit it, restart with "
                "--node-key ITS_KEY.pub or run `flwr supernode register ITS_KEY.pub CONNECTION`")
    if "ApiError:2001" in line:
        return "fl-offsite: REFUSED a SuperNode that has no authentication key (start it with --key)"
    return None


# --- a data owner's SuperNode ------------------------------------------------------------

@dataclass(frozen=True)
class SuperNodeSettings:
    superlink: str  # HOST:PORT of the SuperLink
    ca: Path | None  # the model owner's ca.crt; None = insecure (loopback only)
    key: Path | None  # this node's private key (make_node_key)
    data_path: Path | None = None
    cache_dir: Path | None = None
    partition_id: int | None = None
    num_partitions: int | None = None
    memory_budget_mb: float | None = None  # the model owner gives the node the largest emulator this fits
    emulator_layers: int | None = None  # or this emulator size (k), whatever the budget
    port: int = 9094  # this node's local runtime API (127.0.0.1 only); one per node on a machine
    trusted_entities: Path | None = None  # flower-supernode --trusted-entities: run only apps they signed
    policy: dict[str, str] = field(default_factory=dict)  # the node's own limits (fl_offsite.app.node_policy)
    flower_args: tuple[str, ...] = ()  # more flower-supernode flags, given after --
    warm: bool = True  # ClientApps forked from a warm process (fl_offsite.ops.warm_superexec), not started cold

    def check(self) -> None:
        host = self.superlink.rsplit(":", 1)[0]
        if ":" not in self.superlink:
            raise UserError(f"--superlink {self.superlink!r}: give HOST:PORT, e.g. {self.superlink}:{DEFAULT_PORT}")
        if self.ca is None:
            if not is_loopback(host):
                raise UserError(f"--insecure to {host}, which is not loopback: pass --ca with the model owner's "
                                "ca.crt (TLS is required outside loopback)")
            if self.key is not None:
                raise UserError("node authentication (--key) needs TLS: pass --ca instead of --insecure")
        elif not self.ca.is_file():
            raise UserError(f"--ca {self.ca}: no such file; get ca.crt from the model owner "
                            "(made by `fl-offsite certs`)")
        if self.trusted_entities is not None and not self.trusted_entities.is_file():
            raise UserError(f"--trusted-entities {self.trusted_entities}: no such file (YAML: key id -> "
                            "'ssh-ed25519 KEY')")
        if self.key is not None:
            from cryptography.hazmat.primitives.serialization import (
                load_ssh_private_key,
            )

            if not self.key.is_file():
                raise UserError(f"--key {self.key}: no such file; make one with `fl-offsite node-key NAME`")
            try:
                load_ssh_private_key(self.key.read_bytes(), None)
            except (ValueError, TypeError) as err:
                raise UserError(f"--key {self.key} is not an unencrypted OpenSSH private key ({err}); "
                                "make one with `fl-offsite node-key NAME`") from None
        if self.data_path is not None:
            from fl_offsite.data.local_file import load_examples

            n = len(load_examples(self.data_path))  # fail here, not in the first round
            log.info("Local data %s: %d examples", self.data_path, n)
        elif self.partition_id is None:
            raise UserError("give the node its data: --data-path FILE.jsonl (its own examples), or "
                            "--partition-id N --num-partitions M (a share of the public task, for trials)")

    def node_config(self) -> str:
        config: dict[str, object] = {}
        if self.data_path is not None:
            config["data-path"] = str(self.data_path.expanduser().resolve())
        if self.cache_dir is not None:
            config["cache-dir"] = str(self.cache_dir.expanduser().resolve())
        if self.partition_id is not None:
            config["partition-id"] = self.partition_id
        if self.num_partitions is not None:
            config["num-partitions"] = self.num_partitions
        if self.memory_budget_mb is not None:
            config["memory-budget-mb"] = self.memory_budget_mb
        if self.emulator_layers is not None:
            config["emulator-layers"] = self.emulator_layers
        config.update(self.policy)
        for key, value in config.items():
            if isinstance(value, str) and ('"' in value or "\\" in value):
                raise UserError(f"{key} {value!r}: quotes and backslashes are not supported in paths")
        return " ".join(f"{k}={json.dumps(v)}" for k, v in config.items())


def supernode_command(s: SuperNodeSettings, superexec_secret: Path | None = None) -> list[str]:
    """``flower-supernode``'s command; with ``superexec_secret``, in process isolation for a SuperExec of our own
    (:func:`warm_superexec_command`) that proves itself with that secret."""
    command = [executable("flower-supernode"), "--superlink", s.superlink, "--port", str(s.port)]
    if superexec_secret is not None:
        command += ["--isolation", "process", "--superexec-auth-secret-file", str(superexec_secret)]
    command += ["--insecure"] if s.ca is None else ["--root-certificates", str(s.ca)]
    if s.key is not None:
        command += ["--auth-supernode-private-key", str(s.key)]
    if s.trusted_entities is not None:
        command += ["--trusted-entities", str(s.trusted_entities)]
    if node_config := s.node_config():
        command += ["--node-config", node_config]
    return with_flower_args(command, s.flower_args, "supernode")


def serve_supernode(s: SuperNodeSettings) -> int:
    """Run a SuperNode in the foreground; a refusal or TLS failure ends it with an error saying what to fix.

    A refused activation is retried for ``ACTIVATION_RETRY_S``: flwr keeps a node that vanished (killed,
    machine restarted) online until it misses two heartbeats, and refuses its restarted SuperNode until then.
    """
    s.check()
    deadline = time.monotonic() + ACTIVATION_RETRY_S
    while True:
        code, output = _run_supernode(s)
        if code == 0 or REFUSED not in output or time.monotonic() > deadline:
            break
        log.warning("The SuperLink refused to activate this node: a previous session of it may still count as "
                    "online, or its key is not registered yet; retrying for %.0f s more", deadline - time.monotonic())
        try:
            time.sleep(5)
        except KeyboardInterrupt:
            return 0
    if hint := _supernode_hint(s, flower_exit_code(code, output), output):
        raise UserError(hint)
    return code


def warm_superexec_command(s: SuperNodeSettings, superexec_secret: Path, supernode_pid: int) -> list[str]:
    """The SuperExec that forks the node's ClientApps from a warm process, on the SuperNode's local Runtime API."""
    return [sys.executable, "-m", "fl_offsite.ops.warm_superexec", "--runtime-api-address", f"127.0.0.1:{s.port}",
            "--insecure", "--parent-pid", str(supernode_pid), "--superexec-auth-secret-file", str(superexec_secret)]


def _run_supernode(s: SuperNodeSettings) -> tuple[int, str]:
    """One ``flower-supernode`` (and, when warm, its SuperExec) until it exits: its exit code and output (also
    copied to ours)."""
    with tempfile.TemporaryDirectory(prefix="fl-offsite-node-") as tmp:
        secret = None
        if s.warm:  # only our SuperExec may take this node's tasks from its Runtime API
            secret = Path(tmp) / "superexec.secret"
            secret.touch(mode=0o600)
            secret.write_bytes(secrets.token_bytes(32))
        env, (read_end, write_end) = runtime_env(), os.pipe()
        with os.fdopen(read_end, encoding="utf-8", errors="replace") as output:
            try:
                process = subprocess.Popen(supernode_command(s, secret), env=env, stdin=subprocess.DEVNULL,
                                           stdout=write_end, stderr=subprocess.STDOUT)
            except BaseException:
                os.close(write_end)
                raise
            superexec = None if secret is None else \
                OnActivation(warm_superexec_command(s, secret, process.pid), env, write_end)
            if superexec is None:
                os.close(write_end)
            return _follow_supernode(process, superexec, output)


class OnActivation:
    """A companion of ``flower-supernode`` (our SuperExec), started once the SuperLink has activated the node and
    stopped with it: a node that is refused, and retries, never imports torch for nothing. It writes to the
    node's output pipe, whose write end ``write_end`` it takes over (and closes)."""

    def __init__(self, command: list[str], env: dict[str, str], write_end: int) -> None:
        self.command, self.env, self.write_end = command, env, write_end
        self.process: subprocess.Popen | None = None
        self.lock, self.stopped = threading.Lock(), False

    def note(self, line: str) -> None:
        """Start the companion if ``line`` (of the node's output) says the node is activated."""
        if ACTIVATED not in line:
            return
        with self.lock:
            if self.process is None and not self.stopped:
                self.process = subprocess.Popen(self.command, env=self.env, stdin=subprocess.DEVNULL,
                                                stdout=self.write_end, stderr=subprocess.STDOUT)

    def stop(self) -> None:
        """Stop the companion (if started) and close the write end: the node's output then ends."""
        with self.lock:
            if not self.stopped:
                self.stopped = True
                os.close(self.write_end)
        if self.process is not None:
            terminate(self.process)


def _follow_supernode(process: subprocess.Popen, superexec: OnActivation | None,
                      output: IO[str]) -> tuple[int, str]:
    seen: deque[str] = deque(maxlen=400)  # the end of its output: what it exited with

    def keep(line: str) -> str | None:
        seen.append(line)
        if superexec is not None:
            superexec.note(line)
        if "The FAB could not be verified" in line or "FAB verification failed" in line:
            return ("fl-offsite: REFUSED the run's app: no key in --trusted-entities signed it (flwr 1.42 signs "
                    "only apps published on Flower Hub); the model owner gets an error reply from this node")
        return None

    forward = forward_output(output, keep)
    try:
        return wait_foreground(process, forward, after_exit=superexec.stop if superexec else None), "".join(seen)
    finally:
        terminate(process)
        if superexec is not None:
            superexec.stop()


def _supernode_hint(s: SuperNodeSettings, code: int, output: str) -> str | None:
    """What to tell the data owner when ``flower-supernode`` exited with ``code``: by Flower's exit code, else by
    Flower's API error code or OpenSSL's reason in ``output``; None when neither says what to change."""
    by_code = {
        NODE_KEY_INVALID: f"--key {s.key} is not a private key Flower takes: make one with `fl-offsite node-key NAME`",
        TRUSTED_ENTITIES_INVALID: f"--trusted-entities {s.trusted_entities} is not a valid trusted-entities file",
        ADDRESS_INVALID: f"--superlink {s.superlink!r} is not an address: give HOST:PORT"}
    if code == 0 or code in by_code:
        return by_code.get(code)
    public = f"{s.key}.pub" if s.key else "its .pub file"
    host = s.superlink.rsplit(":", 1)[0]
    hints = {
        REFUSED: (f"the SuperLink {s.superlink} refused this node: its public key ({public}) is not registered "
                  f"(retried for {ACTIVATION_RETRY_S:.0f} s). Send that .pub file to the model owner to register "
                  "(`fl-offsite superlink ... --node-key FILE.pub`), then start the node again"),
        "[code: 2001]": (f"the SuperLink {s.superlink} only admits registered nodes: start with --key PRIVATE_KEY "
                         "(`fl-offsite node-key NAME`) and have the model owner register NAME.pub"),
        "CERTIFICATE_VERIFY_FAILED": (
            f"TLS check of {s.superlink} failed: the SuperLink's certificate is not signed by --ca {s.ca} or does "
            f"not name host {host}. Use the model owner's current ca.crt, and an address given to "
            "`fl-offsite certs --host`"),
        "WRONG_VERSION_NUMBER": f"{s.superlink} does not speak TLS (a SuperLink started with --insecure?)"}
    found = [hint for pattern, hint in hints.items() if pattern in output]  # TLS failures log no exit code
    if found or code != CONNECTION_ERROR:
        return found[0] if found else None
    return f"could not reach the SuperLink at {s.superlink}: see Flower's error above"


# --- running the app ----------------------------------------------------------------------

def run_app(app_dir: Path, connection: str, run_config: dict, env: dict[str, str] | None = None,
            log_path: Path | None = None, stream: bool = True) -> int:
    """Run the app on the SuperLink of ``connection`` and wait; raise RuntimeError unless the run completed.
    Ctrl-C or SIGTERM stops the run on the SuperLink too (``flwr stop``), then raises KeyboardInterrupt."""
    env = env or runtime_env()
    address = connection_address(connection, env)
    with tempfile.TemporaryDirectory(prefix="fl-offsite-run-") as tmp, sigterm_interrupts():
        try:
            return flwr_run(app_dir, connection, run_config, env, Path(tmp) / "run-config.toml",
                            log_path or Path(tmp) / "run.log", stream)
        except RunInterrupted as stopped:  # the run goes on on the SuperLink unless it is stopped there
            if stopped.run_id is not None:
                with signals_held():
                    subprocess.run([executable("flwr"), "stop", str(stopped.run_id), connection], env=env,
                                   stdin=subprocess.DEVNULL, capture_output=True, timeout=30, check=False)
                log.warning("stopped run %d on the SuperLink; the same command resumes it after its last finished "
                            "round", stopped.run_id)
            raise
        except RunNotStarted:
            if not answers(address):
                raise UserError(f"no SuperLink answers at {address} (connection {connection!r}): start it with "
                                "`fl-offsite superlink`, or wait until it is back up") from None
            raise


def answers(address: str, timeout: float = 3.0) -> bool:
    """Whether something accepts TCP connections at ``address`` (HOST:PORT or [IPv6]:PORT)."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def runtime_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment of the deployment's Flower processes (:func:`fl_offsite.ops.flower_cli.flower_env`); the
    SuperExec starts a ClientApp 0.2 s after its message, not 1 s."""
    return flower_env({"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2", **(extra or {})})
