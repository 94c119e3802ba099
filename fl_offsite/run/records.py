"""A run's round records: one line of metrics.jsonl per round, and its parts.

``to_json`` writes the keys runs have always written, so earlier runs resume and read back;
``from_json`` refuses a malformed record with a :class:`RecordError` naming the key at fault.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal, TypeVar

T = TypeVar("T")
Kind = Literal["failed", "rejected", "missing"]
KINDS: tuple[Kind, ...] = ("failed", "rejected", "missing")
SCORED = ("acc", "acc_stderr", "acc_norm", "n")  # what every writer reads of a model's scores
# a client's metrics (fl_offsite.app.client_app's train reply) by attribute: JSON key
CLIENT_METRICS = {"num_examples": "num-examples", "partition_id": "partition-id", "round": "round",
                  "train_loss": "train-loss", "train_steps": "train-steps", "train_seconds": "train-seconds",
                  "tokens_per_s": "tokens-per-s", "peak_memory_mb": "peak-memory-mb",
                  "trainable_params": "trainable-params"}
CLIENT_TRAFFIC = ("node", "bytes_down", "realign_bytes_down", "bytes_up", "update-norm")


class RecordError(ValueError):
    """A record read back is not one a run writes."""


def _object(data: Any, where: str, required: tuple[str, ...], optional: tuple[str, ...] | None = ()) -> dict:
    """``data``, if it is a JSON object with every ``required`` key and no key outside ``required`` and
    ``optional`` (``optional=None``: any other key)."""
    if not isinstance(data, dict):
        raise RecordError(f"{where} must be a JSON object, not {data!r:.80}")
    if missing := [key for key in required if key not in data]:
        raise RecordError(f"{where} lacks {', '.join(map(repr, missing))}")
    if optional is not None and (unknown := [k for k in data if k not in required and k not in optional]):
        raise RecordError(f"{where} has unknown key(s) {', '.join(map(repr, unknown))}")
    return data


def _number(value: Any, where: str) -> Any:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RecordError(f"{where} must be a number, not {value!r:.80}")
    return value


def _integer(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise RecordError(f"{where} must be an integer, not {value!r:.80}")
    return value


def _list(value: Any, where: str, item: Callable[[Any, str], T]) -> list[T]:
    if not isinstance(value, list):
        raise RecordError(f"{where} must be a list, not {value!r:.80}")
    return [item(x, f"{where}[{i}]") for i, x in enumerate(value)]


def _optional(data: dict, key: str, read: Callable[[Any, str], T], where: str | None = None) -> T | None:
    """``read(data[key], where or key)``, or None without ``key``."""
    return read(data[key], where or key) if key in data else None


def _present(record: Any) -> dict[str, Any]:
    """A flat record's fields as JSON, in order, leaving out those that are None."""
    return {f.name: value for f in fields(record) if (value := getattr(record, f.name)) is not None}


@dataclass(frozen=True)
class Problem:
    """A reply not averaged in: failed (an error reply), rejected (screened out) or missing, and why (an error
    reply may give no reason)."""

    node: int
    kind: Kind
    reason: str | None

    def to_json(self) -> dict[str, Any]:
        return {"node": self.node, "kind": self.kind, "reason": self.reason}

    @classmethod
    def from_json(cls, data: Any, where: str = "problem") -> Problem:
        d = _object(data, where, ("node", "kind", "reason"))
        if d["kind"] not in KINDS or not isinstance(d["reason"], str | None):
            raise RecordError(f"{where} must have a kind in {KINDS} and a reason text, not {d!r:.120}")
        return cls(_integer(d["node"], f"{where}.node"), d["kind"], d["reason"])


@dataclass(frozen=True)
class ClientReport:
    """An accepted update: the node, the bytes of its payload down and up (and of its emulator's re-alignment
    factors down), its distance from the global payload, and the metrics its reply carried; only num-examples
    is required of a reply, the others are None when it sent none."""

    node: int
    bytes_down: int
    bytes_up: int
    update_norm: float
    num_examples: float
    realign_bytes_down: int | None = None
    partition_id: int | None = None
    round: int | None = None
    train_loss: float | None = None
    train_steps: int | None = None
    train_seconds: float | None = None
    tokens_per_s: float | None = None
    peak_memory_mb: float | None = None
    trainable_params: int | None = None
    other: dict[str, Any] = field(default_factory=dict)  # the reply's other metrics, as sent

    @classmethod
    def of_reply(cls, node: int, bytes_down: int, realign_bytes_down: int | None, bytes_up: int,
                 update_norm: float, metrics: Mapping[str, Any]) -> ClientReport:
        """The report of a reply with ``metrics`` (its MetricRecord), which must hold num-examples."""
        known = {attr: metrics[key] for attr, key in CLIENT_METRICS.items() if key in metrics}
        other = {key: value for key, value in metrics.items() if key not in CLIENT_METRICS.values()}
        return cls(node=node, bytes_down=bytes_down, bytes_up=bytes_up, update_norm=update_norm,
                   realign_bytes_down=realign_bytes_down, other=other, **known)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"node": self.node, "bytes_down": self.bytes_down}
        if self.realign_bytes_down is not None:
            out["realign_bytes_down"] = self.realign_bytes_down
        out.update({"bytes_up": self.bytes_up, "update-norm": self.update_norm})
        metrics = {key: value for attr, key in CLIENT_METRICS.items() if (value := getattr(self, attr)) is not None}
        return {**out, **metrics, **{k: v for k, v in self.other.items() if k not in out and k not in metrics}}

    @classmethod
    def from_json(cls, data: Any, where: str = "client") -> ClientReport:
        d = _object(data, where, ("node", "bytes_down", "bytes_up", "update-norm", "num-examples"), None)
        metrics = {key: value for key, value in d.items() if key not in CLIENT_TRAFFIC}
        for key in metrics.keys() & set(CLIENT_METRICS.values()):
            _number(metrics[key], f"{where}.{key}")
        return cls.of_reply(_integer(d["node"], f"{where}.node"), _integer(d["bytes_down"], f"{where}.bytes_down"),
                            _optional(d, "realign_bytes_down", _integer, f"{where}.realign_bytes_down"),
                            _integer(d["bytes_up"], f"{where}.bytes_up"),
                            _number(d["update-norm"], f"{where}.update-norm"), metrics)


@dataclass(frozen=True)
class Traffic:
    """A round's payload bytes, all clients (``communication`` in metrics.jsonl): the round's, the run's totals
    so far, the one-time model deliveries apart, and the emulators' re-alignment factors (None: none sent)."""

    bytes_down: int
    bytes_up: int
    cumulative_bytes_down: int
    cumulative_bytes_up: int
    one_time_bytes: int
    realign_bytes_down: int | None = None
    cumulative_realign_bytes_down: int | None = None

    def bytes_so_far(self) -> int:
        """Everything the rounds sent up to this one: payloads down and up, re-alignment factors down."""
        return self.cumulative_bytes_down + self.cumulative_bytes_up + (self.cumulative_realign_bytes_down or 0)

    def to_json(self) -> dict[str, Any]:
        return _present(self)

    @classmethod
    def from_json(cls, data: Any, where: str = "communication") -> Traffic:
        names = [f.name for f in fields(cls)]
        d = _object(data, where, tuple(names[:5]), tuple(names[5:]))
        return cls(**{key: _integer(value, f"{where}.{key}") for key, value in d.items()})


@dataclass(frozen=True)
class Privacy:
    """The privacy spent so far (Flower's RDP accountant): epsilon at delta, over ``releases`` rounds."""

    epsilon: float
    delta: float
    releases: int

    def to_json(self) -> dict[str, Any]:
        return _present(self)

    @classmethod
    def from_json(cls, data: Any, where: str = "privacy") -> Privacy:
        d = _object(data, where, ("epsilon", "delta", "releases"))
        return cls(_number(d["epsilon"], f"{where}.epsilon"), _number(d["delta"], f"{where}.delta"),
                   _integer(d["releases"], f"{where}.releases"))


@dataclass(frozen=True)
class RealignedEmulator:
    """One emulator's re-alignment: its held-out middle-output error before and after, and each step's loss."""

    error_before: float
    error_after: float
    losses: list[float]

    def to_json(self) -> dict[str, Any]:
        return {"error_before": self.error_before, "error_after": self.error_after, "losses": list(self.losses)}

    @classmethod
    def from_json(cls, data: Any, where: str) -> RealignedEmulator:
        d = _object(data, where, ("error_before", "error_after", "losses"))
        return cls(_number(d["error_before"], f"{where}.error_before"),
                   _number(d["error_after"], f"{where}.error_after"), _list(d["losses"], f"{where}.losses", _number))


@dataclass(frozen=True)
class RealignRecord:
    """The owner's re-alignment of its emulators before a round (fl_offsite.emulator.realign): the steps, each
    emulator's by middle size k, and the owner's seconds."""

    steps: int
    emulators: dict[int, RealignedEmulator]
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {"steps": self.steps, "emulators": {str(k): e.to_json() for k, e in self.emulators.items()},
                "seconds": self.seconds}

    @classmethod
    def from_json(cls, data: Any, where: str = "realign") -> RealignRecord:
        d = _object(data, where, ("steps", "emulators", "seconds"))
        emulators = _object(d["emulators"], f"{where}.emulators", (), None)
        if bad := [k for k in emulators if not (isinstance(k, str) and k.isdigit())]:
            raise RecordError(f"{where}.emulators must be keyed by middle size k, not {bad[0]!r}")
        return cls(_integer(d["steps"], f"{where}.steps"),
                   {int(k): RealignedEmulator.from_json(e, f"{where}.emulators.{k}") for k, e in emulators.items()},
                   _number(d["seconds"], f"{where}.seconds"))


def _scores(data: Any, where: str) -> dict[str, dict[str, Any]]:
    """Model -> its scores (fl_offsite.learn.evaluate.evaluate_task's, kept as they are)."""
    for model, scores in _object(data, where, (), None).items():
        for key in SCORED:
            _number(_object(scores, f"{where}.{model}", SCORED, None)[key], f"{where}.{model}.{key}")
    return data


@dataclass(frozen=True)
class RoundRecord:
    """Round ``round``'s line of metrics.jsonl: the scores of each model (``{}`` for a round ``eval.every``
    skips) and, after a training round, what it did; round 0 (before training) and zero-shot runs have
    scores only, and the re-alignment before round 0 if any. Each part may be absent (None)."""

    round: int
    scores: dict[str, dict[str, Any]]
    seconds: float | None = None
    clients: list[ClientReport] | None = None
    problems: list[Problem] | None = None
    lr: float | None = None
    traffic: Traffic | None = None
    realign: RealignRecord | None = None
    privacy: Privacy | None = None

    @property
    def missing(self) -> int:
        """How many sampled nodes sent no reply."""
        return sum(p.kind == "missing" for p in self.problems or [])

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"round": self.round, "eval": self.scores}
        if self.seconds is not None:
            out["seconds"] = self.seconds
        if self.clients is not None:
            out["clients"] = [c.to_json() for c in self.clients]
        if self.problems is not None:
            out.update(problems=[p.to_json() for p in self.problems], missing=self.missing)
        if self.lr is not None:
            out["lr"] = self.lr
        for key, part in (("communication", self.traffic), ("realign", self.realign), ("privacy", self.privacy)):
            if part is not None:
                out[key] = part.to_json()
        return out

    @classmethod
    def from_json(cls, data: Any) -> RoundRecord:
        d = _object(data, "round record", ("round", "eval"),
                    ("seconds", "clients", "problems", "missing", "lr", "communication", "realign", "privacy"))
        record = cls(_integer(d["round"], "round"), _scores(d["eval"], "eval"),
                     seconds=_optional(d, "seconds", _number),
                     clients=_optional(d, "clients", lambda v, w: _list(v, w, ClientReport.from_json)),
                     problems=_optional(d, "problems", lambda v, w: _list(v, w, Problem.from_json)),
                     lr=_optional(d, "lr", _number),
                     traffic=_optional(d, "communication", Traffic.from_json),
                     realign=_optional(d, "realign", RealignRecord.from_json),
                     privacy=_optional(d, "privacy", Privacy.from_json))
        if ("missing" in d) != ("problems" in d) or d.get("missing", 0) != record.missing:
            raise RecordError(f"missing = {d.get('missing')!r} does not count the problems' missing nodes "
                              f"({record.missing})")
        return record
