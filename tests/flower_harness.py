"""Drive the ServerApp's logic and the ClientApp in one process, without Ray: a small Grid."""
from __future__ import annotations

import traceback
from collections.abc import Callable, Iterable
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity


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

