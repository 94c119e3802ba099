"""Screening a round's replies before aggregation: what must not be averaged in, and why."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from flwr.app import Message, MetricRecord

from fl_offsite.errors import UserError
from fl_offsite.run.records import CLIENT_METRICS, ClientReport, Problem
from fl_offsite.surgery.payload import check_payload
from strategies.policy import Payload

LATE = "a reply to no message of this round (a late reply to an earlier one?)"
WEIGHT = "num-examples"  # what Flower's strategies weight an update by: the node's count, when usable
# What the DP strategy weights by (strategies.aggregation): the owner's 1 for every update, never a node's value, as
# Flower's privacy accountant requires equal weights
EQUAL_WEIGHT = "equal-weight"
COUNTS = {"num-examples", "partition-id", "round", "train-steps", "trainable-params"}  # whole numbers
MAX_REASON = 300  # characters of a reason kept (a node's text, or quoting it: shown, never trusted)


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
    if set(content.array_records) != {"arrays"} or set(content.metric_records) != {"metrics"} \
            or content.config_records:
        return "reply must hold exactly the 'arrays' and 'metrics' records", float("nan")
    if "num-examples" not in content["metrics"]:
        return "metrics lack num-examples", float("nan")
    try:
        update = content.array_records["arrays"].to_torch_state_dict()
    except Exception as err:  # noqa: BLE001 - a node's bytes: whatever numpy or torch make of them, it is refused
        return f"arrays do not decode: {type(err).__name__}: {err}", float("nan")
    try:
        check_payload(update, reference, kind)
    except (UserError, ValueError, TypeError) as err:
        return str(err), float("nan")
    norm = update_norm(update, start)
    if max_norm > 0 and norm > max_norm:
        return f"update norm {norm:.4g} exceeds strategy.max-update-norm = {max_norm:g}", norm
    return None, norm


def client_metrics(metrics: MetricRecord) -> dict[str, int | float]:
    """The metrics a reply may report (``fl_offsite.run.records.CLIENT_METRICS``), each a finite number (whole
    where it is a count); every other key, and any other value, is dropped."""
    known: dict[str, int | float] = {}
    for key in CLIENT_METRICS.values():
        value = metrics.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            continue
        if key in COUNTS and not float(value).is_integer():
            continue
        known[key] = int(value) if key in COUNTS else float(value)
    return known


def usable_weight(weight: float, cap: int) -> bool:
    """Whether a reply's weight is one to average by: in (0, ``cap``]."""
    return 0 < weight <= cap


def shown_reason(reason: str | None) -> str | None:
    """Why a reply was not averaged in, as the log, the records and errors show it (a node's error text, or a
    rejection's reason quoting what the node sent): printable, at most MAX_REASON characters."""
    if reason is None:
        return None
    text = "".join(c if c.isprintable() else " " for c in reason)
    return text if len(text) <= MAX_REASON else text[:MAX_REASON] + "..."


def update_norm(update: Payload, reference: Payload) -> float:
    """L2 distance between a client's returned tensors and the global ones it started from."""
    norms = [torch.linalg.vector_norm(update[k].float() - reference[k].float()) for k in reference]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0
