"""The offsite strategy: any Flower strategy, plus update checks, server-side evaluation
of the plug-in and emulator models, per-client accounting and checkpoints.

It wraps the aggregation strategy by composition: sampling and aggregation are the
inner strategy's; this class only filters what goes in and records what comes out.
Imports run one way: ``strategies`` uses the method-level library (payload checks, the
results folder) and, of the app, only ``fl_offsite.app.server_app`` uses ``strategies``.
"""
from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import TypedDict

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, Metadata, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fl_offsite.emulator.realign import Realignment
from fl_offsite.errors import UserError
from fl_offsite.run.folder import AfterRound, Checkpoint, RunFolder
from fl_offsite.run.records import ClientReport, Privacy, Problem, RealignRecord, RoundRecord, Traffic
from fl_offsite.surgery.payload import check_payload

log = logging.getLogger(__name__)

ACCOUNTANT = "__privacy_accountant__"
REALIGNMENT = "__realignment__"  # the emulators' re-alignment factors, by k
# Flower strategy attributes learned across rounds: FedAdam/FedYogi/FedAdagrad's moments, FedAvgM's momentum
# and the global arrays it steps from (the others are configuration, or reset in every configure_train).
LEARNED = ("current_arrays", "m_t", "v_t", "momentum_vector")
Evaluator = Callable[[int, dict[str, torch.Tensor]], dict[str, dict]]  # (round, payload) -> scores


class RoundInProgress(TypedDict, total=False):
    """What one round's callbacks hand on: ``configure_train`` sets the first three, ``aggregate_train`` the
    others, and ``evaluate`` builds the round's record from them."""

    start: float  # time.perf_counter() when the round's messages went out
    sent: list[Metadata]  # the grid sets their message ids when it pushes them
    bytes_down: dict[int, int]  # node -> bytes sent to it
    realign_down: dict[int, int]  # node -> bytes of its emulator's re-alignment factors sent to it
    realign: RealignRecord | None  # the owner's re-alignment before the round
    clients: list[ClientReport]  # accepted replies
    problems: list[Problem]  # failed, rejected and missing replies
    bytes_up: int  # every reply's arrays, accepted or not


class OffsiteStrategy(Strategy):
    """Wrap ``inner``; evaluate with ``evaluate_payload``; record rounds in ``run``.

    ``base_config`` goes to every training message, ``node_config[node]`` to that node's (its model's digest,
    split and emulator size); only the nodes of ``node_config`` train (the others were refused at delivery).
    With ``realignment``, the owner re-aligns its emulators before each round (and before round 0's evaluation)
    and each message carries its node's emulator's factors beside the adapter (record ``"realign"``).
    """

    def __init__(self, inner: Strategy, reference: dict[str, torch.Tensor], evaluate_payload: Evaluator,
                 run: RunFolder, lr_at: Callable[[int], float], min_replies: int, seed: int,
                 base_config: dict, node_config: dict[int, dict], rounds_done: int = 0, max_update_norm: float = 0.0,
                 round_timeout: float | None = None, after_round: AfterRound | None = None,
                 payload_kind: str = "adapter", realignment: Realignment | None = None) -> None:
        self.inner = inner
        self.reference = {k: torch.empty_like(v, device="meta") for k, v in reference.items()}
        self.payload_kind = payload_kind  # what the replies carry, for the reasons of a rejection
        self.evaluate_payload = evaluate_payload
        self.run = run
        self.lr_at = lr_at
        self.min_replies = min_replies
        self.seed = seed
        self.base_config = base_config
        self.node_config = node_config
        self.offset = rounds_done  # rounds finished before a resume
        self.max_update_norm = max_update_norm
        self.round_timeout = round_timeout
        self.after_round = after_round
        self.realignment = realignment
        self._global: dict[str, torch.Tensor] = {}
        self._round: RoundInProgress = {}

    # --- training ---------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        rnd = server_round + self.offset
        config = ConfigRecord({**self.base_config, **config, "lr": self.lr_at(rnd), "round": rnd})
        start = time.perf_counter()
        self._global = arrays.to_torch_state_dict()
        realigned = self._realign(rnd, self._global)
        factors = {k: ArrayRecord(f) for k, f in self.realignment.factors().items()} if self.realignment else {}
        with seeded_global_random(self.seed * 100_003 + rnd):  # the inner strategy samples the nodes
            sampled = self.inner.configure_train(rnd, arrays, config, EligibleNodes(grid, self.node_config))
            messages = [self._for_node(m, factors) for m in sampled]
        down = arrays.count_bytes()
        realign_down = {m.metadata.dst_node_id: m.content["realign"].count_bytes() for m in messages if factors}
        self._round = RoundInProgress(start=start, sent=[m.metadata for m in messages],
                                      bytes_down={m.metadata.dst_node_id: down for m in messages},
                                      realign_down=realign_down, realign=realigned)
        extra = f" (and {max(realign_down.values(), default=0) / 1e6:.2f} MB of emulator re-alignment)"
        log.info("round %d: sent %.2f MB to each of %d clients%s", rnd, down / 1e6, len(messages),
                 extra if factors else "")
        return messages

    def _for_node(self, message: Message, factors: dict[int, ArrayRecord]) -> Message:
        """``message`` with its node's own keys in the config (Flower's strategies share one content), and its
        emulator's re-alignment ``factors`` (by k) if any."""
        node = message.metadata.dst_node_id
        content = RecordDict(dict(message.content.items()))
        content["config"] = ConfigRecord({**message.content["config"], **self.node_config[node]})
        if factors:
            content["realign"] = factors[self.node_config[node]["emulator-layers"]]
        return Message(content=content, message_type=message.metadata.message_type, dst_node_id=node,
                       group_id=message.metadata.group_id, ttl=message.metadata.ttl)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        rnd = server_round + self.offset
        replies = list(replies)
        accepted, clients, problems = [], [], []
        asked = {m.message_id: m.dst_node_id for m in self._round["sent"]}
        answered, up = set(), 0
        for reply in replies:
            node = reply.metadata.src_node_id
            if asked.get(reply.metadata.reply_to_message_id) != node:
                problems.append(Problem(node, "rejected",
                                        "a reply to no message of this round (a late reply to an earlier one?)"))
                continue
            answered.add(node)
            if not reply.has_error() and "arrays" in reply.content.array_records:
                up += reply.content["arrays"].count_bytes()  # it travelled, whether accepted or not
            if reply.has_error():
                problems.append(Problem(node, "failed", reply.error.reason))
                continue
            reason, norm = self._check(reply)
            if reason:
                problems.append(Problem(node, "rejected", reason))
                continue
            accepted.append(reply)
            clients.append(ClientReport.of_reply(
                node, self._round["bytes_down"].get(node, 0),
                self._round["realign_down"][node] if self._round["realign_down"] else None,
                reply.content["arrays"].count_bytes(), norm, dict(reply.content["metrics"])))
        waited = f"no reply within strategy.round-timeout = {self.round_timeout:g} s" if self.round_timeout else \
            "no reply"
        problems += [Problem(node, "missing", waited) for node in asked.values() if node not in answered]
        for c in clients:
            log.info("round %d: client %s loss %.4f, %d examples, %.1f s, %.0f tokens/s, peak %.0f MB", rnd,
                     int(_or(c.partition_id, -1)), _or(c.train_loss, float("nan")), int(c.num_examples),
                     _or(c.train_seconds, 0.0), _or(c.tokens_per_s, 0.0), _or(c.peak_memory_mb, 0.0))
        for problem in problems:
            log.warning("round %d: node %s %s: %s", rnd, problem.node, problem.kind, problem.reason)
        sent = len(self._round["bytes_down"])
        if len(accepted) < self.min_replies:
            details = "; ".join(f"node {p.node} {p.kind}: {p.reason}" for p in problems)
            raise RuntimeError(f"round {rnd}: only {len(accepted)} of {sent} clients returned a usable update "
                               f"(need {self.min_replies}); {details or 'the others timed out'}")
        self._round.update(clients=clients, problems=problems, bytes_up=up)
        arrays, metrics = self.inner.aggregate_train(rnd, accepted)
        return self._as_reference(arrays), metrics

    def _as_reference(self, arrays: ArrayRecord | None) -> ArrayRecord | None:
        """``arrays`` in the global payload's dtypes (FedAdam, FedYogi and FedAdagrad step in float64)."""
        if arrays is None:
            return None
        state = arrays.to_torch_state_dict()
        if all(tensor.dtype == self.reference[name].dtype for name, tensor in state.items()):
            return arrays
        return ArrayRecord({name: tensor.to(self.reference[name].dtype) for name, tensor in state.items()})

    def _check(self, reply: Message) -> tuple[str | None, float]:
        """Why an update must not be averaged in (None when it is fine), and its distance from the global one."""
        content = reply.content
        if "arrays" not in content.array_records or "metrics" not in content.metric_records:
            return "reply lacks the 'arrays' or 'metrics' record", float("nan")
        if "num-examples" not in content["metrics"]:
            return "metrics lack num-examples", float("nan")
        update = content["arrays"].to_torch_state_dict()
        try:
            check_payload(update, self.reference, self.payload_kind)
        except (UserError, ValueError, TypeError) as err:
            return str(err), float("nan")
        norm = update_norm(update, self._global)
        if self.max_update_norm > 0 and norm > self.max_update_norm:
            return (f"update norm {norm:.4g} exceeds strategy.max-update-norm = {self.max_update_norm:g}"), norm
        return None, norm

    # --- evaluation and records -------------------------------------------
    def evaluate(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Flower's ``evaluate_fn``, after each round (and before the first): evaluate, record, checkpoint."""
        rnd = server_round + self.offset
        if server_round == 0 and self.offset > 0:
            return None  # resumed: round 0 is already on record
        payload = arrays.to_torch_state_dict()
        prealigned = self._realign(0, payload) if rnd == 0 else None
        results = self.evaluate_payload(rnd, payload)
        record = self.round_record(rnd, results)
        if prealigned:
            record = replace(record, realign=prealigned)
        self.keep(record, payload)
        return MetricRecord({f"{model}.{k}": v for model, m in results.items() for k, v in m.items()
                             if isinstance(v, (int, float))})

    def _realign(self, rnd: int, payload: dict[str, torch.Tensor]) -> RealignRecord | None:
        done = self.realignment.before_round(rnd, payload) if self.realignment else None
        return RealignRecord.from_json(done) if done else None

    def round_record(self, rnd: int, results: dict[str, dict]) -> RoundRecord:
        """Round ``rnd``'s line of metrics.jsonl: the evaluation and, after training, what the round did."""
        if rnd == 0:
            return RoundRecord(rnd, results)
        seconds = time.perf_counter() - self._round["start"]
        record = RoundRecord(rnd, results, seconds=seconds, clients=self._round["clients"],
                             problems=self._round["problems"], lr=self.lr_at(rnd),
                             traffic=self._communication(rnd), realign=self._round["realign"])
        spent = self.inner.privacy_spent() if hasattr(self.inner, "privacy_spent") else None
        if spent is not None:
            record = replace(record, privacy=Privacy(spent.epsilon, spent.delta, spent.num_releases))
            log.info("round %d: privacy spent epsilon %.3f at delta %g", rnd, spent.epsilon, spent.delta)
        return record

    def keep(self, record: RoundRecord, payload: dict[str, torch.Tensor]) -> None:
        """Append ``record`` to the run, checkpoint the round, then the ``after_round`` hook (TensorBoard, PEFT)."""
        self.run.append_round(record)
        self.run.save_checkpoint(Checkpoint(record.round, payload, self.state()))
        if self.after_round is not None:
            self.after_round(record, payload)

    def _communication(self, rnd: int) -> Traffic:
        """The round's payload traffic, its running total over the run, and the one-time model deliveries apart."""
        earlier = [r.traffic for r in self.run.rounds() if 0 < r.round < rnd and r.traffic]
        down, up = sum(self._round["bytes_down"].values()), self._round["bytes_up"]
        total_down = (earlier[-1].cumulative_bytes_down if earlier else 0) + down
        total_up = (earlier[-1].cumulative_bytes_up if earlier else 0) + up
        one_time = self.run.delivered_bytes()
        log.info("round %d: %ss %.2f MB down, %.2f MB up this round; %.2f MB down, %.2f MB up so far "
                 "(one-time model deliveries apart: %.1f MB)", rnd, self.payload_kind, down / 1e6, up / 1e6,
                 total_down / 1e6, total_up / 1e6, one_time / 1e6)
        traffic = Traffic(down, up, total_down, total_up, one_time)
        if self.realignment:  # the emulators' factors, apart from the adapter's bytes
            realign = sum(self._round["realign_down"].values())
            so_far = realign + ((earlier[-1].cumulative_realign_bytes_down or 0) if earlier else 0)
            traffic = replace(traffic, realign_bytes_down=realign, cumulative_realign_bytes_down=so_far)
            log.info("round %d: emulator re-alignment %.2f MB down this round, %.2f MB so far", rnd, realign / 1e6,
                     so_far / 1e6)
        return traffic

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return []  # the model owner evaluates on its own held-out data

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None

    def summary(self) -> None:
        log.info("offsite strategy wrapping %s", type(self.inner).__name__)
        self.inner.summary()

    # --- resumable state ---------------------------------------------------
    def state(self) -> dict:
        """What the inner strategy carries from round to round (:data:`LEARNED`), its privacy accountant's state
        and the emulators' re-alignment factors; everything else is configuration, rebuilt on resume."""
        out = {name: value for name in LEARNED if (value := getattr(self.inner, name, None)) is not None}
        accountant = getattr(self.inner, "accountant", None)
        if accountant is not None:
            out[ACCOUNTANT] = accountant.state_dict()
        if self.realignment is not None:
            out[REALIGNMENT] = self.realignment.factors()
        return out

    def restore(self, state: dict) -> None:
        """Put back what :meth:`state` saved (a checkpoint's other keys, if any, are ignored)."""
        for name in LEARNED:
            if name in state:
                setattr(self.inner, name, state[name])
        if ACCOUNTANT in state:
            self.inner.accountant.load_state_dict(state[ACCOUNTANT])
        if self.realignment is not None and REALIGNMENT in state:
            self.realignment.restore(state[REALIGNMENT])


class EligibleNodes:
    """A view of ``grid`` whose nodes are those of ``eligible``: what the inner strategy samples from."""

    def __init__(self, grid: Grid, eligible: Iterable[int]) -> None:
        self._grid, self._eligible = grid, set(eligible)

    def get_node_ids(self) -> list[int]:
        return [n for n in self._grid.get_node_ids() if n in self._eligible]

    def __getattr__(self, name: str):
        return getattr(self._grid, name)


@contextmanager
def seeded_global_random(seed: int) -> Iterator[None]:
    """Seed Python's global ``random`` for the block, then put its state back.

    Flower's strategies sample nodes with the global ``random`` (``strategy_utils.sample_nodes``), so a
    ``random.Random`` instance cannot reach them; this keeps the sampling seeded without leaking the seed.
    """
    state = random.getstate()
    random.seed(seed)
    try:
        yield
    finally:
        random.setstate(state)


def update_norm(update: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    """L2 distance between a client's returned tensors and the global ones it started from."""
    norms = [torch.linalg.vector_norm(update[k].float() - reference[k].float()) for k in reference]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


def _or(value: float | None, default: float) -> float:
    return default if value is None else value
