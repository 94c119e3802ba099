"""Deliver a model (the emulator) to each node once; nodes cache it on disk by content hash.

The model owner first asks each node for its profile (``query.node_profile``: its memory budget or
emulator size, see fl_offsite.app.fleet), picks each node's model, then sends ``query.model_status`` with
that model's digest; a node that does not have it on disk answers ``has = False`` and then receives
``query.model`` carrying the weights (an ArrayRecord) and the small files (config, tokenizer) it needs
to rebuild a Hugging Face model folder. Rounds then carry only the trainable tensors; weights the
rounds carry anyway (all of them in full fine-tuning) are left out of the package.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from fl_offsite.app import wire
from fl_offsite.app.node_store import BF16_KEY, WEIGHTS_FILE
from fl_offsite.app.profile import NodeProfile
from fl_offsite.data.models import load_model, load_tokenizer
from fl_offsite.surgery.blocks import share_blocks

log = logging.getLogger(__name__)

PROFILE_QUERY, STATUS_QUERY, MODEL_QUERY = "query.node_profile", "query.model_status", "query.model"


@dataclass(frozen=True)
class ModelPackage:
    """A saved Hugging Face model folder as the records that carry it."""

    digest: str
    weights: ArrayRecord
    files: ConfigRecord  # file name -> bytes (config, tokenizer, ...)
    bf16: tuple[str, ...] = ()  # the weights sent as the int16 view of their bfloat16 bytes

    @classmethod
    def from_folder(cls, folder: str | Path, dtype: torch.dtype | None = None,
                    carried: frozenset[str] = frozenset()) -> ModelPackage:
        """The model in ``folder``; ``dtype`` (e.g. bf16 for clients that train in bf16) casts its floating
        weights for the trip. Exact for such clients: they hold frozen weights in that dtype, and the rounds
        carry the trainable ones at full precision. Weights named in ``carried`` (those the rounds carry)
        stay home; a node builds them from the config (:func:`load_delivered`) until the first round fills them."""
        folder = Path(folder)
        names = sorted(p.name for p in folder.iterdir() if p.is_file())
        if WEIGHTS_FILE not in names:
            raise FileNotFoundError(f"{folder} has no {WEIGHTS_FILE} (a sharded model is not supported here)")
        digest = hashlib.sha256()
        for name in names:
            digest.update(name.encode())
            digest.update((folder / name).read_bytes())
        with safe_open(folder / WEIGHTS_FILE, "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys() if k not in carried}  # noqa: SIM118 (no __iter__)
        digest.update(",".join(sorted(carried)).encode())
        if dtype is not None:
            digest.update(str(dtype).encode())
            tensors = {k: t.to(dtype) if t.is_floating_point() else t for k, t in tensors.items()}
        files = ConfigRecord({n: (folder / n).read_bytes() for n in names if n != WEIGHTS_FILE})
        bf16 = tuple(k for k, t in tensors.items() if t.dtype == torch.bfloat16)
        weights = ArrayRecord({k: t.view(torch.int16) if k in bf16 else t for k, t in tensors.items()})
        return cls(digest.hexdigest()[:16], weights, files, bf16)

    def description(self) -> ConfigRecord:
        """What a node needs besides the weights and files: the digest, and which weights are bf16."""
        return ConfigRecord({"digest": self.digest, **({BF16_KEY: list(self.bf16)} if self.bf16 else {})})

    @property
    def nbytes(self) -> int:
        return self.weights.count_bytes() + self.files.count_bytes()


def ask_profiles(grid, node_ids: list[int], timeout: float) -> dict[int, NodeProfile]:
    """Each node's :class:`~fl_offsite.app.profile.NodeProfile` (the first query a node answers: it starts its
    app). A node whose reply fails, is malformed or does not come is left out, and logged: it gets no model."""
    asks = [Message(content=RecordDict({"profile": ConfigRecord({})}), message_type=PROFILE_QUERY, dst_node_id=n)
            for n in node_ids]
    profiles: dict[int, NodeProfile] = {}
    for reply in grid.send_and_receive(asks, timeout=timeout):
        node = reply.metadata.src_node_id
        if node not in node_ids or node in profiles:
            continue
        if reply.has_error():
            log.warning("node %d left out: its profile query failed (%.200r)", node, reply.error.reason)
            continue
        try:
            profiles[node] = NodeProfile.from_record(wire.config_record(reply, "profile"))
        except wire.BadMessage as err:
            log.warning("node %d left out: its profile is malformed (%s)", node, err)
    if missing := sorted(set(node_ids) - profiles.keys()):
        log.warning("no usable profile from node(s) %s: they take no part in this run", missing)
    return profiles


def deliver(grid, packages: dict[int, ModelPackage], timeout: float) -> tuple[dict[int, int], dict[int, str]]:
    """Send each node its package (``packages``: node -> package) unless it has it. Returns the bytes sent to each
    node that has its model now (0: it had it), and the nodes that failed (-> why): they take no part."""
    failed: dict[int, str] = {}
    status = [Message(content=RecordDict({"model": ConfigRecord({"digest": package.digest})}),
                      message_type=STATUS_QUERY, dst_node_id=n) for n, package in packages.items()]
    has = _answers(grid.send_and_receive(status, timeout=timeout), packages, failed, "model status")
    needs = [n for n, answer in has.items() if not answer]
    sent = {n: 0 for n, answer in has.items() if answer}
    if needs:
        for package in {packages[n].digest: packages[n] for n in needs}.values():
            log.info("Sending the model %s (%.1f MB) to %d node(s)", package.digest, package.nbytes / 1e6,
                     sum(packages[n].digest == package.digest for n in needs))
        log.info("%d node(s) have their model cached", len(sent))
        messages = [Message(content=RecordDict({"model": packages[n].description(), "weights": packages[n].weights,
                                                "files": packages[n].files}),
                            message_type=MODEL_QUERY, dst_node_id=n) for n in needs]
        stored = _answers(grid.send_and_receive(messages, timeout=timeout), {n: packages[n] for n in needs}, failed,
                          "model delivery")
        sent.update({n: packages[n].nbytes for n, ok in stored.items() if ok})
    for node, why in failed.items():
        log.warning("node %d left out: %s", node, why)
    return sent, failed


def _answers(replies, asked: dict[int, ModelPackage], failed: dict[int, str], what: str) -> dict[int, bool]:
    """Each asked node's ``has`` answer; a node whose reply failed, is malformed or did not come goes to
    ``failed`` with why (its error text kept short: it is the node's)."""
    answers: dict[int, bool] = {}
    for reply in replies:
        node = reply.metadata.src_node_id
        if node not in asked or node in answers or node in failed:
            continue
        if reply.has_error():
            failed[node] = f"{what} failed ({(reply.error.reason or '')[:200]!r})"
            continue
        try:
            answers[node] = wire.flag(wire.config_record(reply, "model"), "has")
        except wire.BadMessage as err:
            failed[node] = f"{what} reply is malformed ({err})"
    for node in asked.keys() - answers.keys() - failed.keys():
        failed[node] = f"no {what} reply within the timeout"
    return answers


def load_delivered(folder: str | Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """A delivered model folder as a model and its tokenizer. A package without weights (the rounds carry
    them all) gives the architecture from its config, to be filled by the first round's payload."""
    folder = Path(folder)
    with safe_open(folder / WEIGHTS_FILE, "pt") as f:
        has_weights = bool(list(f.keys()))
    if has_weights:
        return load_model(str(folder))
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=torch.float32)
    return share_blocks(model).eval(), load_tokenizer(str(folder))
