"""Typed, frozen settings built once from a validated run config (the only reader of its dotted keys).

Flower carries the flat dict (``context.run_config``); each side builds :class:`Settings` from it
with :meth:`Settings.from_config`. Every default comes from ``fl_offsite.config.keys.DEFAULTS``.
"""
from __future__ import annotations

from dataclasses import dataclass

from fl_offsite.config.keys import DistillSettings, Value, adapter_layers, fleet_list, validate
from fl_offsite.config.method import Method
from fl_offsite.emulator.realign import RealignSettings
from fl_offsite.emulator.recipe import EmulatorRecipe
from fl_offsite.learn.train import TrainSettings
from fl_offsite.surgery.lora import LoraSpec
from fl_offsite.surgery.tuning import Tuning


@dataclass(frozen=True)
class StrategySettings:
    """The aggregation strategy and the checks on what clients send (``strategy.*``)."""

    name: str
    fraction_train: float
    min_train_nodes: int
    min_available_nodes: int
    round_timeout: float  # seconds to wait for the replies of a round
    proximal_mu: float  # fedprox
    server_lr: float  # fedavgm
    server_momentum: float  # fedavgm
    eta: float  # fedadam, fedyogi, fedadagrad
    trim_beta: float  # fedtrimmedavg
    num_malicious: int  # krum
    max_update_norm: float  # 0 = off


@dataclass(frozen=True)
class PrivacySettings:
    """Differential privacy (``dp.*``): client-side clipping and server noise when ``noise_multiplier`` > 0."""

    noise_multiplier: float
    clipping_norm: float
    delta: float
    max_epsilon: float  # 0 = no limit

    @property
    def enabled(self) -> bool:
        return self.noise_multiplier > 0


@dataclass(frozen=True)
class DataSettings:
    """The data owners' examples (``data.*``, ``train.max-length``)."""

    partitioner: str
    alpha: float
    num_partitions: int  # used when a node does not give num-partitions
    max_length: int  # tokens per training example


@dataclass(frozen=True)
class EvalSettings:
    """What the model owner scores (``eval.*``): how many test examples, in which rounds, at which precision."""

    limit: int  # held-out test examples the model owner evaluates; 0 = the whole test split
    batch_size: int
    every: int  # rounds between evaluations; 0 = only before the first round and after the last
    precision: str

    def due(self, rnd: int, num_rounds: int) -> bool:
        """Whether round ``rnd`` (0: before training) is evaluated."""
        return rnd in (0, num_rounds) or (self.every > 0 and rnd % self.every == 0)


@dataclass(frozen=True)
class FleetSettings:
    """Simulated nodes' budgets or emulator sizes by partition-id, and the runtime overhead (``fleet.*``)."""

    memory_budget_mb: tuple[float, ...]
    emulator_layers: tuple[int, ...]
    overhead_mb: float  # a client process before it trains, in a node's footprint (fl_offsite.app.fleet)


@dataclass(frozen=True)
class ResultsSettings:
    dir: str
    resume: bool
    tensorboard: bool


@dataclass(frozen=True)
class Settings:
    """One run: the model, task and method, and a section per group of keys."""

    model: str
    task: str
    method: Method
    num_rounds: int
    seed: int
    emulator: EmulatorRecipe  # split.*, emulator.*, distill.*
    tuning: Tuning  # what trains: the method's tuning, lora.*, bottleneck.size
    strategy: StrategySettings
    dp: PrivacySettings
    train: TrainSettings  # train.* at the base learning rate; per round: TrainSettings.for_round
    lr_schedule: str  # across rounds: constant | cosine | linear
    data: DataSettings
    eval: EvalSettings
    results: ResultsSettings
    fleet: FleetSettings
    realign: RealignSettings  # the owner's per-round re-alignment of the emulator (FedBiOT)

    @classmethod
    def from_config(cls, config: dict[str, Value]) -> Settings:
        """The settings of ``config`` (validated here, so a raw run config works too)."""
        c = validate(config)
        method = Method.parse(c["method"])
        drop = c["split.drop-ratio"]
        distill = DistillSettings(
            steps=c["distill.steps"], corpus=c["distill.corpus"], lr=c["distill.lr"], kd_weight=c["distill.kd-weight"],
            targets=c["distill.targets"], kl_weight=c["distill.kl-weight"], batch_size=c["distill.batch-size"],
            block_size=c["distill.block-size"], precision=c["distill.precision"], eval_every=c["distill.eval-every"],
            seed=c["seed"])
        emulator = EmulatorRecipe(
            *adapter_layers(c), emulator_layers=None if drop > 0 else c["split.emulator-layers"],
            drop_ratio=drop if drop > 0 else None, layers=c["emulator.layers"],
            distill=distill if distill.steps > 0 else None, corpus=c["distill.corpus"],
            public_in_domain=c["distill.public-in-domain"])
        lora = LoraSpec(r=c["lora.r"], alpha=c["lora.alpha"], dropout=c["lora.dropout"])
        return cls(
            model=c["model"], task=c["task"], method=method, num_rounds=c["num-rounds"], seed=c["seed"],
            emulator=emulator,
            tuning=Tuning(method.tuning, lora if method.tuning == "lora" else None, c["bottleneck.size"]),
            strategy=StrategySettings(
                name=c["strategy.name"], fraction_train=c["strategy.fraction-train"],
                min_train_nodes=c["strategy.min-train-nodes"], min_available_nodes=c["strategy.min-available-nodes"],
                round_timeout=c["strategy.round-timeout"], proximal_mu=c["strategy.proximal-mu"],
                server_lr=c["strategy.server-lr"], server_momentum=c["strategy.server-momentum"],
                eta=c["strategy.eta"], trim_beta=c["strategy.trim-beta"], num_malicious=c["strategy.num-malicious"],
                max_update_norm=c["strategy.max-update-norm"]),
            dp=PrivacySettings(noise_multiplier=c["dp.noise-multiplier"], clipping_norm=c["dp.clipping-norm"],
                               delta=c["dp.delta"], max_epsilon=c["dp.max-epsilon"]),
            train=TrainSettings(
                lr=c["train.lr"], batch_size=c["train.batch-size"], grad_accum=c["train.grad-accum"],
                local_steps=c["train.local-steps"], local_epochs=c["train.local-epochs"],
                weight_decay=c["train.weight-decay"], grad_clip=c["train.grad-clip"], seed=c["seed"],
                precision=c["train.precision"]),
            lr_schedule=c["train.lr-schedule"],
            data=DataSettings(partitioner=c["data.partitioner"], alpha=c["data.alpha"],
                              num_partitions=c["data.num-partitions"], max_length=c["train.max-length"]),
            eval=EvalSettings(limit=c["eval.limit"], batch_size=c["eval.batch-size"], every=c["eval.every"],
                              precision=c["eval.precision"]),
            results=ResultsSettings(dir=c["results.dir"], resume=c["results.resume"],
                                    tensorboard=c["results.tensorboard"]),
            fleet=FleetSettings(
                memory_budget_mb=tuple(fleet_list(c["fleet.memory-budget-mb"], "fleet.memory-budget-mb")),
                emulator_layers=tuple(int(k) for k in fleet_list(c["fleet.emulator-layers"], "fleet.emulator-layers")),
                overhead_mb=c["fleet.overhead-mb"]),
            realign=RealignSettings(
                steps=c["realign.steps"], pre_steps=c["realign.pre-steps"], lr=c["realign.lr"],
                lora_r=c["realign.lora-r"], lora_alpha=c["realign.lora-alpha"], batch_size=c["realign.batch-size"],
                block_size=c["distill.block-size"], targets=c["realign.targets"], kl_weight=c["realign.kl-weight"],
                precision=c["realign.precision"], seed=c["seed"]))
