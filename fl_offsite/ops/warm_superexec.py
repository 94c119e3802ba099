"""A data owner's SuperExec that starts each ClientApp from a warm fork server instead of a fresh process.

flwr 1.42 runs every message in a new ``flwr-clientapp`` process, which for a training message spends
seconds importing torch, transformers and peft. Here a fork server imports those once, and each task is a
``fork`` of it running Flower's own ``run_clientapp``: the same one-task-per-process isolation, the same
Runtime API and token, without the imports. The app's own modules (the FAB's code) are never pre-imported,
so each task still runs the code of the run's app.

Run by ``fl-offsite supernode`` beside ``flower-supernode --isolation process``; it takes
``flower-superexec``'s flags: ``python -m fl_offsite.ops.warm_superexec --runtime-api-address ADDR ...``.
"""
from __future__ import annotations

import importlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from typing import IO

from flwr.supercore.constant import TaskType
from flwr.supercore.superexec.executor import LaunchResult
from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor
from flwr.supercore.superexec.executor.types import ExecutionSpec

log = logging.getLogger(__name__)

# Third-party only: what a training message imports (seconds of CPU), and never the app's own code.
WARM_IMPORTS = ("torch", "transformers", "transformers.modeling_utils", "transformers.models.auto.modeling_auto",
                "transformers.conversion_mapping", "peft", "safetensors.torch", "flwr.cli.install", "flwr.clientapp",
                "flwr.supernode.runtime.run_clientapp")
MODULE = "fl_offsite.ops.warm_superexec"  # run as a module, this file's __name__ is __main__
FORK_SERVER_FLAG = "--fork-server"


class ForkServerExecutor(SubprocessExecutor):
    """Flower's subprocess executor, except that ClientApp tasks are forked from a warm server process.

    Other task types, and any task while the server is down (it is restarted for the next one), start
    ``flwr-clientapp`` and its kin the usual way."""

    def __init__(self) -> None:
        self._server: subprocess.Popen | None = None
        self._lock = threading.Lock()
        self._start_server()

    def _start_server(self) -> None:
        self._server = subprocess.Popen([sys.executable, "-m", MODULE, FORK_SERVER_FLAG], stdin=subprocess.PIPE,
                                        text=True, encoding="utf-8")

    def launch(self, spec: ExecutionSpec) -> LaunchResult:
        if spec.task_type != TaskType.CLIENT_APP or spec.runtime_dependency_install:
            return super().launch(spec)
        with self._lock:
            server = self._server
            try:
                if server is None or server.poll() is not None or server.stdin is None:
                    raise BrokenPipeError("the fork server is not running")
                server.stdin.write(json.dumps(_task(spec)) + "\n")
                server.stdin.flush()
                return LaunchResult.accepted()
            except (BrokenPipeError, OSError) as err:
                log.warning("ClientApp fork server unavailable (%s): starting flwr-clientapp cold, and the server "
                            "again", err)
                self.close()
                self._start_server()
        return super().launch(spec)

    def close(self) -> None:
        server, self._server = self._server, None
        if server is None or server.poll() is not None:
            return
        if server.stdin is not None:
            server.stdin.close()  # end of input: the server exits; its running tasks finish on their own
        try:
            server.wait(timeout=5)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def _task(spec: ExecutionSpec) -> dict[str, object]:
    return {"task_id": spec.task_id, "runtime_api_address": spec.runtime_api_address, "token": spec.token,
            "insecure": spec.insecure, "root_certificates_path": spec.root_certificates_path,
            "parent_pid": spec.parent_pid, "suppress_output": spec.suppress_output}


def serve_forks(tasks: IO[str]) -> None:
    """Import ``WARM_IMPORTS``, then fork a ClientApp for each task line on ``tasks`` until it closes."""
    for name in WARM_IMPORTS:
        importlib.import_module(name)
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    get_checkpoint_conversion_mapping("llama")  # builds transformers' whole table once: 0.2-0.35 s of regexes
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps the finished tasks
    for line in tasks:
        task = json.loads(line)
        pid = os.fork()
        if pid == 0:
            os._exit(_run_task(task))
        print(f"fl-offsite: ClientApp task {task['task_id']} forked from the warm process as pid {pid}", flush=True)


def _run_task(task: dict) -> int:
    """In the forked child: Flower's ``run_clientapp`` for one task; its exit code."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    os.close(sys.stdin.fileno())
    if task["suppress_output"]:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.dup2(devnull, sys.stderr.fileno())
    from flwr.supercore.tls import validate_and_resolve_root_certificates
    from flwr.supernode.runtime.run_clientapp import run_clientapp

    try:
        run_clientapp(runtime_api_address=task["runtime_api_address"], token=task["token"],
                      insecure=task["insecure"], parent_pid=task["parent_pid"],
                      certificates=validate_and_resolve_root_certificates(task["root_certificates_path"],
                                                                          task["insecure"]))
    except SystemExit as done:  # flwr_exit: the task's status is already pushed
        return done.code if isinstance(done.code, int) else 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    return 0


def main() -> None:
    if sys.argv[1:] == [FORK_SERVER_FLAG]:
        serve_forks(sys.stdin)
        return
    from flwr.supercore.cli import flower_superexec
    from flwr.supercore.superexec import run_superexec

    run_superexec.get_executor = lambda *args, **kwargs: ForkServerExecutor()  # flwr 1.42 has no executor hook
    flower_superexec()


if __name__ == "__main__":
    main()
