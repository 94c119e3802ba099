"""The offsite strategy: any Flower strategy, plus update checks, server-side evaluation
of the plug-in and emulator models, per-client accounting and checkpoints.

It wraps the aggregation strategy by composition: sampling and aggregation are the
inner strategy's; this class only filters what goes in and records what comes out.
Imports run one way: ``strategies`` uses the method-level library (payload checks, the
results folder) and, of the app, only ``fl_offsite.app.server_app`` uses ``strategies``.
"""
from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import cast

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, Metadata, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fl_offsite.run.folder import Checkpoint, RunFolder
from fl_offsite.run.records import ClientReport, Privacy, Problem, RealignRecord, RoundRecord, Traffic
from strategies.policy import Exchange, OwnerHooks, Payload, RoundPolicy
from strategies.sampling import EligibleNodes, seeded_global_random
from strategies.screening import (
    EQUAL_WEIGHT,
    LATE,
    WEIGHT,
    Screened,
    check_update,
    client_metrics,
    shown_reason,
    update_norm,
    usable_weight,
)

log = logging.getLogger(__name__)

ACCOUNTANT = "__privacy_accountant__"
REALIGNMENT = "__realignment__"  # the emulators' re-alignment factors, by k
# Flower strategy attributes learned across rounds: FedAdam/FedYogi/FedAdagrad's moments, FedAvgM's momentum
# and the global arrays it steps from (the others are configuration, or reset in every configure_train).
LEARNED = ("current_arrays", "m_t", "v_t", "momentum_vector")


@dataclass
class RoundState:
    """What one round's callbacks hand on: ``configure_train`` sets all but ``screened``, ``aggregate_train``
    that, and ``evaluate`` builds the round's record from them."""

    start: float  # time.perf_counter() when the round's messages went out
    sent: list[Metadata]  # the grid sets their message ids when it pushes them
    bytes_down: dict[int, int]  # node -> bytes sent to it
    realign_down: dict[int, int]  # node -> bytes of its emulator's re-alignment factors sent to it
    realign: RealignRecord | None  # the owner's re-alignment before the round
    screened: Screened = field(default_factory=Screened)


class OffsiteStrategy(Strategy):
    """Wrap ``inner``; evaluate, re-align and report each round through ``owner``; record rounds in ``run``.

    ``exchange`` says what each training message carries (only its ``node_config`` nodes train), ``policy``
    how each round runs; ``rounds_done`` rounds were finished before a resume. When the owner re-aligns, it
    does so before each round (and before round 0's evaluation) and each message carries its node's
    emulator's factors beside the payload (record ``realign``).
    """

    def __init__(self, inner: Strategy, owner: OwnerHooks, run: RunFolder, policy: RoundPolicy, exchange: Exchange,
                 rounds_done: int = 0) -> None:
        self.inner, self.owner, self.run = inner, owner, run
        self.policy, self.exchange = policy, exchange
        self.offset = rounds_done
        self._global: Payload = {}
        self._round: RoundState | None = None
        self.scoring = ScoringLane()

    # --- training ---------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        rnd = server_round + self.offset
        config = ConfigRecord({**self.exchange.base_config, **config, "lr": self.policy.lr_at(rnd), "round": rnd})
        start = time.perf_counter()
        self._global = arrays.to_torch_state_dict()
        realigned = self.owner.realign(rnd, self._global)
        factors = {k: ArrayRecord(f) for k, f in self.owner.realign_factors().items()}
        with seeded_global_random(self.policy.seed * 100_003 + rnd):  # the inner strategy samples the nodes
            eligible = cast(Grid, EligibleNodes(grid, self.exchange.node_config))  # a view: Grid's duck type
            sampled = self.inner.configure_train(rnd, arrays, config, eligible)
            messages = [self._for_node(m, factors) for m in sampled]
        down = arrays.count_bytes()
        realign_down = {m.metadata.dst_node_id: m.content["realign"].count_bytes() for m in messages if factors}
        self._round = RoundState(start=start, sent=[m.metadata for m in messages], realign_down=realign_down,
                                 bytes_down={m.metadata.dst_node_id: down for m in messages}, realign=realigned)
        extra = f" (and {max(realign_down.values(), default=0) / 1e6:.2f} MB of emulator re-alignment)"
        log.info("round %d: sent %.2f MB to each of %d clients%s", rnd, down / 1e6, len(messages),
                 extra if factors else "")
        return messages

    def _for_node(self, message: Message, factors: dict[int, ArrayRecord]) -> Message:
        """``message`` with its node's own keys in the config (Flower's strategies share one content), and its
        emulator's re-alignment ``factors`` (by k) if any."""
        node = message.metadata.dst_node_id
        node_config = self.exchange.node_config[node]
        content = RecordDict(dict(message.content.items()))
        content["config"] = ConfigRecord({**message.content.config_records["config"], **node_config})
        if factors:
            content["realign"] = factors[node_config["emulator-layers"]]
        return Message(content=content, message_type=message.metadata.message_type, dst_node_id=node,
                       group_id=message.metadata.group_id, ttl=message.metadata.ttl)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Screen the replies (:meth:`_check_and_log_replies`), then average the accepted ones with ``inner``."""
        rnd = server_round + self.offset
        screened = self._check_and_log_replies(rnd, replies)
        self._check_quorum(rnd, screened)
        self._current().screened = screened
        arrays, metrics = self.inner.aggregate_train(rnd, screened.accepted)
        return self._checked_aggregate(rnd, self._as_reference(arrays)), metrics

    def _checked_aggregate(self, rnd: int, arrays: ArrayRecord | None) -> ArrayRecord | None:
        """The aggregate if it is finite, its step scaled back to ``policy.max_update_norm`` if set; a non-finite
        one is dropped (the global payload stays as it was)."""
        if arrays is None:
            return None
        state = arrays.to_torch_state_dict()
        if not all(torch.isfinite(t).all() for t in state.values()):
            log.error("round %d: the aggregate is not finite: the global %s stays as it was", rnd, self.exchange.kind)
            return ArrayRecord(self._global)
        bound, norm = self.policy.max_update_norm, update_norm(state, self._global)
        if bound <= 0 or norm <= bound:
            return arrays
        log.warning("round %d: the aggregate moved %.4g, beyond strategy.max-update-norm = %g: scaled back", rnd,
                    norm, bound)
        return ArrayRecord({k: self._global[k] + (t - self._global[k]) * (bound / norm) for k, t in state.items()})

    def _check_and_log_replies(self, rnd: int, replies: Iterable[Message]) -> Screened:
        """Sort round ``rnd``'s replies into accepted updates and problems, and log both (the role of Flower's
        ``FedAvg._check_and_log_replies``): a reply to no message of this round is rejected, a failed one
        recorded, the others checked (:func:`check_update`), and a node that sent nothing is missing."""
        asked = {m.message_id: m.dst_node_id for m in self._current().sent}
        screened, answered = Screened(), set()
        for reply in replies:
            node = reply.metadata.src_node_id
            if asked.get(reply.metadata.reply_to_message_id) != node:
                screened.problems.append(Problem(node, "rejected", LATE))
                continue
            answered.add(node)
            self._screen(reply, screened)
        timeout = self.policy.round_timeout
        waited = f"no reply within strategy.round-timeout = {timeout:g} s" if timeout else "no reply"
        screened.problems += [Problem(node, "missing", waited) for node in asked.values() if node not in answered]
        for c in screened.clients:
            log.info("round %d: client %s loss %.4f, %d examples, %.1f s, %.0f tokens/s, peak %.0f MB", rnd,
                     int(_or(c.partition_id, -1)), _or(c.train_loss, float("nan")), int(c.num_examples),
                     _or(c.train_seconds, 0.0), _or(c.tokens_per_s, 0.0), _or(c.peak_memory_mb, 0.0))
        for problem in screened.problems:
            log.warning("round %d: node %s %s: %s", rnd, problem.node, problem.kind, problem.reason)
        self._uniform_if_untrusted(rnd, screened)
        return screened

    def _uniform_if_untrusted(self, rnd: int, screened: Screened) -> None:
        """Weigh the round's updates equally when a reply's weight is not a count to trust (strategy.max-examples)."""
        odd = [c.node for c in screened.clients if not usable_weight(c.num_examples, self.policy.max_examples)]
        if odd:
            log.warning("round %d: node(s) %s sent no usable %s (in (0, strategy.max-examples = %d]): this round's "
                        "updates are weighted equally", rnd, odd, WEIGHT, self.policy.max_examples)
            for reply in screened.accepted:
                reply.content["metrics"] = MetricRecord({WEIGHT: 1, EQUAL_WEIGHT: 1})

    def _screen(self, reply: Message, screened: Screened) -> None:
        """Add one reply to this round's message to ``screened``: failed, rejected or accepted."""
        node, state = reply.metadata.src_node_id, self._current()
        if reply.has_error():
            screened.problems.append(Problem(node, "failed", shown_reason(reply.error.reason)))
            return
        if "arrays" in reply.content.array_records:
            screened.bytes_up += reply.content["arrays"].count_bytes()  # it travelled, whether accepted or not
        reason, norm = check_update(reply, self.exchange.reference, self.exchange.kind, self._global,
                                    self.policy.max_update_norm)
        if reason:
            screened.problems.append(Problem(node, "rejected", shown_reason(reason)))
            return
        arrays, metrics = reply.content.array_records["arrays"], client_metrics(reply.content.metric_records["metrics"])
        screened.clients.append(ClientReport.of_reply(
            node, state.bytes_down.get(node, 0), state.realign_down[node] if state.realign_down else None,
            arrays.count_bytes(), norm, {"num-examples": 0, **metrics}))
        # What the inner strategy averages by, alone: Flower's strategies refuse replies whose metrics differ
        weights = MetricRecord({WEIGHT: metrics.get(WEIGHT, 0), EQUAL_WEIGHT: 1})
        reply.content = RecordDict({"arrays": arrays, "metrics": weights})
        screened.accepted.append(reply)

    def _check_quorum(self, rnd: int, screened: Screened) -> None:
        """Stop the run when fewer than ``policy.min_replies`` updates are usable."""
        if len(screened.accepted) >= self.policy.min_replies:
            return
        details = "; ".join(f"node {p.node} {p.kind}: {p.reason}" for p in screened.problems)
        raise RuntimeError(f"round {rnd}: only {len(screened.accepted)} of {len(self._current().bytes_down)} "
                           f"clients returned a usable update (need {self.policy.min_replies}); "
                           f"{details or 'the others timed out'}")

    def _as_reference(self, arrays: ArrayRecord | None) -> ArrayRecord | None:
        """``arrays`` in the global payload's dtypes (FedAdam, FedYogi and FedAdagrad step in float64)."""
        if arrays is None:
            return None
        state, reference = arrays.to_torch_state_dict(), self.exchange.reference
        if all(tensor.dtype == reference[name].dtype for name, tensor in state.items()):
            return arrays
        return ArrayRecord({name: tensor.to(reference[name].dtype) for name, tensor in state.items()})

    def _current(self) -> RoundState:
        if self._round is None:
            raise RuntimeError("no round in progress: configure_train comes first")
        return self._round

    # --- evaluation and records -------------------------------------------
    def evaluate(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Flower's ``evaluate_fn``, after each round (and before the first): evaluate, record, checkpoint.

        With ``policy.overlap`` a training round's scoring runs on the scoring lane while the next round trains
        (Flower's metrics of that round are then left out); its record and checkpoint follow its scores.
        """
        rnd = server_round + self.offset
        self.scoring.wait()  # the round before first: this one's traffic totals read its record
        if server_round == 0 and self.offset > 0:
            return None  # resumed: round 0 is already on record
        payload = arrays.to_torch_state_dict()
        if self.policy.overlap and 0 < rnd < self.policy.num_rounds:
            record, state = self.round_record(rnd, {}), copy.deepcopy(self.state())  # as of this round
            self.scoring.submit(lambda: self.keep(replace(record, scores=self.owner.evaluate(rnd, payload)),
                                                  payload, state))
            return None
        prealigned = self.owner.realign(0, payload) if rnd == 0 else None
        scores = self.owner.evaluate(rnd, payload)
        record = self.round_record(rnd, scores)
        if prealigned:
            record = replace(record, realign=prealigned)
        self.keep(record, payload)
        return MetricRecord({f"{model}.{k}": v for model, m in scores.items() for k, v in m.items()
                             if isinstance(v, int | float)})

    def round_record(self, rnd: int, scores: dict[str, dict]) -> RoundRecord:
        """Round ``rnd``'s record: its ``scores`` and, after training, what the round did."""
        if rnd == 0:
            return RoundRecord(rnd, scores)
        state = self._current()
        seconds, screened = time.perf_counter() - state.start, state.screened
        return RoundRecord(rnd, scores, seconds=seconds, clients=screened.clients, problems=screened.problems,
                           lr=self.policy.lr_at(rnd), traffic=self._account(rnd), realign=state.realign,
                           privacy=self._privacy(rnd))

    def keep(self, record: RoundRecord, payload: Payload, state: dict | None = None) -> None:
        """Append ``record`` to the run, checkpoint the round (with ``state``, by default the strategy's now),
        then the owner's ``after_round``."""
        self.run.append_round(record)
        self.run.save_checkpoint(Checkpoint(record.round, payload, self.state() if state is None else state))
        self.owner.after_round(record, payload)

    def _account(self, rnd: int) -> Traffic:
        """The round's payload traffic, its running total over the run, and the one-time model deliveries apart."""
        state = self._current()
        earlier = [r.traffic for r in self.run.rounds() if 0 < r.round < rnd and r.traffic]
        last = earlier[-1] if earlier else Traffic(0, 0, 0, 0, 0)
        down, up = sum(state.bytes_down.values()), state.screened.bytes_up
        traffic = Traffic(down, up, last.cumulative_bytes_down + down, last.cumulative_bytes_up + up,
                          self.run.delivered_bytes())
        log.info("round %d: %ss %.2f MB down, %.2f MB up this round; %.2f MB down, %.2f MB up so far "
                 "(one-time model deliveries apart: %.1f MB)", rnd, self.exchange.kind, down / 1e6, up / 1e6,
                 traffic.cumulative_bytes_down / 1e6, traffic.cumulative_bytes_up / 1e6, traffic.one_time_bytes / 1e6)
        if not state.realign_down:  # no re-alignment factors went out
            return traffic
        realign = sum(state.realign_down.values())  # the emulators' factors, apart from the payload's bytes
        so_far = realign + (last.cumulative_realign_bytes_down or 0)
        log.info("round %d: emulator re-alignment %.2f MB down this round, %.2f MB so far", rnd, realign / 1e6,
                 so_far / 1e6)
        return replace(traffic, realign_bytes_down=realign, cumulative_realign_bytes_down=so_far)

    def _privacy(self, rnd: int) -> Privacy | None:
        """The privacy spent so far, when the inner strategy accounts for it."""
        spent = self.inner.privacy_spent() if hasattr(self.inner, "privacy_spent") else None
        if spent is None:
            return None
        log.info("round %d: privacy spent epsilon %.3f at delta %g", rnd, spent.epsilon, spent.delta)
        return Privacy(spent.epsilon, spent.delta, spent.num_releases)

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
        if factors := self.owner.realign_factors():
            out[REALIGNMENT] = factors
        return out

    def restore(self, state: dict) -> None:
        """Put back what :meth:`state` saved (a checkpoint's other keys, if any, are ignored)."""
        for name in LEARNED:
            if name in state:
                setattr(self.inner, name, state[name])
        if ACCOUNTANT in state:
            getattr(self.inner, "accountant").load_state_dict(state[ACCOUNTANT])  # noqa: B009 - DP wrapper only
        if REALIGNMENT in state:
            self.owner.restore_factors(state[REALIGNMENT])


class ScoringLane:
    """One round's scoring at a time on a thread of its own; :meth:`wait` returns once it is done (and raises
    what it raised). The caller waits before anything that reads the run's records, and at the end."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="owner-scoring")
        self._pending: Future | None = None

    def submit(self, work: Callable[[], None]) -> None:
        self.wait()
        self._pending = self._executor.submit(work)

    def wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()


def _or(value: float | None, default: float) -> float:
    return default if value is None else value
