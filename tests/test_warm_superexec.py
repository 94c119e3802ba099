"""The warm SuperExec's fallback: a ClientApp task goes to Flower's cold start while the fork server is down,
and the server is started again for the next task. (The forked path itself runs in tests/test_deploy.py.)"""
from __future__ import annotations

import time

import psutil
from flwr.supercore.constant import TaskType
from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor
from flwr.supercore.superexec.executor.types import ExecutionSpec, LaunchResultStatus

from fl_offsite.ops.warm_superexec import ForkServerExecutor


def spec(task_type: TaskType) -> ExecutionSpec:
    return ExecutionSpec(task_type=task_type, runtime_api_address="127.0.0.1:1", token="t", insecure=True,
                         root_certificates_path=None, runtime_dependency_install=False, parent_pid=None,
                         suppress_output=True, task_id=7)


def test_tasks_start_cold_while_the_fork_server_is_down_and_it_comes_back(monkeypatch) -> None:
    cold = []
    monkeypatch.setattr(SubprocessExecutor, "launch", lambda self, s: cold.append(s.task_type) or "cold")
    executor = ForkServerExecutor()
    try:
        first = executor._server
        assert first is not None
        assert executor.launch(spec(TaskType.SERVER_APP)) == "cold"  # only ClientApps are forked
        first.kill()
        first.wait()
        assert executor.launch(spec(TaskType.CLIENT_APP)) == "cold"
        assert cold == [TaskType.SERVER_APP, TaskType.CLIENT_APP]
        second = executor._server
        assert second is not None and second is not first and second.poll() is None
        assert executor.launch(spec(TaskType.CLIENT_APP)).status == LaunchResultStatus.ACCEPTED
        assert cold == [TaskType.SERVER_APP, TaskType.CLIENT_APP]
        deadline = time.monotonic() + 120  # the server imports torch and transformers first
        while not (forked := psutil.Process(second.pid).children()) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert forked  # the task's ClientApp, forked (here it finds no Runtime API)
    finally:
        for child in psutil.Process(executor._server.pid).children() if executor._server else ():
            child.kill()
        executor.close()
    assert second.poll() is not None  # closing ends the server
