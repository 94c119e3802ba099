"""The offsite strategy: any Flower strategy, plus update checks, server-side evaluation
of the plug-in and emulator models, per-client accounting and checkpoints.

It wraps the aggregation strategy by composition: sampling and aggregation are the
inner strategy's; this class only filters what goes in and records what comes out.
"""
from __future__ import annotations

import logging
import pickle
import random
import time
from collections.abc import Callable, Iterable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fl_offsite.errors import UserError
from fl_offsite.results import Checkpoint, RunFolder
from fl_offsite.payload import check_payload

log = logging.getLogger(__name__)

ACCOUNTANT = "__privacy_accountant__"
Evaluator = Callable[[dict[str, torch.Tensor]], dict[str, dict]]
AfterRound = Callable[[dict, dict[str, torch.Tensor]], None]  # (the round's record, its global payload)


class OffsiteStrategy(Strategy):
    """Wrap ``inner``; evaluate with ``evaluate_payload``; record rounds in ``run``."""

    def __init__(self, inner: Strategy, reference: dict[str, torch.Tensor], evaluate_payload: Evaluator,
                 run: RunFolder, lr_at: Callable[[int], float], min_replies: int, seed: int,
                 base_config: dict, rounds_done: int = 0, max_update_norm: float = 0.0,
                 round_timeout: float | None = None, after_round: AfterRound | None = None,
                 payload_kind: str = "adapter") -> None:
        self.inner = inner
        self.reference = {k: torch.empty_like(v, device="meta") for k, v in reference.items()}
        self.payload_kind = payload_kind  # what the replies carry, for the reasons of a rejection
        self.evaluate_payload = evaluate_payload
        self.run = run
        self.lr_at = lr_at
        self.min_replies = min_replies
        self.seed = seed
        self.base_config = base_config
        self.offset = rounds_done  # rounds finished before a resume
        self.max_update_norm = max_update_norm
        self.round_timeout = round_timeout
        self.after_round = after_round
        self._global: dict[str, torch.Tensor] = {}
        self._round: dict = {}

    # --- training ---------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        rnd = server_round + self.offset
        random.seed(self.seed * 100_003 + rnd)  # the inner strategy samples with `random`
        config = ConfigRecord({**self.base_config, **config, "lr": self.lr_at(rnd), "round": rnd})
        messages = list(self.inner.configure_train(rnd, arrays, config, grid))
        down = arrays.count_bytes()
        self._global = arrays.to_torch_state_dict()
        self._round = {"start": time.perf_counter(), "bytes_down": {m.metadata.dst_node_id: down for m in messages},
                       "sent": [m.metadata for m in messages]}  # the grid sets their ids when it pushes them
        log.info("round %d: sent %.2f MB to each of %d clients", rnd, down / 1e6, len(messages))
        return messages

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
                problems.append({"node": node, "kind": "rejected",
                                 "reason": "a reply to no message of this round (a late reply to an earlier one?)"})
                continue
            answered.add(node)
            if not reply.has_error() and "arrays" in reply.content.array_records:
                up += reply.content["arrays"].count_bytes()  # it travelled, whether accepted or not
            if reply.has_error():
                problems.append({"node": node, "kind": "failed", "reason": reply.error.reason})
                continue
            reason, norm = self._check(reply)
            if reason:
                problems.append({"node": node, "kind": "rejected", "reason": reason})
                continue
            accepted.append(reply)
            clients.append({"node": node, "bytes_down": self._round["bytes_down"].get(node, 0),
                            "bytes_up": reply.content["arrays"].count_bytes(), "update-norm": norm,
                            **dict(reply.content["metrics"])})
        waited = f"no reply within strategy.round-timeout = {self.round_timeout:g} s" if self.round_timeout else \
            "no reply"
        problems += [{"node": node, "kind": "missing", "reason": waited} for node in asked.values()
                     if node not in answered]
        for c in clients:
            log.info("round %d: client %s loss %.4f, %d examples, %.1f s, %.0f tokens/s, peak %.0f MB", rnd,
                     int(c.get("partition-id", -1)), c.get("train-loss", float("nan")), int(c["num-examples"]),
                     c.get("train-seconds", 0.0), c.get("tokens-per-s", 0.0), c.get("peak-memory-mb", 0.0))
        for problem in problems:
            log.warning("round %d: node %s %s: %s", rnd, problem["node"], problem["kind"], problem["reason"])
        sent = len(self._round["bytes_down"])
        if len(accepted) < self.min_replies:
            details = "; ".join(f"node {p['node']} {p['kind']}: {p['reason']}" for p in problems)
            raise RuntimeError(f"round {rnd}: only {len(accepted)} of {sent} clients returned a usable update "
                               f"(need {self.min_replies}); {details or 'the others timed out'}")
        self._round.update(clients=clients, problems=problems, bytes_up=up,
                           missing=sum(p["kind"] == "missing" for p in problems))
        return self.inner.aggregate_train(rnd, accepted)

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
        """Server-side evaluation (Flower's ``evaluate_fn``), then the round's record and checkpoint."""
        rnd = server_round + self.offset
        if server_round == 0 and self.offset > 0:
            return None  # resumed: round 0 is already on record
        payload = arrays.to_torch_state_dict()
        results = self.evaluate_payload(payload)
        record = {"round": rnd, "eval": results}
        if rnd > 0:
            record.update(seconds=time.perf_counter() - self._round["start"], clients=self._round["clients"],
                          problems=self._round["problems"], missing=self._round["missing"],
                          lr=self.lr_at(rnd), communication=self._communication(rnd))
            spent = self.inner.privacy_spent() if hasattr(self.inner, "privacy_spent") else None
            if spent is not None:
                record["privacy"] = {"epsilon": spent.epsilon, "delta": spent.delta, "releases": spent.num_releases}
                log.info("round %d: privacy spent epsilon %.3f at delta %g", rnd, spent.epsilon, spent.delta)
        self.run.append_round(record)
        self.run.save_checkpoint(Checkpoint(rnd, payload, self.state()))
        if self.after_round is not None:
            self.after_round(record, payload)
        return MetricRecord({f"{model}.{k}": v for model, m in results.items() for k, v in m.items()
                             if isinstance(v, (int, float))})

    def _communication(self, rnd: int) -> dict[str, float]:
        """The round's adapter traffic, its running total over the run, and the one-time model deliveries apart."""
        earlier = [r["communication"] for r in self.run.rounds() if 0 < r["round"] < rnd and "communication" in r]
        down, up = sum(self._round["bytes_down"].values()), self._round["bytes_up"]
        total_down = (earlier[-1]["cumulative_bytes_down"] if earlier else 0) + down
        total_up = (earlier[-1]["cumulative_bytes_up"] if earlier else 0) + up
        one_time = self.run.delivered_bytes()
        log.info("round %d: adapters %.2f MB down, %.2f MB up this round; %.2f MB down, %.2f MB up so far "
                 "(one-time model deliveries apart: %.1f MB)", rnd, down / 1e6, up / 1e6, total_down / 1e6,
                 total_up / 1e6, one_time / 1e6)
        return {"bytes_down": down, "bytes_up": up, "cumulative_bytes_down": total_down,
                "cumulative_bytes_up": total_up, "one_time_bytes": one_time}

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
        """The inner strategy's picklable attributes (e.g. FedAdam's moments) and its privacy accountant's."""
        out = {}
        for key, value in vars(self.inner).items():
            try:
                pickle.dumps(value)
            except Exception:  # functions, locks: configuration, rebuilt from config
                continue
            out[key] = value
        accountant = getattr(self.inner, "accountant", None)
        if accountant is not None:
            out[ACCOUNTANT] = accountant.state_dict()
        return out

    def restore(self, state: dict) -> None:
        state = dict(state)
        accountant = state.pop(ACCOUNTANT, None)
        vars(self.inner).update(state)
        if accountant is not None:
            self.inner.accountant.load_state_dict(accountant)


def update_norm(update: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    """L2 distance between a client's returned tensors and the global ones it started from."""
    norms = [torch.linalg.vector_norm(update[k].float() - reference[k].float()) for k in reference]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0

