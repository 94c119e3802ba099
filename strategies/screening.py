"""Screening a round's replies before aggregation: what must not be averaged in, and why."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from flwr.app import Message

from fl_offsite.errors import UserError
from fl_offsite.run.records import ClientReport, Problem
from fl_offsite.surgery.payload import check_payload
from strategies.policy import Payload

LATE = "a reply to no message of this round (a late reply to an earlier one?)"


@dataclass
class Screened:
    """A round's replies sorted: the updates to average in and their reports, the problems (failed, rejected
    and missing replies), and the bytes of every reply's arrays, accepted or not."""

    accepted: list[Message] = field(default_factory=list)
    clients: list[ClientReport] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    bytes_up: int = 0


def check_update(reply: Message, reference: Payload, kind: str, start: Payload,
                 max_norm: float) -> tuple[str | None, float]:
    """Why ``reply``'s update must not be averaged in (None when it is fine), and its distance from ``start``,
    the global payload it trained from: it must match ``reference`` (a ``kind`` payload) and, with
    ``max_norm`` > 0, be at most that far."""
    content = reply.content
    if "arrays" not in content.array_records or "metrics" not in content.metric_records:
        return "reply lacks the 'arrays' or 'metrics' record", float("nan")
    if "num-examples" not in content["metrics"]:
        return "metrics lack num-examples", float("nan")
    update = content.array_records["arrays"].to_torch_state_dict()
    try:
        check_payload(update, reference, kind)
    except (UserError, ValueError, TypeError) as err:
        return str(err), float("nan")
    norm = update_norm(update, start)
    if max_norm > 0 and norm > max_norm:
        return f"update norm {norm:.4g} exceeds strategy.max-update-norm = {max_norm:g}", norm
    return None, norm


def update_norm(update: Payload, reference: Payload) -> float:
    """L2 distance between a client's returned tensors and the global ones it started from."""
    norms = [torch.linalg.vector_norm(update[k].float() - reference[k].float()) for k in reference]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0
