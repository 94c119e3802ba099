"""The inner aggregation strategy, one of Flower's own, chosen by ``strategy.name``."""
from __future__ import annotations

from flwr.serverapp import strategy as fl


def aggregation_strategy(config: dict, num_nodes: int) -> fl.Strategy:
    """A Flower strategy built from the run config; clients evaluate nothing (the owner does).

    With ``dp.noise-multiplier`` > 0 it is FedAvg (clients weighted equally) inside Flower's
    client-side fixed-clipping DP wrapper, with Flower's RDP accountant over ``num_nodes``
    data owners; the clients clip with ``fixedclipping_mod``.
    """
    common = dict(
        fraction_train=config["strategy.fraction-train"], fraction_evaluate=0.0,
        min_train_nodes=config["strategy.min-train-nodes"],
        min_available_nodes=config["strategy.min-available-nodes"],
    )
    if config["dp.noise-multiplier"] > 0:
        return _private(fl.FedAvg(**common, weighted_by_key="train-steps"), config, num_nodes)
    name = config["strategy.name"]
    eta = config["strategy.eta"]
    builders = {
        "fedavg": lambda: fl.FedAvg(**common),
        "fedprox": lambda: fl.FedProx(**common, proximal_mu=config["strategy.proximal-mu"]),
        "fedavgm": lambda: fl.FedAvgM(**common, server_learning_rate=config["strategy.server-lr"],
                                      server_momentum=config["strategy.server-momentum"]),
        "fedadam": lambda: fl.FedAdam(**common, eta=eta),
        "fedyogi": lambda: fl.FedYogi(**common, eta=eta),
        "fedadagrad": lambda: fl.FedAdagrad(**common, eta=eta),
        "fedmedian": lambda: fl.FedMedian(**common),
        "fedtrimmedavg": lambda: fl.FedTrimmedAvg(**common, beta=config["strategy.trim-beta"]),
        "krum": lambda: fl.Krum(**common, num_malicious_nodes=config["strategy.num-malicious"]),
    }
    return builders[name]()


def _private(inner: fl.FedAvg, config: dict, num_nodes: int) -> fl.Strategy:
    from flwr.supercore.privacy_accounting import NeighboringRelation, PrivacyConfig, SamplingMethod
    from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

    sampled = max(int(num_nodes * config["strategy.fraction-train"]), config["strategy.min-train-nodes"])
    accountant = RdpAccountant(PrivacyConfig(
        target_delta=config["dp.delta"], population_size=num_nodes,
        neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE, sampling_method=SamplingMethod.NO_AMPLIFICATION,
        max_epsilon=config["dp.max-epsilon"] or None))
    return fl.DifferentialPrivacyClientSideFixedClipping(
        inner, noise_multiplier=config["dp.noise-multiplier"], clipping_norm=config["dp.clipping-norm"],
        num_sampled_clients=sampled, accountant=accountant)
