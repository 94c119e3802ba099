"""A run's settings, and the run-config table they declare: defaults, choices, validation, ``from_config``.

Flower carries the flat dict (``context.run_config``); each side builds :class:`Settings` from it with
:meth:`Settings.from_config`. Each key is declared once, on its field (``fl_offsite.config.sections``).
"""
from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from typing import Any

from fl_offsite.config.method import METHODS, Method
from fl_offsite.config.options import Option, Value, declared_options, option, section_from
from fl_offsite.config.sections import (
    DataSettings,
    DistillSettings,
    EmulatorRecipe,
    EvalSettings,
    FleetSettings,
    LoraSpec,
    PrivacySettings,
    RealignSettings,
    ResultsSettings,
    StrategySettings,
    TrainSettings,
    Tuning,
)
from fl_offsite.errors import UserError


@dataclass(frozen=True)
class Settings:
    """One run: the model, task and method, and a section per group of keys."""

    model: str = option("model", "smollm2-135m", "local folder, hub id, or offline alias")
    task: str = option("task", "bbc-news", "see fl_offsite.data.tasks")
    method: Method = option("method", "offsite", "see fl_offsite.config.method; -lora/-bitfit/-bottleneck: what of "
                            "the adapter trains", choices=tuple(METHODS), parse=Method.parse)
    num_rounds: int = option("num-rounds", 3, minimum=1)
    seed: int = option("seed", 1234)
    lr_schedule: str = option("train.lr-schedule", "cosine", "across rounds", choices=("constant", "cosine", "linear"))
    emulator: EmulatorRecipe = field(default_factory=EmulatorRecipe)
    tuning: Tuning = field(default_factory=Tuning)  # what trains: the method's tuning, lora.*, bottleneck.size
    strategy: StrategySettings = field(default_factory=StrategySettings)
    dp: PrivacySettings = field(default_factory=PrivacySettings)
    train: TrainSettings = field(default_factory=TrainSettings)  # at the base learning rate; per round: for_round
    data: DataSettings = field(default_factory=DataSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)
    results: ResultsSettings = field(default_factory=ResultsSettings)
    fleet: FleetSettings = field(default_factory=FleetSettings)
    realign: RealignSettings = field(default_factory=RealignSettings)  # the owner's per-round re-alignment (FedBiOT)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Settings:
        """The settings of ``config`` (validated here, so a raw run config works too)."""
        c: dict[str, Any] = validate(config)
        method, seed = Method.parse(str(c["method"])), c["seed"]
        distill = section_from(DistillSettings, c, seed=seed) if c["distill.steps"] else None
        emulator = section_from(EmulatorRecipe, c, distill=distill,
                                emulator_layers=None if c["split.drop-ratio"] > 0 else c["split.emulator-layers"])
        lora = section_from(LoraSpec, c) if method.tuning == "lora" else None
        return section_from(cls, c, emulator=emulator, tuning=section_from(Tuning, c, kind=method.tuning, lora=lora),
                            train=section_from(TrainSettings, c, seed=seed),
                            realign=section_from(RealignSettings, c, seed=seed))


OPTIONS: dict[str, Option] = {}
for _option in declared_options(Settings):
    if _option.key in OPTIONS:
        raise TypeError(f"config key {_option.key} is declared twice; the second field should use same_key")
    OPTIONS[_option.key] = _option

DEFAULTS: dict[str, Value] = {key: o.default for key, o in OPTIONS.items()}
CHOICES: dict[str, tuple[str, ...]] = {key: o.choices for key, o in OPTIONS.items() if o.choices}


def validate(overrides: dict[str, Any]) -> dict[str, Value]:
    """Defaults updated with ``overrides``; unknown keys, wrong types, bad choices and bounds are UserErrors."""
    config: dict[str, Any] = dict(DEFAULTS)
    for key, value in overrides.items():
        if key not in OPTIONS:
            close = difflib.get_close_matches(key, OPTIONS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(OPTIONS)}"
            raise UserError(f"unknown config key {key!r}{hint}")
        config[key] = _coerce(key, value)
    for key, declared in OPTIONS.items():
        if declared.choices and config[key] not in declared.choices:
            raise UserError(f"{key} = {config[key]!r} is not one of {', '.join(declared.choices)}")
        if isinstance(config[key], float) and not math.isfinite(config[key]):
            raise UserError(f"{key} must be a finite number, got {config[key]}")
        if declared.minimum is not None and config[key] < declared.minimum:
            raise UserError(f"{key} must be >= {declared.minimum:g}, got {config[key]}")
        if declared.above is not None and config[key] <= declared.above:
            raise UserError(f"{key} must be > {declared.above:g}, got {config[key]}")
        declared.value(config[key])
    _check_together(config)
    return config


def _check_together(config: dict[str, Any]) -> None:
    """The rules that tie several keys together."""
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
    method = Method.parse(config["method"])
    for key in ("fleet.memory-budget-mb", "fleet.emulator-layers"):
        if OPTIONS[key].value(config[key]) and not method.tunes_adapter:
            raise UserError(f"{key} gives simulated nodes emulators of different sizes: it needs an offsite method, "
                            f"not {method.name}; set it in the offsite run only")
    if (config["realign.steps"] or config["realign.pre-steps"]) and not method.tunes_adapter:
        raise UserError(f"realign.* re-aligns an emulator: it needs an offsite method, not {method.name}; "
                        "set realign.steps = 0 for this run")


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
