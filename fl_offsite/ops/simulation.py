"""Run a Flower app on the local simulation engine (Ray) through the real ``flwr run`` CLI.

How it works (flwr 1.42), and why:

* ``flwr run`` to the default ``local`` connection starts a *detached* ``flower-superlink``
  on the fixed port 39091 and leaves it running; it also reuses whatever answers on that
  port, so a leftover SuperLink from another launch (other FLWR_HOME, other settings)
  would silently serve the next run. Instead this launcher starts ``flower-superlink
  --simulation`` itself on a free port, with an in-memory state, and writes a
  ``[superlink.fl-offsite]`` connection to ``$FLWR_HOME/config.toml``.
* ``flwr run APP fl-offsite --stream`` streams the run's logs; its outcome is read with
  ``flwr ls`` (:func:`fl_offsite.ops.flower_cli.flwr_run`): only ``finished:completed`` counts
  as success; otherwise ``RuntimeError`` carries the status details and the log tail.
* The SuperLink spawns ``flower-superexec`` in a new session, which spawns
  ``flwr-simulation``, which starts Ray (gcs_server, raylet, actors...). Killing the
  SuperLink orphans that tree (measured), and neither process groups nor a process tree
  walk see all of it. So every process of a launch carries an environment tag
  (:data:`fl_offsite.ops.flower_cli.TAG_VAR`, inherited by all descendants); on exit, failure,
  Ctrl-C or SIGTERM the launcher terminates, then kills, every process with its tag. A launch also
  first kills the tagged processes of launches whose launcher process is gone (crashed or
  SIGKILLed), so they cannot eat the memory and CPUs of the next one. ``RAY_ADDRESS=local`` makes
  Ray start its own cluster, never attach to an old one, unless the caller names a cluster.
* Offline: no ``uv sync`` of the app's dependencies (the current environment is used), no
  telemetry, no update check, no Ray usage stats. The venv's ``bin`` is put first on PATH
  because the SuperLink starts its helpers by name.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
import tomllib
from pathlib import Path

from fl_offsite.config.keys import flatten
from fl_offsite.data.tasks import TASK_FOLDERS, jsonl_folder
from fl_offsite.errors import UserError
from fl_offsite.ops.flower_cli import (
    STARTUP_TIMEOUT_S,
    TAG_VAR,
    executable,
    flower_env,
    flwr_run,
    new_launch_tag,
    signals_held,
    sigterm_interrupts,
    stop_processes,
    stop_stale_launches,
    wait_healthy,
    write_connection,
)

log = logging.getLogger(__name__)

ConfigValue = bool | int | float | str
CONNECTION = "fl-offsite"


def run_simulation_app(app_dir: Path, run_config: dict[str, ConfigValue], num_supernodes: int,
                       cpus_per_client: float = 1.0, gpus_per_client: float = 0.0,
                       flwr_home: Path | None = None, stream: bool = True, ray_address: str | None = None) -> None:
    """Run the Flower app in ``app_dir`` in simulation and return when the run has finished.

    ``run_config`` overrides keys of the app's ``[tool.flwr.app.config]``. Each of the
    ``num_supernodes`` simulated nodes gets ``cpus_per_client`` CPUs (a whole number, as
    flwr 1.42 wants) and ``gpus_per_client`` GPUs. ``flwr_home`` holds Flower's state and
    the logs (``run.log``, ``superlink.log``); by default a temporary folder, kept only when
    a ``RuntimeError`` points at its logs. With ``stream`` the run's logs are copied to stdout.
    ``ray_address`` (HOST:PORT of a running Ray cluster's head) runs the ClientApps on that cluster
    instead of a private Ray instance on this machine; the cluster is left running.

    Raises ``UserError`` for bad arguments and ``RuntimeError`` when the run did not
    complete (the ServerApp raised, the SuperLink did not start, ``flwr run`` failed), and
    ``KeyboardInterrupt`` on Ctrl-C or SIGTERM, once every process it started is stopped.
    """
    app_dir = Path(app_dir).resolve()
    _check_app(app_dir, run_config)
    cpus = _check_resources(num_supernodes, cpus_per_client, gpus_per_client, on_this_machine=ray_address is None)
    temporary = flwr_home is None
    home = Path(tempfile.mkdtemp(prefix="fl-offsite-flwr-")) if flwr_home is None else Path(flwr_home).resolve()
    home.mkdir(parents=True, exist_ok=True)
    stop_stale_launches()

    tag = new_launch_tag()
    env = _simulation_env(home, tag, ray_address or "local", str(run_config.get("task", "")))
    federation = (f"num-supernodes={num_supernodes} client-resources-num-cpus={cpus} "
                  f"client-resources-num-gpus={float(gpus_per_client)!r} init-args-log-to-driver=false")
    if ray_address is None:  # a private instance sized to this machine (a cluster refuses sizes: its own apply)
        federation += f" init-args-num-cpus={os.cpu_count() or 1}"
    start = time.perf_counter()
    superlink, keep_logs = None, False
    with sigterm_interrupts():  # SIGTERM, like Ctrl-C, ends in the cleanup below
        try:
            superlink = _start_superlink(home, env)
            run_id = flwr_run(app_dir, CONNECTION, run_config, env, home / "run-config.toml", home / "run.log",
                              stream, options=("--federation-config", federation),
                              logs_note=f"Logs: {home}/run.log and {home}/superlink.log")
        except RuntimeError:
            keep_logs = True  # the message points at them
            raise
        finally:
            with signals_held():  # a second Ctrl-C must not leave Ray's processes behind
                stop_processes(lambda value: value == tag)
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


def _check_resources(num_supernodes: int, cpus_per_client: float, gpus_per_client: float,
                     on_this_machine: bool) -> int:
    cpus = (os.cpu_count() or 1) if on_this_machine else None  # a cluster's nodes may have more
    if num_supernodes < 1:
        raise UserError(f"num_supernodes must be at least 1, got {num_supernodes}")
    if cpus_per_client != int(cpus_per_client) or cpus_per_client < 1 or (cpus and cpus_per_client > cpus):
        limit = f"from 1 to {cpus} (this machine's CPUs)" if cpus else "of at least 1"
        raise UserError(f"cpus_per_client must be a whole number {limit}, got {cpus_per_client}: flwr 1.42 takes "
                        "whole CPUs, and Ray never schedules a client that needs more CPUs than a node has")
    if gpus_per_client < 0:
        raise UserError(f"gpus_per_client must be >= 0, got {gpus_per_client}")
    return int(cpus_per_client)


def _simulation_env(home: Path, tag: str, ray_address: str, task: str) -> dict[str, str]:
    """Flower's environment plus: this launch's home and tag, no dependency installation, Ray quiet and
    on ``ray_address`` ("local": a cluster of its own), no proxy for loopback, and the simulated nodes
    allowed the run's own ``jsonl:`` task folder (the user runs them all; a cluster's nodes keep their own)."""
    folders = [os.environ.get(TASK_FOLDERS, ""), str(jsonl_folder(task) or "")]
    return flower_env({
        TASK_FOLDERS: os.pathsep.join(filter(None, folders)),
        "FLWR_HOME": str(home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
        "RAY_DEDUP_LOGS": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
        # client actors at the run's own priority: at Ray's default (nice 15) any other busy process on the
        # machine, e.g. a second simulation or test worker, starves them (measured: minutes per round)
        "RAY_worker_niceness": "0",
        "RAY_ADDRESS": ray_address,
        "NO_PROXY": ",".join(filter(None, [os.environ.get("NO_PROXY"), "127.0.0.1,localhost"])),
        "no_proxy": ",".join(filter(None, [os.environ.get("no_proxy"), "127.0.0.1,localhost"])),
        TAG_VAR: tag,
    })


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_superlink(home: Path, env: dict[str, str]) -> subprocess.Popen:
    """Start a simulation SuperLink on a free port and point the ``fl-offsite`` connection at it."""
    log_file = home / "superlink.log"
    for _attempt in range(3):  # another process may take the free port before the SuperLink binds it
        port = _free_port()
        write_connection(CONNECTION, f"127.0.0.1:{port}", None, home)
        log.info("Starting flower-superlink on 127.0.0.1:%d (FLWR_HOME=%s)", port, home)
        with (home / "superlink.out").open("ab") as out:
            process = subprocess.Popen(
                [executable("flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess",
                 "--host", "127.0.0.1", "--port", str(port), "--disable-runtime-dependency-installation",
                 "--log-file", str(log_file)],
                env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        started = time.monotonic()
        if wait_healthy("127.0.0.1", port, process):
            log.debug("flower-superlink ready after %.1f s", time.monotonic() - started)
            return process
        if process.poll() is None:
            raise RuntimeError(f"flower-superlink did not answer within {STARTUP_TIMEOUT_S:.0f} s; "
                               f"see {log_file} and {home / 'superlink.out'}")
        log.warning("flower-superlink exited with code %s; retrying on another port", process.returncode)
    raise RuntimeError(f"flower-superlink failed to start; see {log_file} and {home / 'superlink.out'}")
