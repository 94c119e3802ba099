"""The settings sections: frozen dataclasses whose fields declare the run-config keys (``option``).

Stdlib only, so that a ClientApp answering a query, or the CLI's parser, reads settings without torch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

from fl_offsite.config.options import nested, option, same_key

PRECISIONS = ("fp32", "bf16")
TARGETS = ("output", "per-block")


def pair(text: str) -> tuple[int, int]:
    """``"2,2"`` -> ``(2, 2)``."""
    try:
        bottom, top = (int(x) for x in str(text).split(","))
    except ValueError:
        raise ValueError(f"must be 'L,R' (two integers), got {text!r}") from None
    return bottom, top


def positive_numbers(text: str) -> tuple[float, ...]:
    """``"2,2,8"`` -> ``(2.0, 2.0, 8.0)`` (empty text: no list)."""
    items = [item.strip() for item in str(text).split(",") if item.strip()]
    try:
        values = tuple(float(item) for item in items)
    except ValueError:
        raise ValueError(f"must be comma-separated numbers, one per simulated node, got {text!r}") from None
    if any(v <= 0 for v in values):
        raise ValueError(f"values must be positive, got {text!r}")
    return values


def whole_numbers(text: str) -> tuple[int, ...]:
    values = positive_numbers(text)
    if any(not v.is_integer() for v in values):
        raise ValueError(f"must be whole numbers of middle blocks, got {text!r}")
    return tuple(int(v) for v in values)


@dataclass(frozen=True)
class LoraSpec:
    """LoRA of the ``-lora`` methods (PEFT; the paper: r 4, alpha 32, dropout 0.1)."""

    r: int = option("lora.r", 4, "LoRA rank", minimum=1)
    alpha: int = option("lora.alpha", 32, above=0)
    dropout: float = option("lora.dropout", 0.1)


@dataclass(frozen=True)
class Tuning:
    """What of the adapter trains (``fl_offsite.surgery.tuning``): all | lora | bitfit | bottleneck."""

    kind: str = "all"  # from ``method``
    lora: LoraSpec | None = nested(LoraSpec)  # set for kind "lora"
    bottleneck_size: int = option("bottleneck.size", 64, "width of offsite-bottleneck's adapters", minimum=1)

    def payload_kind(self, plan: object | None) -> str:
        """What this tuning's payload is, for error messages; ``plan``: the split plan (None: the full model)."""
        if self.kind == "lora":
            return "LoRA payload"
        if plan is None:
            return "full-model payload"
        return {"all": "adapter", "bitfit": "BitFit payload", "bottleneck": "bottleneck payload"}[self.kind]


@dataclass(frozen=True)
class DistillSettings:
    """The model owner's emulator distillation (``distill.*``; fl_offsite.emulator.distill)."""

    steps: int = option("distill.steps", 0, "emulator distillation steps on the owner's side (0 = plain layer drop)",
                        minimum=0)
    corpus: str = option("distill.corpus", "public", "the owner's public text: see fl_offsite.data.corpora")
    lr: float = option("distill.lr", 1e-4, above=0)
    kd_weight: float = option("distill.kd-weight", 30.0, "weight of the hidden-state loss (paper: 30)", minimum=0)
    targets: str = option("distill.targets", "output", "output: the middle's output (the paper); per-block: "
                          "every kept middle block", choices=TARGETS)
    kl_weight: float = option("distill.kl-weight", 0.0, "weight of KL(full || emulator) on the logits", minimum=0)
    batch_size: int = option("distill.batch-size", 8, minimum=1)
    block_size: int = option("distill.block-size", 160, "tokens per distillation sequence", minimum=2)
    precision: str = option("distill.precision", "fp32", "bf16: autocast (2-3x faster on CPUs with AMX)",
                            choices=PRECISIONS)
    eval_every: int = option("distill.eval-every", 25, "steps between held-out perplexities (the best is kept)",
                             minimum=1)
    warmup_steps: int = 10
    eval_texts: int = 16  # held-out ("validation") texts of the corpus for the perplexity
    seed: int = 1234


@dataclass(frozen=True)
class EmulatorRecipe:
    """How the model owner builds the emulator (``split.*``, ``emulator.*``, ``distill.*``)."""

    adapter: tuple[int, int] = option("split.adapter-layers", "2,2", "bottom,top blocks of the adapter", parse=pair)
    emulator_layers: int | None = option("split.emulator-layers", 8, "middle blocks the emulator keeps (k); "
                                         "None when drop_ratio is given")
    drop_ratio: float | None = option("split.drop-ratio", 0.0, "when > 0, replaces emulator-layers",
                                      parse=lambda ratio: ratio if ratio > 0 else None)
    layers: str = option("emulator.layers", "uniform", "which middle blocks the emulator keeps: see "
                         "fl_offsite.emulator.layer_choice", choices=("uniform", "similarity", "greedy"))
    sharing: bool = option("emulator.sharing", False, "CRaSh's layer sharing: each kept middle block also runs in "
                           "the dropped slots before it, so the emulator keeps the full depth (the compute of the "
                           "full middle, the weights and bytes of k blocks)")
    distill: DistillSettings | None = nested(DistillSettings)  # None: no distillation
    corpus: str = same_key(DistillSettings, "corpus")  # for the layer rule and distillation
    public_in_domain: bool = option("distill.public-in-domain", False,
                                    "the owner holds public text of the task's own domain (else refused)")

    @property
    def adapter_bottom(self) -> int:
        return self.adapter[0]

    @property
    def adapter_top(self) -> int:
        return self.adapter[1]

    @property
    def uses_corpus(self) -> bool:
        return self.layers != "uniform" or self.distill is not None

    def describe(self) -> str:
        parts = [f"layers {self.layers}" + (", shared" if self.sharing else "")]
        if self.distill:
            parts.append(f"distilled {self.distill.steps} steps ({self.distill.targets} targets"
                         f"{f', KL {self.distill.kl_weight:g}' if self.distill.kl_weight else ''})")
        if self.uses_corpus:
            parts.append(f"corpus {self.corpus}")
        return ", ".join(parts)


@dataclass(frozen=True)
class RealignSettings:
    """The owner's per-round re-alignment of the emulator (``realign.*``, FedBiOT); its text: ``distill.corpus``."""

    steps: int = option("realign.steps", 0, "re-alignment steps before every round (FedBiOT: 10)", minimum=0)
    pre_steps: int = option("realign.pre-steps", 0, "re-alignment steps once, before round 1 (FedBiOT: 500)",
                            minimum=0)
    lr: float = option("realign.lr", 1e-3, above=0)
    lora_r: int = option("realign.lora-r", 8, "the re-alignment LoRA's rank (its factors travel each round)",
                         minimum=1)
    lora_alpha: int = option("realign.lora-alpha", 16)
    batch_size: int = option("realign.batch-size", 4, "sequences of distill.block-size tokens per step", minimum=1)
    block_size: int = same_key(DistillSettings, "block_size")
    targets: str = option("realign.targets", "output", "output (the middle's output) | per-block", choices=TARGETS)
    kl_weight: float = option("realign.kl-weight", 0.0, "weight of KL(full || emulator) on the logits", minimum=0)
    precision: str = option("realign.precision", "fp32", "bf16: autocast", choices=PRECISIONS)
    seed: int = 0

    @property
    def enabled(self) -> bool:
        return self.steps > 0 or self.pre_steps > 0


@dataclass(frozen=True)
class TrainSettings:
    """A client's local training (``train.*``) at the base learning rate; per round: :meth:`for_round`."""

    lr: float = option("train.lr", 1e-4, "client AdamW learning rate", above=0)
    batch_size: int = option("train.batch-size", 8, minimum=1)
    grad_accum: int = option("train.grad-accum", 1, minimum=1)
    local_steps: int = option("train.local-steps", 10, "optimizer steps per round; 0 = use local-epochs", minimum=0)
    local_epochs: float = option("train.local-epochs", 1.0, minimum=0)
    weight_decay: float = option("train.weight-decay", 0.0, minimum=0)
    grad_clip: float = option("train.grad-clip", 1.0, "max L2 norm of a step's gradients (0 = off)", minimum=0)
    precision: str = option("train.precision", "fp32", "bf16: clients train under bf16 autocast with frozen "
                            "weights in bf16", choices=PRECISIONS)
    proximal_mu: float = 0.0  # FedProx: mu/2 * ||w - w_global||^2 (the server sends it each round)
    seed: int = 0

    def for_round(self, rnd: int, partition_id: int, lr: float, proximal_mu: float = 0.0) -> TrainSettings:
        """Client ``partition_id``'s settings in round ``rnd`` of a run seeded ``self.seed``: the server's
        learning rate and FedProx mu, and a seed of its own."""
        return replace(self, lr=lr, proximal_mu=proximal_mu, seed=self.seed * 7919 + rnd * 131 + partition_id)

    def steps_for(self, num_examples: int) -> int:
        if self.local_steps > 0:
            return self.local_steps
        return max(1, math.ceil(self.local_epochs * num_examples / (self.batch_size * self.grad_accum)))


STRATEGIES = ("fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "fedmedian", "fedtrimmedavg", "krum")


@dataclass(frozen=True)
class StrategySettings:
    """The aggregation strategy and the checks on what clients send (``strategy.*``)."""

    name: str = option("strategy.name", "fedavg", choices=STRATEGIES)
    fraction_train: float = option("strategy.fraction-train", 1.0, "share of the nodes sampled each round, (0, 1]")
    min_train_nodes: int = option("strategy.min-train-nodes", 2, minimum=1)
    min_available_nodes: int = option("strategy.min-available-nodes", 2, minimum=1)
    round_timeout: float = option("strategy.round-timeout", 3600.0, "seconds to wait for the replies of a round "
                                  "(the delivery: at least 600)", above=0)
    proximal_mu: float = option("strategy.proximal-mu", 0.01, "fedprox", minimum=0)
    server_lr: float = option("strategy.server-lr", 1.0, "fedavgm", above=0)
    server_momentum: float = option("strategy.server-momentum", 0.9, "fedavgm", minimum=0)
    eta: float = option("strategy.eta", 1e-3, "fedadam, fedyogi, fedadagrad: server learning rate", above=0)
    trim_beta: float = option("strategy.trim-beta", 0.2, "fedtrimmedavg", minimum=0)
    num_malicious: int = option("strategy.num-malicious", 0, "krum", minimum=0)
    max_examples: int = option("strategy.max-examples", 1_000_000, "a client claiming more examples (or not a "
                               "positive finite number) makes that round's weights uniform", minimum=1)
    max_update_norm: float = option("strategy.max-update-norm", 0.0, "reject updates whose L2 distance from the "
                                    "global adapter is larger (0 = off)", minimum=0)


@dataclass(frozen=True)
class PrivacySettings:
    """Differential privacy (``dp.*``): client-side clipping and server noise when ``noise_multiplier`` > 0."""

    noise_multiplier: float = option("dp.noise-multiplier", 0.0, "> 0: client-side clipping + server Gaussian "
                                     "noise, epsilon accounted (fedavg)", minimum=0)
    clipping_norm: float = option("dp.clipping-norm", 1.0, "L2 bound of each client's update")
    delta: float = option("dp.delta", 1e-5, "epsilon is reported at this delta")
    max_epsilon: float = option("dp.max-epsilon", 0.0, "stop before a round would exceed this epsilon (0 = no limit)",
                                     minimum=0)

    @property
    def enabled(self) -> bool:
        return self.noise_multiplier > 0


@dataclass(frozen=True)
class DataSettings:
    """The data owners' examples (``data.*``, ``train.max-length``)."""

    partitioner: str = option("data.partitioner", "dirichlet", "iid | dirichlet (over labels)",
                              choices=("iid", "dirichlet"))
    alpha: float = option("data.alpha", 1.0, "Dirichlet concentration: smaller is more skewed", above=0)
    num_partitions: int = option("data.num-partitions", 4, "used when a node does not give num-partitions",
                                 minimum=1)
    max_length: int = option("train.max-length", 256, "tokens per training example", minimum=1)


@dataclass(frozen=True)
class EvalSettings:
    """What the model owner scores (``eval.*``): how many test examples, in which rounds, at which precision."""

    limit: int = option("eval.limit", 200, "held-out test examples the owner scores (0 = the whole test split)",
                        minimum=0)
    batch_size: int = option("eval.batch-size", 16, minimum=1)
    every: int = option("eval.every", 1, "evaluate before training, every N-th round and after the last "
                        "(0 = only before and after)", minimum=0)
    precision: str = option("eval.precision", "fp32", "bf16: the owner scores under bf16 autocast",
                            choices=PRECISIONS)
    overlap: bool = option("eval.overlap", False, "score a round while the next one trains, where the owner's "
                           "scoring has hardware of its own (not with re-alignment, which changes the emulator "
                           "between rounds)")

    def due(self, rnd: int, num_rounds: int) -> bool:
        """Whether round ``rnd`` (0: before training) is evaluated."""
        return rnd in (0, num_rounds) or (self.every > 0 and rnd % self.every == 0)


@dataclass(frozen=True)
class FleetSettings:
    """Simulated nodes' budgets or emulator sizes by partition-id, and the runtime overhead (``fleet.*``)."""

    memory_budget_mb: tuple[float, ...] = option("fleet.memory-budget-mb", "", "simulated nodes' memory budgets, "
                                                 "'a,b,...' by partition-id (app/fleet.py)", parse=positive_numbers)
    emulator_layers: tuple[int, ...] = option("fleet.emulator-layers", "", "simulated nodes' emulator sizes (k), "
                                              "'a,b,...' by partition-id", parse=whole_numbers)
    overhead_mb: float = option("fleet.overhead-mb", 500.0, "a client process before it trains, in a node's "
                                "footprint (CPU: 460-640 MB measured)", minimum=0)


@dataclass(frozen=True)
class ResultsSettings:
    """Where a run writes (``results.*``)."""

    dir: str = option("results.dir", "runs/default")
    resume: bool = option("results.resume", True, "continue an interrupted run in the same folder")
    tensorboard: bool = option("results.tensorboard", False, "also write each round's metrics as TensorBoard "
                               "scalars (<results.dir>/tensorboard)")

