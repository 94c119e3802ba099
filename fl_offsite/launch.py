"""Run a Flower app on the local simulation engine (Ray) through the real ``flwr run`` CLI.

How it works (flwr 1.42), and why:

* ``flwr run`` to the default ``local`` connection starts a *detached* ``flower-superlink``
  on the fixed port 39091 and leaves it running; it also reuses whatever answers on that
  port, so a leftover SuperLink from another launch (other FLWR_HOME, other settings)
  would silently serve the next run. Instead this launcher starts ``flower-superlink
  --simulation`` itself on a free port, with an in-memory state, and writes a
  ``[superlink.fl-offsite]`` connection to ``$FLWR_HOME/config.toml``.
* ``flwr run APP fl-offsite --stream`` streams the run's logs and returns when the run has
  finished, but it exits 0 even when the ServerApp raised. The outcome is therefore read
  with ``flwr ls fl-offsite --run-id ID --format json``: only ``finished:completed`` counts
  as success; otherwise ``RuntimeError`` carries the status details and the log tail.
* The SuperLink spawns ``flower-superexec`` in a new session, which spawns
  ``flwr-simulation``, which starts Ray (gcs_server, raylet, actors...). Killing the
  SuperLink orphans that tree (measured), and neither process groups nor a process tree
  walk see all of it. So every process of a launch carries an environment tag
  (``FL_OFFSITE_LAUNCH=<launcher pid>:<start time>:<uuid>``, inherited by all
  descendants); on exit, failure or Ctrl-C the launcher terminates, then kills, every
  process with its tag. A launch also first kills the tagged processes of launches whose
  launcher process is gone (crashed or SIGKILLed), so they cannot eat the memory and
  CPUs of the next one. ``RAY_ADDRESS=local`` makes Ray start its own cluster, never
  attach to an old one.
* Offline: no ``uv sync`` of the app's dependencies (the current environment is used), no
  telemetry, no update check, no Ray usage stats. The venv's ``bin`` is put first on PATH
  because the SuperLink starts its helpers by name.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections import deque
from collections.abc import Callable
from pathlib import Path

import psutil
import tomli_w

import tomllib

from fl_offsite.config import flatten
from fl_offsite.errors import UserError

log = logging.getLogger(__name__)

ConfigValue = bool | int | float | str
CONNECTION = "fl-offsite"
TAG_VAR = "FL_OFFSITE_LAUNCH"
STARTUP_TIMEOUT_S = 90.0


def run_simulation_app(app_dir: Path, run_config: dict[str, ConfigValue], num_supernodes: int,
                       cpus_per_client: float = 1.0, gpus_per_client: float = 0.0,
                       flwr_home: Path | None = None, stream: bool = True) -> None:
    """Run the Flower app in ``app_dir`` in simulation and return when the run has finished.

    ``run_config`` overrides keys of the app's ``[tool.flwr.app.config]``. Each of the
    ``num_supernodes`` simulated nodes gets ``cpus_per_client`` CPUs (a whole number, as
    flwr 1.42 wants) and ``gpus_per_client`` GPUs. ``flwr_home`` holds Flower's state and
    the logs (``run.log``, ``superlink.log``); by default a temporary folder, kept only when
    a ``RuntimeError`` points at its logs. With ``stream`` the run's logs are copied to stdout.

    Raises ``UserError`` for bad arguments and ``RuntimeError`` when the run did not
    complete (the ServerApp raised, the SuperLink did not start, ``flwr run`` failed).
    """
    app_dir = Path(app_dir).resolve()
    _check_app(app_dir, run_config)
    cpus = _check_resources(num_supernodes, cpus_per_client, gpus_per_client)
    temporary = flwr_home is None
    home = Path(tempfile.mkdtemp(prefix="fl-offsite-flwr-")) if temporary else Path(flwr_home).resolve()
    home.mkdir(parents=True, exist_ok=True)
    _stop_stale_launches()

    me = psutil.Process()
    tag = f"{me.pid}:{me.create_time()!r}:{uuid.uuid4().hex}"
    env = _environment(home, tag)
    command = [_executable("flwr"), "run", str(app_dir), CONNECTION, "--stream",
               "--federation-config", (f"num-supernodes={num_supernodes} client-resources-num-cpus={cpus} "
                                       f"client-resources-num-gpus={float(gpus_per_client)!r} "
                                       f"init-args-num-cpus={os.cpu_count() or 1} init-args-log-to-driver=false")]
    if run_config:
        config_file = home / "run-config.toml"
        config_file.write_text(tomli_w.dumps(run_config), encoding="utf-8")
        command += ["--run-config", str(config_file)]

    start = time.perf_counter()
    superlink, keep_logs = None, False
    try:
        superlink = _start_superlink(home, env)
        run_id, tail = _stream_run(command, env, home / "run.log", stream)
        log.debug("Run %s streamed after %.1f s", run_id, time.perf_counter() - start)
        status, details = run_status(run_id, env)
        log.debug("Run status %r after %.1f s", status, time.perf_counter() - start)
        if status != "finished:completed":
            raise RuntimeError(f"Flower run {run_id} of {app_dir} ended as {status!r}: {details}\n"
                               f"Last log lines:\n{''.join(tail)}Logs: {home}/run.log and {home}/superlink.log")
    except RuntimeError:
        keep_logs = True  # the message points at them
        raise
    finally:
        _stop_processes(lambda value: value == tag)
        if superlink is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                superlink.wait(timeout=10)  # reap it: no zombie left behind
        if temporary and not keep_logs:
            shutil.rmtree(home, ignore_errors=True)
    log.info("Flower run %s of %s completed in %.1f s", run_id, app_dir.name, time.perf_counter() - start)


def _check_app(app_dir: Path, run_config: dict[str, ConfigValue]) -> None:
    """Fail early, with what to change, on what flwr would reject late or silently."""
    pyproject = app_dir / "pyproject.toml"
    if not pyproject.is_file():
        raise UserError(f"{app_dir} is not a Flower app: it has no pyproject.toml")
    with pyproject.open("rb") as f:
        flwr_tool = tomllib.load(f).get("tool", {}).get("flwr", {})
    if "app" not in flwr_tool:
        raise UserError(f"{pyproject} has no [tool.flwr.app] section with the app's components")
    if "federations" in flwr_tool:
        raise UserError(f"remove [tool.flwr.federations] from {pyproject}: `flwr run` would move it into "
                        "FLWR_HOME and rewrite the file; the launcher sets the federation itself")
    known = flatten(flwr_tool["app"].get("config", {}))
    unknown = sorted(set(run_config) - set(known))
    if unknown:
        raise UserError(f"run_config keys {unknown} are not in [tool.flwr.app.config] of {pyproject}: "
                        f"add them there or fix the names (known: {sorted(known)})")
    for key, value in run_config.items():
        if not isinstance(value, (bool, int, float, str)):
            raise UserError(f"run_config[{key!r}] = {value!r}: values must be bool, int, float or str")


def _check_resources(num_supernodes: int, cpus_per_client: float, gpus_per_client: float) -> int:
    cpus = os.cpu_count() or 1
    if num_supernodes < 1:
        raise UserError(f"num_supernodes must be at least 1, got {num_supernodes}")
    if cpus_per_client != int(cpus_per_client) or not 1 <= cpus_per_client <= cpus:
        raise UserError(f"cpus_per_client must be a whole number from 1 to {cpus} (this machine's CPUs), "
                        f"got {cpus_per_client}: flwr 1.42 takes whole CPUs, and Ray never schedules a "
                        "client that needs more CPUs than the machine has")
    if gpus_per_client < 0:
        raise UserError(f"gpus_per_client must be >= 0, got {gpus_per_client}")
    return int(cpus_per_client)


def _executable(name: str) -> str:
    """The Flower command from this interpreter's environment (not some other one on PATH)."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.is_file() else shutil.which(name)
    if found is None:
        raise UserError(f"`{name}` not found next to {sys.executable} nor on PATH: "
                        "install flwr[simulation] into this environment")
    return found


def _environment(home: Path, tag: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "FLWR_HOME": str(home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
        "RAY_DEDUP_LOGS": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_ADDRESS": "local",
        "PYTHONUNBUFFERED": "1",
        "NO_PROXY": ",".join(filter(None, [env.get("NO_PROXY"), "127.0.0.1,localhost"])),
        "no_proxy": ",".join(filter(None, [env.get("no_proxy"), "127.0.0.1,localhost"])),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        TAG_VAR: tag,
    })
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_superlink(home: Path, env: dict[str, str]) -> subprocess.Popen:
    """Start a simulation SuperLink on a free port and point the ``fl-offsite`` connection at it."""
    log_file = home / "superlink.log"
    for _attempt in range(3):  # another process may take the free port before the SuperLink binds it
        port = _free_port()
        config_file = home / "config.toml"
        config = tomllib.loads(config_file.read_text(encoding="utf-8")) if config_file.exists() else {}
        config.setdefault("superlink", {})[CONNECTION] = {"address": f"127.0.0.1:{port}", "insecure": True}
        config_file.write_text(tomli_w.dumps(config), encoding="utf-8")
        log.info("Starting flower-superlink on 127.0.0.1:%d (FLWR_HOME=%s)", port, home)
        with (home / "superlink.out").open("ab") as out:
            process = subprocess.Popen(
                [_executable("flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess",
                 "--host", "127.0.0.1", "--port", str(port), "--disable-runtime-dependency-installation",
                 "--log-file", str(log_file)],
                env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        started = time.monotonic()
        deadline = started + STARTUP_TIMEOUT_S
        no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        while process.poll() is None and time.monotonic() < deadline:
            try:
                with no_proxy.open(f"http://127.0.0.1:{port}/health", timeout=1) as response:
                    if response.status == 200:
                        log.debug("flower-superlink ready after %.1f s", time.monotonic() - started)
                        return process
            except OSError:
                time.sleep(0.3)
        if process.poll() is None:
            raise RuntimeError(f"flower-superlink did not answer within {STARTUP_TIMEOUT_S:.0f} s; "
                               f"see {log_file} and {home / 'superlink.out'}")
        log.warning("flower-superlink exited with code %s; retrying on another port", process.returncode)
    raise RuntimeError(f"flower-superlink failed to start; see {log_file} and {home / 'superlink.out'}")


def _stream_run(command: list[str], env: dict[str, str], log_path: Path, stream: bool) -> tuple[int, list[str]]:
    """Run ``flwr run --stream``, copy its output to ``log_path`` (and stdout); return run id and log tail."""
    tail: deque[str] = deque(maxlen=40)
    run_id = None
    with log_path.open("w", encoding="utf-8") as log_file, subprocess.Popen(
            command, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, encoding="utf-8", errors="replace") as process:
        for line in process.stdout:
            log_file.write(line)
            tail.append(line)
            if stream:
                sys.stdout.write(line)
                sys.stdout.flush()
            if run_id is None and (match := re.search(r"Successfully started run (\d+)", line)):
                run_id = int(match.group(1))
    if process.returncode != 0 or run_id is None:
        raise RuntimeError(f"`flwr run` failed (exit code {process.returncode}):\n{''.join(tail)}"
                           f"Full output: {log_path}")
    return run_id, list(tail)


def run_status(run_id: int, env: dict[str, str], connection: str = CONNECTION) -> tuple[str, str]:
    """Status (e.g. ``finished:failed``) and its details, from ``flwr ls --format json``."""
    run: dict = {}
    for _attempt in range(10):  # the log stream ends when the run is finished; poll in case it broke off
        result = subprocess.run([_executable("flwr"), "ls", connection, "--run-id", str(run_id), "--format", "json"],
                                env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False)
        try:
            run = json.loads(result.stdout[result.stdout.index("{"):])["runs"][0]
        except (ValueError, KeyError, IndexError):
            raise RuntimeError(f"`flwr ls` gave no run status (exit code {result.returncode}):\n"
                               f"{result.stdout}{result.stderr}") from None
        if run["status"].startswith("finished"):
            break
        time.sleep(1.0)
    return run["status"], run.get("status-details", "")


def _launch_tag(process: psutil.Process) -> str | None:
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


def _tagged_processes(match: Callable[[str], bool]) -> list[psutil.Process]:
    """This user's processes whose launch tag satisfies ``match``, and their descendants."""
    found: dict[int, psutil.Process] = {}
    for process in psutil.process_iter():
        tag = _launch_tag(process)
        if tag is not None and match(tag):
            found[process.pid] = process
            with contextlib.suppress(psutil.Error):
                found.update((child.pid, child) for child in process.children(recursive=True))
    return list(found.values())


def _stop_processes(match: Callable[[str], bool]) -> None:
    """Terminate, then kill, every process whose launch tag satisfies ``match``, until none is left."""
    for grace_s in (5.0, 2.0, 1.0):
        processes = _tagged_processes(match)
        if not processes:
            return
        log.debug("Stopping %s", [p.pid for p in processes])
        for process in processes:
            try:
                process.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(processes, timeout=grace_s)
        for process in alive:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=2.0)
    left = [p.pid for p in _tagged_processes(match)]
    if left:
        log.warning("Could not stop processes %s of a Flower launch; stop them by hand", left)


def _stop_stale_launches() -> None:
    """Stop the processes of earlier launches whose launcher process no longer exists."""
    def stale(tag: str) -> bool:
        try:
            pid, create_time, _ = tag.split(":", 2)
            launcher = psutil.Process(int(pid))  # a new process with the same pid has a later start time
            return abs(launcher.create_time() - float(create_time)) > 1.0 or launcher.status() == psutil.STATUS_ZOMBIE
        except (psutil.NoSuchProcess, ValueError):
            return True

    if _tagged_processes(stale):
        log.warning("Stopping processes left over by a crashed Flower launch")
        _stop_processes(stale)
