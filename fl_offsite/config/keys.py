"""The run configuration: flat dotted keys, one table of defaults, strict validation.

The same keys appear in ``[tool.flwr.app.config]`` of pyproject.toml (Flower's run
config; a test keeps the two equal), in config files for ``fl-offsite simulate``, and
in ``--set key=value`` / ``--run-config`` overrides.
"""
from __future__ import annotations

import difflib
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fl_offsite.config.method import METHODS
from fl_offsite.errors import UserError

Value = bool | int | float | str

DEFAULTS: dict[str, Value] = {
    "model": "smollm2-135m",  # local folder, hub id, or offline alias
    "task": "bbc-news",  # see fl_offsite.data.tasks
    "method": "offsite",  # see fl_offsite.config.method; -lora/-bitfit/-bottleneck: what of the adapter trains
    "num-rounds": 3,
    "seed": 1234,
    "split.adapter-layers": "2,2",  # bottom,top blocks of the adapter
    "split.emulator-layers": 8,  # middle blocks the emulator keeps (k)
    "split.drop-ratio": 0.0,  # when > 0, replaces emulator-layers
    "emulator.layers": "uniform",  # which middle blocks the emulator keeps: see fl_offsite.emulator.layer_choice
    "distill.steps": 0,  # emulator distillation steps on the owner's side (0 = plain layer drop)
    "distill.corpus": "public",  # the owner's public text (layer rules too): see fl_offsite.data.corpora
    "distill.public-in-domain": False,  # the owner holds public text of the task's own domain (else refused)
    "distill.lr": 1e-4,
    "distill.kd-weight": 30.0,  # weight of the hidden-state loss (paper: 30)
    "distill.targets": "output",  # output (the middle's output, the paper) | per-block (every kept middle block)
    "distill.kl-weight": 0.0,  # weight of KL(full || emulator) on the logits
    "distill.batch-size": 8,
    "distill.block-size": 160,  # tokens per distillation sequence
    "distill.precision": "fp32",  # bf16: autocast (2-3x faster on CPUs with AMX / AVX512-BF16)
    "distill.eval-every": 25,  # steps between held-out perplexities (the best emulator is kept)
    "realign.steps": 0,  # the owner re-aligns the emulator (LoRA on its middle) before every round (FedBiOT: 10)
    "realign.pre-steps": 0,  # re-alignment steps once, before round 1 (FedBiOT: 500)
    "realign.lr": 1e-3,
    "realign.lora-r": 8,  # the emulator's re-alignment LoRA (its factors travel each round)
    "realign.lora-alpha": 16,
    "realign.batch-size": 4,  # sequences of distill.block-size tokens of the owner's public text (distill.corpus)
    "realign.targets": "output",  # output (the middle's output) | per-block (every kept middle block)
    "realign.kl-weight": 0.0,  # weight of KL(full || emulator) on the logits (lifts emulator + adapter too)
    "realign.precision": "fp32",  # bf16: autocast
    "lora.r": 4,  # LoRA of the -lora methods (paper: r 4, alpha 32, dropout 0.1)
    "lora.alpha": 32,
    "lora.dropout": 0.1,
    "bottleneck.size": 64,  # width of the bottleneck adapters of offsite-bottleneck
    "strategy.name": "fedavg",
    "strategy.fraction-train": 1.0,
    "strategy.min-train-nodes": 2,
    "strategy.min-available-nodes": 2,
    "strategy.round-timeout": 3600.0,  # seconds to wait for the replies of a round (the delivery: at least 600)
    "strategy.proximal-mu": 0.01,  # fedprox
    "strategy.server-lr": 1.0,  # fedavgm
    "strategy.server-momentum": 0.9,  # fedavgm
    "strategy.eta": 1e-3,  # fedadam, fedyogi, fedadagrad: server learning rate
    "strategy.trim-beta": 0.2,  # fedtrimmedavg
    "strategy.num-malicious": 0,  # krum
    "strategy.max-update-norm": 0.0,  # reject updates whose L2 distance from the global adapter is larger (0 = off)
    "dp.noise-multiplier": 0.0,  # > 0: client-side clipping + server Gaussian noise, epsilon accounted (fedavg)
    "dp.clipping-norm": 1.0,  # L2 bound of each client's update
    "dp.delta": 1e-5,  # epsilon is reported at this delta
    "dp.max-epsilon": 0.0,  # stop before a round would exceed this epsilon (0 = no limit)
    "train.lr": 1e-4,
    "train.lr-schedule": "cosine",  # across rounds: constant | cosine | linear
    "train.batch-size": 8,
    "train.grad-accum": 1,
    "train.local-steps": 10,  # optimizer steps per round; 0 = use local-epochs
    "train.local-epochs": 1.0,
    "train.max-length": 256,
    "train.weight-decay": 0.0,
    "train.grad-clip": 1.0,
    "train.precision": "fp32",  # bf16: clients train under bf16 autocast with frozen weights in bf16
    "data.partitioner": "dirichlet",  # iid | dirichlet (over labels)
    "data.alpha": 1.0,
    "data.num-partitions": 4,  # used when the node does not give num-partitions
    "eval.limit": 200,  # held-out test examples evaluated by the model owner (0 = the whole test split)
    "eval.batch-size": 16,
    "eval.every": 1,  # evaluate before training, every N-th round and after the last (0 = only before and after)
    "eval.precision": "fp32",  # bf16: the owner scores under bf16 autocast (2-3x faster on CPUs with AMX)
    "fleet.memory-budget-mb": "",  # simulated nodes' memory budgets, "a,b,..." by partition-id (app/fleet.py)
    "fleet.emulator-layers": "",  # simulated nodes' emulator sizes (k), "a,b,..." by partition-id
    "fleet.overhead-mb": 500.0,  # a client process before it trains, in a node's footprint (CPU: 460-640 MB measured)
    "results.dir": "runs/default",
    "results.resume": True,
    "results.tensorboard": False,  # also write each round's metrics as TensorBoard scalars (<results.dir>/tensorboard)
}

# ``fl-offsite distill``'s --steps (and DistillSettings') default: in a run config, distill.steps = 0 means
# "no distillation", which that command, whose job is to distil, has no use for.
DISTILL_COMMAND_STEPS = 100

CHOICES: dict[str, tuple[str, ...]] = {
    "method": tuple(METHODS),
    "strategy.name": ("fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "fedmedian",
                      "fedtrimmedavg", "krum"),
    "train.lr-schedule": ("constant", "cosine", "linear"),
    "train.precision": ("fp32", "bf16"),
    "emulator.layers": ("uniform", "similarity", "greedy"),
    "distill.targets": ("output", "per-block"),
    "distill.precision": ("fp32", "bf16"),
    "realign.targets": ("output", "per-block"),
    "realign.precision": ("fp32", "bf16"),
    "eval.precision": ("fp32", "bf16"),
    "data.partitioner": ("iid", "dirichlet"),
}


def validate(overrides: dict[str, Any]) -> dict[str, Value]:
    """Defaults updated with ``overrides``; unknown keys, wrong types and bad choices are UserErrors."""
    config = dict(DEFAULTS)
    for key, value in overrides.items():
        if key not in DEFAULTS:
            close = difflib.get_close_matches(key, DEFAULTS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(DEFAULTS)}"
            raise UserError(f"unknown config key {key!r}{hint}")
        config[key] = _coerce(key, value)
    for key, allowed in CHOICES.items():
        if config[key] not in allowed:
            raise UserError(f"{key} = {config[key]!r} is not one of {', '.join(allowed)}")
    for key in ("num-rounds", "train.batch-size", "train.grad-accum", "train.max-length", "distill.eval-every"):
        if config[key] < 1:
            raise UserError(f"{key} must be >= 1, got {config[key]}")
    for key in ("eval.limit", "eval.every", "realign.steps", "realign.pre-steps"):
        if config[key] < 0:
            raise UserError(f"{key} must be >= 0, got {config[key]}")
    if config["train.local-steps"] <= 0 and config["train.local-epochs"] <= 0:
        raise UserError("set train.local-steps or train.local-epochs to a positive number")
    if not 0.0 < config["strategy.fraction-train"] <= 1.0:
        raise UserError(f"strategy.fraction-train must be in (0, 1], got {config['strategy.fraction-train']}")
    if config["dp.noise-multiplier"] > 0:
        if config["strategy.name"] != "fedavg":
            raise UserError("differential privacy (dp.noise-multiplier > 0) needs strategy.name = fedavg: "
                            "its accountant assumes plain, equally weighted averaging")
        if config["train.local-steps"] <= 0:
            raise UserError("differential privacy weighs every client equally: set train.local-steps > 0")
        if not 0 < config["dp.delta"] < 1 or config["dp.clipping-norm"] <= 0:
            raise UserError("dp.delta must be in (0, 1) and dp.clipping-norm > 0")
    lists = {key: fleet_list(config[key], key) for key in FLEET_LISTS}
    if any(not k.is_integer() for k in lists["fleet.emulator-layers"]):
        raise UserError(f"fleet.emulator-layers must be whole numbers of middle blocks, got "
                        f"{config['fleet.emulator-layers']!r}")
    for key, values in lists.items():
        if values and METHODS[config["method"]][0] != "offsite":
            raise UserError(f"{key} gives simulated nodes emulators of different sizes: it needs an offsite method, "
                            f"not {config['method']}; set it in the offsite run only")
    if config["realign.steps"] or config["realign.pre-steps"]:
        if METHODS[config["method"]][0] != "offsite":
            raise UserError(f"realign.* re-aligns an emulator: it needs an offsite method, not {config['method']}; "
                            "set realign.steps = 0 for this run")
        if config["realign.lora-r"] < 1 or config["realign.batch-size"] < 1 or config["realign.lr"] <= 0:
            raise UserError("re-alignment needs realign.lora-r >= 1, realign.batch-size >= 1 and realign.lr > 0")
    adapter_layers(config)
    return config


FLEET_LISTS = ("fleet.memory-budget-mb", "fleet.emulator-layers")


def fleet_list(text: Value, key: str) -> list[float]:
    """A ``fleet.*`` list: ``"2,2,8"`` -> ``[2.0, 2.0, 8.0]`` (empty text: no list)."""
    items = [item.strip() for item in str(text).split(",") if item.strip()]
    try:
        values = [float(item) for item in items]
    except ValueError:
        raise UserError(f"{key} must be comma-separated numbers, one per simulated node, got {text!r}") from None
    if any(v <= 0 for v in values):
        raise UserError(f"{key} values must be positive, got {text!r}")
    return values


def _coerce(key: str, value: Any) -> Value:
    """``value`` as the type of the key's default (strings from the command line are parsed)."""
    kind = type(DEFAULTS[key])
    if isinstance(value, str) and kind is not str:
        text = value.strip().lower()
        if kind is bool:
            if text not in ("true", "false", "1", "0"):
                raise UserError(f"{key} must be true or false, got {value!r}")
            return text in ("true", "1")
        try:
            return kind(float(text)) if kind is int and float(text).is_integer() else kind(text)
        except ValueError:
            raise UserError(f"{key} must be {kind.__name__}, got {value!r}") from None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise UserError(f"{key} must be {kind.__name__}, got {value!r} ({type(value).__name__})")
    return value


def adapter_layers(config: dict[str, Value]) -> tuple[int, int]:
    text = str(config["split.adapter-layers"])
    try:
        bottom, top = (int(x) for x in text.split(","))
    except ValueError:
        raise UserError(f"split.adapter-layers must be 'L,R' (two integers), got {text!r}") from None
    return bottom, top


def parse_sets(items: list[str]) -> dict[str, str]:
    """``["a=1", "b=x"]`` -> ``{"a": "1", "b": "x"}``."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set expects key=value, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def load_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML config file of flat keys (nested tables are flattened with dots)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no such config file: {path}")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise UserError(f"{path} is not valid TOML: {err}") from err
    return flatten(data)


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested TOML tables as flat dotted keys."""
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


@dataclass(frozen=True)
class DistillSettings:
    """The model owner's emulator distillation (``distill.*`` keys; see fl_offsite.emulator.distill)."""

    steps: int = DISTILL_COMMAND_STEPS
    corpus: str = DEFAULTS["distill.corpus"]  # the owner's public text: see fl_offsite.data.corpora
    lr: float = DEFAULTS["distill.lr"]
    kd_weight: float = DEFAULTS["distill.kd-weight"]  # the paper's weight of the hidden-state loss
    targets: str = DEFAULTS["distill.targets"]  # "output": the middle's output (the paper); "per-block": every one
    kl_weight: float = DEFAULTS["distill.kl-weight"]  # weight of KL(full model || emulator) on the next tokens
    batch_size: int = DEFAULTS["distill.batch-size"]
    block_size: int = DEFAULTS["distill.block-size"]  # tokens per training sequence
    precision: str = DEFAULTS["distill.precision"]  # "bf16": autocast (2-3x faster on CPUs with AMX / AVX512-BF16)
    warmup_steps: int = 10
    eval_every: int = DEFAULTS["distill.eval-every"]
    eval_texts: int = 16  # held-out ("validation") texts of the corpus for the perplexity
    seed: int = DEFAULTS["seed"]
