"""The inner aggregation strategy, one of Flower's own, chosen by ``strategy.name``."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from flwr.serverapp import strategy as fl

from strategies.screening import EQUAL_WEIGHT

if TYPE_CHECKING:
    from fl_offsite.config.sections import PrivacySettings, StrategySettings


def aggregation_strategy(settings: StrategySettings, dp: PrivacySettings, num_nodes: int) -> fl.Strategy:
    """A Flower strategy built from the run's settings, for ``num_nodes`` nodes that can train; clients evaluate
    nothing (the owner does).

    With ``dp.noise-multiplier`` > 0 it is FedAvg (clients weighted equally, by the owner's
    ``strategies.screening.EQUAL_WEIGHT``) inside Flower's client-side fixed-clipping DP wrapper, with
    Flower's RDP accountant over ``num_nodes`` data owners; the clients clip with ``fixedclipping_mod``.
    """
    # ``num_nodes`` are the nodes that can train (delivered a model): Flower's sampling waits, without a timeout,
    # for min_available_nodes of them, so a node refused at delivery must not count towards it
    common: dict[str, Any] = dict(fraction_train=settings.fraction_train, fraction_evaluate=0.0,
                                  min_train_nodes=settings.min_train_nodes,
                                  min_available_nodes=min(settings.min_available_nodes, num_nodes))
    if dp.enabled:
        return _private(fl.FedAvg(**common, weighted_by_key=EQUAL_WEIGHT), settings, dp, num_nodes)
    s = settings
    builders = {
        "fedavg": lambda: fl.FedAvg(**common),
        "fedprox": lambda: fl.FedProx(**common, proximal_mu=s.proximal_mu),
        "fedavgm": lambda: fl.FedAvgM(**common, server_learning_rate=s.server_lr, server_momentum=s.server_momentum),
        "fedadam": lambda: fl.FedAdam(**common, eta=s.eta),
        "fedyogi": lambda: fl.FedYogi(**common, eta=s.eta),
        "fedadagrad": lambda: fl.FedAdagrad(**common, eta=s.eta),
        "fedmedian": lambda: fl.FedMedian(**common),
        "fedtrimmedavg": lambda: fl.FedTrimmedAvg(**common, beta=s.trim_beta),
        "krum": lambda: fl.Krum(**common, num_malicious_nodes=s.num_malicious),
    }
    return builders[s.name]()


def _private(inner: fl.FedAvg, settings: StrategySettings, dp: PrivacySettings, num_nodes: int) -> fl.Strategy:
    from flwr.serverapp import NeighboringRelation, PrivacyConfig, RdpAccountant, SamplingMethod

    sampled = max(int(num_nodes * settings.fraction_train), settings.min_train_nodes)
    accountant = RdpAccountant(PrivacyConfig(
        target_delta=dp.delta, population_size=num_nodes,
        neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE, sampling_method=SamplingMethod.NO_AMPLIFICATION,
        max_epsilon=dp.max_epsilon or None))
    return fl.DifferentialPrivacyClientSideFixedClipping(
        inner, noise_multiplier=dp.noise_multiplier, clipping_norm=dp.clipping_norm,
        num_sampled_clients=sampled, accountant=accountant)
