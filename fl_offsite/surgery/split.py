"""The offsite split: adapter (bottom + top blocks) and emulator (a subset of the middle,
chosen by ``fl_offsite.emulator.layer_choice``), the names the adapter travels under, and its files.

An adapter is always keyed by the **full model's** parameter names, whichever model
(full or emulator) it came from or goes into; the block index in a name is mapped
through ``SplitPlan.kept_layers``. The names alone say where every tensor goes in the
full model (:func:`plan_from_names`); the plan in an fl-offsite file's metadata adds the
emulator's blocks. Copying tensors in and out is ``fl_offsite.surgery.payload``'s.
"""
from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel

from fl_offsite.data.models import placed
from fl_offsite.emulator.layer_choice import uniform_drop
from fl_offsite.errors import UserError
from fl_offsite.files import atomic_dir, write_json
from fl_offsite.surgery.blocks import REPEATS_KEY, find_blocks, resize_config, share_blocks
from fl_offsite.weights import load_tensors, save_tensors

ADAPTER_FILE = "adapter.safetensors"
SPLIT_FILE = "split.json"
EMULATOR_DIR = "emulator"
RUN_METADATA = "fl_offsite_run"  # metadata key of a trained adapter: the run that trained it
MAX_LAYERS = 10_000  # blocks a split description may name: bounds what a received plan makes a node build
MAX_PREFIX = 200
BLOCK_PREFIX = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")  # a dotted module path


@dataclass(frozen=True)
class SplitPlan:
    """Which blocks of an ``num_layers``-block model form the adapter and the emulator."""

    num_layers: int
    adapter_bottom: int
    adapter_top: int
    kept_layers: tuple[int, ...]  # original index of every emulator block, in order
    block_prefix: str  # dotted path of the block list, e.g. "model.layers"
    shared: bool = False  # CRaSh's layer sharing: kept middle blocks also run in the dropped slots (block_repeats)

    @property
    def adapter_layers(self) -> tuple[int, ...]:
        top = range(self.num_layers - self.adapter_top, self.num_layers)
        return (*range(self.adapter_bottom), *top)

    @property
    def emulator_layers(self) -> int:
        """Number of middle blocks the emulator keeps (the paper's ``k``)."""
        return len(self.kept_layers) - self.adapter_bottom - self.adapter_top

    @property
    def name(self) -> str:
        return f"{self.adapter_bottom}-{self.emulator_layers}-{self.adapter_top}"

    @property
    def kept_middle(self) -> list[int]:
        """Original indices of the emulator's middle blocks (the kept ones outside the adapter), in order."""
        adapter = set(self.adapter_layers)
        return [i for i in self.kept_layers if i not in adapter]

    def block_repeats(self) -> list[int]:
        """How often each emulator block runs: once, or (``shared``) each kept middle block also in the dropped
        slots just before it, so that the emulator keeps the full depth and a block's last run ends at its own
        index; the last kept block also fills any slots after it."""
        repeats = [1] * len(self.kept_layers)
        middle = self.kept_middle
        if not self.shared or not middle:
            return repeats
        start = self.adapter_bottom
        for original in middle:
            repeats[self.kept_layers.index(original)] = original - start + 1
            start = original + 1
        repeats[self.kept_layers.index(middle[-1])] += self.num_layers - self.adapter_top - start
        return repeats

    def last_slot(self, original: int) -> int:
        """The full model's block whose output the kept block ``original`` stands for: its own, or (``shared``)
        for the last kept middle block, the last middle slot."""
        middle = self.kept_middle
        shared_tail = self.shared and middle and original == middle[-1]
        return self.num_layers - self.adapter_top - 1 if shared_tail else original

    def positions(self, model: torch.nn.Module) -> dict[int, int]:
        """Map original block index -> block position in ``model`` (full model or emulator)."""
        _, blocks = find_blocks(model)
        if len(blocks) == self.num_layers:
            return {i: i for i in range(self.num_layers)}
        if len(blocks) == len(self.kept_layers):
            return {orig: pos for pos, orig in enumerate(self.kept_layers)}
        raise UserError(
            f"model has {len(blocks)} blocks, but split {self.name} expects {self.num_layers} "
            f"(full model) or {len(self.kept_layers)} (emulator): wrong model for this split")

    def full_index(self, model: torch.nn.Module) -> dict[int, int]:
        """Map block position in ``model`` -> original block index (the inverse of :meth:`positions`)."""
        return {pos: orig for orig, pos in self.positions(model).items()}

    def to_json(self) -> dict:
        return {**asdict(self), "kept_layers": list(self.kept_layers), "split": self.name}

    @classmethod
    def from_json(cls, data: dict) -> SplitPlan:
        """The plan a split description holds (``split.json``, or a model owner's message: on a node, hostile
        input). Every field is checked before anything is built from it; a UserError names the field at fault,
        never its value."""
        fields = ("num_layers", "adapter_bottom", "adapter_top", "kept_layers", "block_prefix")
        if not isinstance(data, dict):
            raise UserError("a split description is a JSON object; re-create it with `fl-offsite split`")
        missing = [f for f in fields if f not in data]
        if missing:
            raise UserError(f"split description lacks {missing}; re-create it with `fl-offsite split`")
        if not isinstance(shared := data.get("shared", False), bool):
            raise UserError("split description's 'shared' must be true or false")
        num_layers, bottom, top = (_count(data, f, MAX_LAYERS) for f in fields[:3])
        if num_layers == 0 or bottom + top > num_layers:
            raise UserError("split description's 'num_layers' must be at least 1 and at least 'adapter_bottom' + "
                            "'adapter_top'")
        kept = _kept_layers(data["kept_layers"], num_layers)
        if not {*range(bottom), *range(num_layers - top, num_layers)} <= set(kept):
            raise UserError("split description's 'kept_layers' must keep every adapter block (the bottom "
                            "'adapter_bottom' and the top 'adapter_top' blocks)")
        prefix = data["block_prefix"]
        if not isinstance(prefix, str) or len(prefix) > MAX_PREFIX or not BLOCK_PREFIX.fullmatch(prefix):
            raise UserError("split description's 'block_prefix' must be a dotted name such as model.layers (at most "
                            f"{MAX_PREFIX} characters)")
        return cls(num_layers, bottom, top, kept, prefix, shared)


def _count(data: dict, field: str, high: int) -> int:
    """``data[field]``: an integer (not a bool) in [0, high]."""
    value = data[field]
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= high:
        raise UserError(f"split description's {field!r} must be an integer in [0, {high}]")
    return value


def _kept_layers(value: object, num_layers: int) -> tuple[int, ...]:
    """``value`` as the emulator's blocks: strictly increasing block indices of a ``num_layers``-block model."""
    if not isinstance(value, list) or len(value) > num_layers \
            or not all(isinstance(i, int) and not isinstance(i, bool) for i in value) \
            or value != sorted(set(value)) or (value and not 0 <= value[0] <= value[-1] < num_layers):
        raise UserError("split description's 'kept_layers' must be a list of strictly increasing block indices in "
                        "[0, 'num_layers')")
    return tuple(value)


def plan_split(
    model: torch.nn.Module,
    adapter_bottom: int,
    adapter_top: int,
    emulator_layers: int | None = None,
    drop_ratio: float | None = None,
    choose_middle: Callable[[int, int], list[int]] = uniform_drop,
    shared: bool = False,
) -> SplitPlan:
    """Plan an ``l-k-r`` split of ``model``; give ``emulator_layers`` (k) or ``drop_ratio``; ``shared``: the
    emulator's kept middle blocks also run in the dropped slots (:meth:`SplitPlan.block_repeats`).

    ``choose_middle(n, k)`` picks the ``k`` kept of the ``n`` middle blocks (indices into the
    middle, ascending): the paper's uniform drop, or a rule of ``fl_offsite.emulator.layer_choice``.
    """
    prefix, blocks = find_blocks(model)
    n = len(blocks)
    middle = n - adapter_bottom - adapter_top
    if adapter_bottom < 0 or adapter_top < 0 or adapter_bottom + adapter_top == 0:
        raise UserError(f"adapter layers must be >= 0 and not both 0, got {adapter_bottom},{adapter_top}")
    if middle < 0:
        raise UserError(
            f"adapter {adapter_bottom}+{adapter_top} blocks does not fit a {n}-block model: "
            f"choose adapter layers adding up to at most {n}")
    if (emulator_layers is None) == (drop_ratio is None):
        raise UserError("give exactly one of emulator layers (k) or a drop ratio")
    if drop_ratio is not None:
        if not 0.0 <= drop_ratio < 1.0:
            raise UserError(f"drop ratio must be in [0, 1), got {drop_ratio}")
        emulator_layers = max(1, round(middle * (1.0 - drop_ratio))) if middle else 0
    assert emulator_layers is not None  # one of the two was given (checked above)
    chosen = list(choose_middle(middle, emulator_layers))
    if len(chosen) != emulator_layers or chosen != sorted(set(chosen)) or not all(0 <= i < middle for i in chosen):
        raise ValueError(f"choose_middle({middle}, {emulator_layers}) gave {chosen}: not {emulator_layers} "
                         f"ascending distinct indices below {middle}")
    kept_middle = [adapter_bottom + i for i in chosen]
    kept = (*range(adapter_bottom), *kept_middle, *range(n - adapter_top, n))
    return SplitPlan(n, adapter_bottom, adapter_top, kept, prefix, shared)


def block_key(prefix: str, key: str) -> tuple[int, str] | None:
    """``(block index, rest of the name)`` when ``key`` names a tensor of a block under ``prefix``, else None."""
    match = re.match(rf"{re.escape(prefix)}\.(\d+)\.(.+)$", key)
    return (int(match.group(1)), match.group(2)) if match else None


def block_part(prefix: str, key: str) -> tuple[int, str]:
    """:func:`block_key` of a name that must be a block's (a ValueError otherwise)."""
    found = block_key(prefix, key)
    if found is None:
        raise ValueError(f"{key} is not a tensor of a block under {prefix}")
    return found


def plan_from_names(model: torch.nn.Module, names: Iterable[str]) -> SplitPlan:
    """The split that tensor names of ``model`` (the full model) imply: their blocks, bottom and top.

    Names outside the blocks, block indices past the model's, and blocks that are not a
    bottom and a top run are UserErrors; the tensors themselves are checked at plug-in.
    """
    prefix, blocks = find_blocks(model)
    n, used = len(blocks), set()
    for name in names:
        block = block_key(prefix, name)
        if block is None:
            hint = ("a PEFT LoRA adapter: load its folder with PeftModel.from_pretrained" if ".lora_" in name
                    else f"adapter tensors are named {prefix}.<block>.<parameter>")
            raise UserError(f"adapter tensor {name!r} is not in a block of {type(model).__name__} ({hint})")
        used.add(block[0])
    if not used:
        raise UserError("the adapter file holds no tensors")
    if max(used) >= n:
        raise UserError(f"the adapter names block {max(used)}, but the model has {n} blocks: "
                        "plug it into the full model it was trained for")
    bottom = next(i for i in range(n + 1) if i not in used)
    top = next(t for t in range(n + 1) if n - 1 - t not in used or n - 1 - t < bottom)
    if bottom + top != len(used):
        raise UserError(f"the adapter holds blocks {sorted(used)} of {n}: not a bottom and a top run of blocks, "
                        "as an offsite adapter is")
    return SplitPlan(n, bottom, top, tuple(range(n)), prefix)


def emulator_plan(model_dir: str | Path) -> SplitPlan | None:
    """The plan of an emulator folder inside a split folder (``<split>/emulator``), else None."""
    folder = Path(model_dir)
    if folder.name != EMULATOR_DIR or not (folder.parent / SPLIT_FILE).is_file():
        return None
    return read_plan(folder.parent)


def build_emulator(model: PreTrainedModel, plan: SplitPlan) -> PreTrainedModel:
    """A standalone model of the kept blocks, embeddings, final norm and head.

    It is a fresh Hugging Face model of the same class with ``len(kept_layers)`` blocks:
    it saves and loads with ``from_pretrained`` and holds no tensor of a dropped block. A shared plan's
    emulator records its blocks' repeats in its config, which every loader applies (``share_blocks``).
    """
    plan.positions(model)  # checks that ``model`` is the full model of this plan
    config = resize_config(model.config, plan.num_layers, list(plan.kept_layers))
    if plan.shared:
        setattr(config, REPEATS_KEY, plan.block_repeats())
        config.use_cache = False
    with torch.device(model.device):  # on the model's device: a GPU model gets a GPU emulator, built there
        emulator = placed(type(model)(config), model.dtype)
    position = {orig: pos for pos, orig in enumerate(plan.kept_layers)}
    state = {}
    for key, tensor in model.state_dict().items():
        block = block_key(plan.block_prefix, key)
        if block is None:
            state[key] = tensor
        elif block[0] in position:
            state[f"{plan.block_prefix}.{position[block[0]]}.{block[1]}"] = tensor
    emulator.load_state_dict(state, strict=True)
    emulator.tie_weights()
    emulator.generation_config = copy.deepcopy(model.generation_config)
    if plan.shared:
        emulator.generation_config.use_cache = False
    return share_blocks(emulator).eval()


def adapter_names(model: torch.nn.Module, plan: SplitPlan) -> dict[str, str]:
    """Map each adapter tensor's full-model name to its name in ``model`` (full or emulator)."""
    original = plan.full_index(model)
    adapter = set(plan.adapter_layers)
    names = {}
    for key in model.state_dict():
        block = block_key(plan.block_prefix, key)
        if block and original.get(block[0]) in adapter:
            names[f"{plan.block_prefix}.{original[block[0]]}.{block[1]}"] = key
    return names


def save_adapter(path: str | Path, adapter: dict[str, torch.Tensor], plan: SplitPlan,
                 run: dict | None = None) -> None:
    """Save an adapter as safetensors with its split plan (and the run that trained it) in the metadata."""
    metadata = {"split_plan": json.dumps(plan.to_json())}
    if run is not None:
        metadata[RUN_METADATA] = json.dumps(run)
    save_tensors(path, adapter, metadata=metadata)


def load_adapter(path: str | Path) -> tuple[dict[str, torch.Tensor], SplitPlan | None]:
    """An adapter file's tensors and its split plan (None in a file without fl-offsite's metadata)."""
    tensors = load_tensors(path)  # a missing or corrupt file: a UserError naming it
    plan = _metadata(path).get("split_plan")
    if plan is None:
        return tensors, None
    try:
        return tensors, SplitPlan.from_json(json.loads(plan))
    except (json.JSONDecodeError, TypeError) as err:
        raise UserError(f"{path} carries a broken split plan ({err}); re-create it or save it without metadata") \
            from err


def adapter_run(path: str | Path) -> dict | None:
    """The record of the run that trained the adapter in ``path`` (read by :func:`load_adapter` first), if any."""
    text = _metadata(path).get(RUN_METADATA)
    return json.loads(text) if text else None


def _metadata(path: str | Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


def write_split(
    out: str | Path,
    emulator: PreTrainedModel,
    adapter: dict[str, torch.Tensor],
    plan: SplitPlan,
    tokenizer=None,
    record: dict | None = None,
) -> Path:
    """Write ``out/emulator/``, ``out/adapter.safetensors`` and ``out/split.json`` atomically."""
    with atomic_dir(out) as tmp:
        emulator.save_pretrained(tmp / EMULATOR_DIR)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp / EMULATOR_DIR)
        save_adapter(tmp / ADAPTER_FILE, adapter, plan)
        write_json(tmp / SPLIT_FILE, {**plan.to_json(), **(record or {})})
    return Path(out)


def read_plan(split_dir: str | Path) -> SplitPlan:
    """The plan stored in a folder written by :func:`write_split`."""
    path = Path(split_dir) / SPLIT_FILE
    if not path.is_file():
        raise UserError(f"{split_dir} has no {SPLIT_FILE}: give a folder written by `fl-offsite split`")
    try:
        return SplitPlan.from_json(json.loads(path.read_text()))
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON ({err}); re-create the split") from err
