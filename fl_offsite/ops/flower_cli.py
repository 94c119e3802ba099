"""Flower's processes, for both engines: commands, environment, connections, health, runs, supervision.

The simulation launcher (:mod:`fl_offsite.ops.simulation`) and the deployment commands
(:mod:`fl_offsite.ops.deployment`) start the same Flower commands (``flower-superlink``, ``flwr run``,
``flwr ls``) and share everything here:

* the commands come from this interpreter's environment, which also goes first on PATH
  (the SuperLink starts its helpers by name); telemetry and update checks are off;
* a connection is a ``[superlink.NAME]`` entry of ``$FLWR_HOME/config.toml``;
* a SuperLink is up when ``/health`` on its port answers 200;
* a run starts with ``flwr run APP CONNECTION --format json`` (its reply names the run id), its log
  streams with ``flwr log RUN_ID CONNECTION`` until the run has finished, and its outcome is read with
  ``flwr ls --format json``: only ``finished:completed`` counts as success;
* a launch tags every process it starts with ``FL_OFFSITE_LAUNCH=<launcher pid>:<start
  time>:<uuid>`` in the environment (inherited by all descendants, Ray's included), so that
  they can all be found and stopped, even those in sessions of their own.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
import tomllib
import urllib.request
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO

import psutil
import tomli_w

from fl_offsite.errors import UserError

log = logging.getLogger(__name__)

TAG_VAR = "FL_OFFSITE_LAUNCH"
STARTUP_TIMEOUT_S = 90.0


def executable(name: str) -> str:
    """The Flower command from this interpreter's environment (not some other one on PATH)."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.is_file() else shutil.which(name)
    if found is None:
        raise UserError(f"`{name}` not found next to {sys.executable} nor on PATH: "
                        "install flwr[simulation] into this environment")
    return found


def flower_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment of the Flower processes: no telemetry or update check, unbuffered output, this
    interpreter's commands first on PATH; ``extra`` on top."""
    env = dict(os.environ)
    env.update({"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "PYTHONUNBUFFERED": "1",
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"})
    env.update(extra or {})
    return env


def flower_exit_code(code: int, output: str) -> int:
    """Flower's exit code for a process that exited with ``code``: where Flower exits from a thread (flwr 1.42's
    SuperNode on a connection error exits 1), the last ``Exit Code: N`` it logged (Flower's numbered codes)."""
    logged = re.findall(r"Exit Code: (\d+)", output)
    return int(logged[-1]) if code != 0 and logged else code


# --- connections and health --------------------------------------------------------------

def flwr_config_file(env: Mapping[str, str] | None = None) -> Path:
    """Flower's config.toml (in ``$FLWR_HOME`` of ``env``, by default ours; else ``~/.flwr``)."""
    home = (os.environ if env is None else env).get("FLWR_HOME")
    return Path(home or Path.home() / ".flwr") / "config.toml"


def write_connection(name: str, address: str, ca: Path | None, flwr_home: Path | None = None) -> Path:
    """Add ``[superlink.NAME]`` to Flower's config.toml so that ``flwr run . NAME`` reaches the SuperLink."""
    path = flwr_home / "config.toml" if flwr_home else flwr_config_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    config = tomllib.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    entry: dict[str, object] = {"address": address}
    if ca is None:
        entry["insecure"] = True
    else:
        entry["root-certificates"] = str(ca.resolve())
    config.setdefault("superlink", {})[name] = entry
    path.write_text(tomli_w.dumps(config), encoding="utf-8")
    return path


def connection_address(connection: str, env: dict[str, str]) -> str:
    """The SuperLink address of ``connection`` in Flower's config.toml (written by ``fl-offsite superlink``)."""
    path = flwr_config_file(env)
    try:
        entry = tomllib.loads(path.read_text(encoding="utf-8"))["superlink"][connection]
        return str(entry["address"])
    except (OSError, KeyError, TypeError, tomllib.TOMLDecodeError):
        raise UserError(f"no connection {connection!r} in {path}: start `fl-offsite superlink` on this machine "
                        "first (it writes the connection), or name another one with --connection") from None


def wait_healthy(host: str, port: int, process: subprocess.Popen, ca: Path | None = None,
                 timeout: float = STARTUP_TIMEOUT_S) -> bool:
    """Poll the SuperLink's ``/health`` on this machine until it answers (True), or until ``process``
    exits or ``timeout`` seconds pass (False). ``ca``: its TLS CA certificate, None for plain HTTP."""
    host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    host = f"[{host}]" if ":" in host else host
    context = None
    if ca is not None:
        context = ssl.create_default_context(cafile=str(ca))
        context.check_hostname = False  # probing by address; the certificate may name only the public host
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context))
    url = f"{'http' if ca is None else 'https'}://{host}:{port}/health"
    deadline = time.monotonic() + timeout
    while process.poll() is None and time.monotonic() < deadline:
        try:
            with opener.open(url, timeout=2) as response:
                if response.status == 200:
                    return True
        except OSError:
            time.sleep(0.3)
    return False


# --- runs --------------------------------------------------------------------------------

class RunNotStarted(RuntimeError):
    """``flwr run`` failed before the run started (no run id), e.g. no SuperLink answered."""


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM while ``flwr run`` streamed a run (``run_id``: None if it had not started)."""

    def __init__(self, run_id: int | None) -> None:
        super().__init__(run_id)
        self.run_id = run_id


def flwr_run(app: Path, connection: str, run_config: dict, env: dict[str, str], config_file: Path,
             log_path: Path, stream: bool, options: tuple[str, ...] = (), logs_note: str = "") -> int:
    """Start the app with ``flwr run APP CONNECTION --format json OPTIONS``, follow its log with ``flwr log``
    and return the run id once the run completed.

    ``run_config`` (if any) goes to ``flwr run`` through ``config_file``. Raises ``RunNotStarted``
    when no run started, and ``RuntimeError`` with the status, the log tail and ``logs_note``
    when the run ended otherwise than completed.
    """
    command = [executable("flwr"), "run", str(app), connection, "--format", "json", *options]
    if run_config:
        config_file.write_text(tomli_w.dumps(run_config), encoding="utf-8")
        command += ["--run-config", str(config_file)]
    run_id = start_run(command, env)
    tail = follow_run(run_id, connection, env, log_path, stream)
    status, details = run_status(run_id, env, connection)
    if status != "finished:completed":
        raise RuntimeError(f"Flower run {run_id} of {app} ended as {status!r}: {details}\n"
                           f"Last log lines:\n{''.join(tail)}{logs_note}")
    return run_id


def start_run(command: list[str], env: dict[str, str]) -> int:
    """Run ``flwr run ... --format json``; return the run id from its JSON reply."""
    try:
        result = subprocess.run(command, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                encoding="utf-8", errors="replace", check=False)
    except KeyboardInterrupt:
        raise RunInterrupted(None) from None
    reply = json_reply(result.stdout)
    run_id = reply.get("run-id")
    if result.returncode != 0 or not reply.get("success") or not str(run_id).isdigit():
        error = reply.get("error-message") or (result.stdout + result.stderr)[-4000:]
        raise RunNotStarted(f"`flwr run` failed (exit code {result.returncode}): {str(error).strip()}")
    return int(str(run_id))


def json_reply(output: str) -> dict:
    """The JSON object that a Flower command with ``--format json`` printed ({} if none)."""
    try:
        reply, _ = json.JSONDecoder().raw_decode(output[output.index("{"):])
    except ValueError:
        return {}
    return reply if isinstance(reply, dict) else {}


def follow_run(run_id: int, connection: str, env: dict[str, str], log_path: Path, stream: bool) -> list[str]:
    """Copy the run's log (``flwr log RUN_ID CONNECTION --stream``) to ``log_path`` and, if ``stream``, to stdout
    until the run has ended; return the log's last lines."""
    tail: deque[str] = deque(maxlen=40)
    command = [executable("flwr"), "log", str(run_id), connection, "--stream"]
    with log_path.open("w", encoding="utf-8") as log_file, subprocess.Popen(
            command, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, encoding="utf-8", errors="replace") as process:
        try:
            for line in process.stdout or ():
                log_file.write(line)
                tail.append(line)
                if stream:
                    sys.stdout.write(line)
                    sys.stdout.flush()
        except KeyboardInterrupt:
            terminate(process)
            raise RunInterrupted(run_id) from None
    return list(tail)


def run_status(run_id: int, env: dict[str, str], connection: str) -> tuple[str, str]:
    """Status (e.g. ``finished:failed``) and its details, from ``flwr ls --format json``."""
    status, details = "", ""
    for _attempt in range(10):  # the log stream ends when the run is finished; poll in case it broke off
        result = subprocess.run([executable("flwr"), "ls", connection, "--run-id", str(run_id), "--format", "json"],
                                env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False)
        try:
            run = json_reply(result.stdout)["runs"][0]
            status, details = str(run["status"]), str(run.get("status-details", ""))
        except (KeyError, IndexError, TypeError):
            raise RuntimeError(f"`flwr ls` gave no run status (exit code {result.returncode}):\n"
                               f"{result.stdout}{result.stderr}") from None
        if status.startswith("finished"):
            break
        time.sleep(1.0)
    return status, details


# --- a process in the foreground ---------------------------------------------------------

def forward_output(output: IO[str] | None, note: Callable[[str], str | None]) -> threading.Thread:
    """Copy a child's ``output`` to ours in a thread; ``note(line)`` may add a line of explanation."""
    def pump() -> None:
        for line in output or ():
            sys.stdout.write(line)
            if extra := note(line):
                sys.stdout.write(extra + "\n")
                log.error(extra)
            sys.stdout.flush()

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    return thread


def wait_foreground(process: subprocess.Popen, forward: threading.Thread,
                    before_stop: Callable[[], None] | None = None,
                    after_exit: Callable[[], None] | None = None) -> int:
    """Wait for the child; SIGTERM and Ctrl-C call ``before_stop`` and stop it (and with it its SuperExec).
    ``after_exit`` runs once it has ended, before the rest of its output is copied (its companions' end)."""
    try:
        with sigterm_interrupts():
            code = process.wait()
    except KeyboardInterrupt:
        if before_stop is not None:
            before_stop()
        terminate(process)
        code = 0
    if after_exit is not None:
        after_exit()
    forward.join(timeout=5)
    return code


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """Within: SIGTERM raises KeyboardInterrupt, as Ctrl-C does, so that ``finally`` blocks stop what was
    started (a plain SIGTERM ends Python without them). Only in the main thread, where signals arrive."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Within: SIGINT and SIGTERM are ignored, so that a second Ctrl-C cannot cut short a bounded cleanup."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def terminate(process: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM the child and its descendants, SIGKILL what is left after ``grace_s``, and reap the child. The
    descendants are a Flower process's SuperExec and the apps it started: in sessions of their own, they
    otherwise outlive it by seconds (measured: a ServerApp 5.5 s after its SuperLink)."""
    if process.poll() is not None:
        return
    try:
        family = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    _end(family, grace_s)
    process.wait()


# --- tagged processes (a launch and everything it started) --------------------------------

def new_launch_tag() -> str:
    """A tag for the processes this process starts; never taken for stale while this process lives."""
    me = psutil.Process()
    return f"{me.pid}:{me.create_time()!r}:{uuid.uuid4().hex}"


def launch_tag(process: psutil.Process) -> str | None:
    """The process's launch tag. Reads /proc directly where it can: Ray's setproctitle blanks the
    start of the environment block, and psutil then returns an empty environment."""
    try:
        block = Path(f"/proc/{process.pid}/environ").read_bytes()
    except FileNotFoundError:  # no /proc (macOS)
        try:
            return process.environ().get(TAG_VAR)
        except (psutil.Error, OSError):
            return None
    except OSError:  # gone, or another user's
        return None
    prefix = f"{TAG_VAR}=".encode()
    tags = [entry[len(prefix):].decode(errors="replace") for entry in block.split(b"\0") if entry.startswith(prefix)]
    return tags[0] if tags else None


def tagged_processes(match: Callable[[str], bool]) -> list[psutil.Process]:
    """This user's processes whose launch tag satisfies ``match``, and their descendants."""
    found: dict[int, psutil.Process] = {}
    for process in psutil.process_iter():
        tag = launch_tag(process)
        if tag is not None and match(tag):
            found[process.pid] = process
            with contextlib.suppress(psutil.Error):
                found.update((child.pid, child) for child in process.children(recursive=True))
    return list(found.values())


def stop_processes(match: Callable[[str], bool]) -> None:
    """Terminate, then kill, every process whose launch tag satisfies ``match``, until none is left."""
    for grace_s in (5.0, 2.0, 1.0):
        processes = tagged_processes(match)
        if not processes:
            return
        log.debug("Stopping %s", [p.pid for p in processes])
        _end(processes, grace_s)
    left = [p.pid for p in tagged_processes(match)]
    if left:
        log.warning("Could not stop processes %s of a Flower launch; stop them by hand", left)


def _end(processes: list[psutil.Process], grace_s: float) -> None:
    """SIGTERM ``processes``, SIGKILL those still alive after ``grace_s``, and wait for them to go."""
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.terminate()
    alive = _wait_gone(processes, grace_s)
    for process in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    _wait_gone(alive, 2.0)


def _wait_gone(processes: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Wait until every process has exited; return those still running after ``timeout`` seconds. A zombie
    counts as exited: Ray's actors outlive their parent, and nobody may reap them (psutil would wait it out)."""
    deadline = time.monotonic() + timeout
    while True:
        alive = [p for p in processes if _running(p)]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.1)


def _running(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def stop_stale_launches() -> None:
    """Stop the processes of earlier launches whose launcher process no longer exists."""
    def stale(tag: str) -> bool:
        try:
            pid, create_time, _ = tag.split(":", 2)
            launcher = psutil.Process(int(pid))  # a new process with the same pid has a later start time
            return abs(launcher.create_time() - float(create_time)) > 1.0 or launcher.status() == psutil.STATUS_ZOMBIE
        except (psutil.NoSuchProcess, ValueError):
            return True

    if tagged_processes(stale):
        log.warning("Stopping processes left over by a crashed Flower launch")
        stop_processes(stale)
