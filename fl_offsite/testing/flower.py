"""Drive the ServerApp's logic and the ClientApp in one process, without Ray: a small Grid, and the helpers
the tests of whole runs share (a tiny run config, a run, its messages and records, a crash)."""
from __future__ import annotations

import json
import subprocess
import time
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity  # internal: what the runtime sets, with no public setter

from fl_offsite.config.settings import validate
from fl_offsite.run.folder import CHECKPOINT, CHECKPOINT_ROUND, METRICS


class InProcessGrid(Grid):
    """Delivers each message straight to ``client_app`` with the destination node's context.

    ``fault(message, node_index)`` may return a reply to use instead (to inject failures).
    Client exceptions become error replies, as Flower's runtime makes them.
    """

    def __init__(self, client_app: ClientApp, num_nodes: int, run_config: dict,
                 fault: Callable[[Message, int], Message | None] | None = None) -> None:
        TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1
        self.client_app, self.fault = client_app, fault
        self.node_ids = [1000 + i for i in range(num_nodes)]
        self.contexts = {
            node: Context(run_id=1, node_id=node, node_config={"partition-id": i, "num-partitions": num_nodes},
                          state=RecordDict(), run_config=dict(run_config))
            for i, node in enumerate(self.node_ids)}
        self.sent: list[Message] = []

    def set_run(self, run) -> None:  # pragma: no cover - not used in process
        pass

    @property
    def run(self):  # pragma: no cover
        raise NotImplementedError

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content=content, message_type=message_type, dst_node_id=dst_node_id, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_ids)

    def get_nodes(self):  # pragma: no cover
        return []

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:  # pragma: no cover
        raise NotImplementedError("use send_and_receive")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:  # pragma: no cover
        raise NotImplementedError("use send_and_receive")

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid4())
            node = msg.metadata.dst_node_id
            self.sent.append(msg)
            injected = self.fault(msg, self.node_ids.index(node)) if self.fault else None
            if injected is False:
                continue  # the node disappears: no reply
            try:
                reply = injected or self.client_app(msg, self.contexts[node])
            except Exception as err:  # noqa: BLE001 - as Flower's runtime does
                reply = Message(Error(code=0, reason=f"{type(err).__name__}: {err}\n{traceback.format_exc(limit=2)}"),
                                reply_to=msg)
            reply.metadata.__dict__["_src_node_id"] = node
            replies.append(reply)
        return replies


class NoOwner:
    """Owner hooks (strategies.policy.OwnerHooks) that score nothing, keep nothing and never re-align: for
    driving the offsite strategy without a model owner."""

    def evaluate(self, rnd: int, payload: dict) -> dict[str, dict]:
        return {}

    def after_round(self, record, payload: dict) -> None:
        pass

    def realign(self, rnd: int, payload: dict) -> None:
        return None

    def realign_factors(self) -> dict:
        return {}

    def restore_factors(self, factors: dict) -> None:
        raise AssertionError("no re-alignment to restore")


def tiny_config(model_dir, results_dir, **overrides) -> dict:
    """A run config small enough for a test: a 6-block tiny model, 2 rounds of 2 steps, 6 test examples."""
    return validate({
        "model": str(model_dir), "task": "bbc-news", "num-rounds": 2, "split.adapter-layers": "1,1",
        "split.emulator-layers": 2, "train.local-steps": 2, "train.batch-size": 4, "train.max-length": 64,
        "train.lr": 1e-3, "eval.limit": 6, "results.dir": str(results_dir), "data.alpha": 0.5, **overrides})


def run(config: dict, num_nodes: int = 3, fault=None) -> InProcessGrid:
    """Run the ServerApp's logic against ``num_nodes`` in-process ClientApps; return the grid (its messages)."""
    from fl_offsite.app.client_app import app as client_app
    from fl_offsite.app.server_app import run_federated

    grid = InProcessGrid(client_app, num_nodes, config, fault=fault)
    run_federated(grid, config)
    return grid


def of_type(grid: InProcessGrid, kind: str) -> list[Message]:
    return [m for m in grid.sent if m.metadata.message_type == kind]


def rounds_of(run_dir) -> list[dict]:
    """The round records of a run folder, as written (metrics.jsonl's JSON lines)."""
    return [json.loads(line) for line in (run_dir / METRICS).read_text().splitlines()]


def checkpointed_round(results: Path) -> int:
    """The round of the run's checkpoint under ``results``, -1 while there is none (or it is being replaced)."""
    try:
        return json.loads((results / CHECKPOINT / CHECKPOINT_ROUND).read_text())["round"]
    except (OSError, ValueError):
        return -1


def wait_until(condition: Callable, process: subprocess.Popen, what: str, log: Callable[[], str],
               timeout: float = 600):
    """Poll ``condition`` until it returns something truthy, and return that; fail with the end of ``log()`` if
    ``process`` ends or ``timeout`` seconds pass first."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if process.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"the process ended or stalled before {what}; its log ends:\n{log()[-3000:]}")
        time.sleep(0.2)
    return value


class Crash(Exception):
    """Stands for the server process dying mid-run."""


def crash_in_round(n: int):
    """A fault that crashes the server when round ``n``'s training messages go out."""
    def fault(msg, node_index):
        if msg.metadata.message_type == "train" and msg.content["config"]["round"] == n:
            raise Crash
        return None
    return fault
