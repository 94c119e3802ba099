"""The inner aggregation strategy, one of Flower's own, chosen by ``strategy.name``."""
from __future__ import annotations

from flwr.serverapp import strategy as fl


def aggregation_strategy(config: dict) -> fl.Strategy:
    """A Flower strategy built from the run config; clients evaluate nothing (the owner does)."""
    common = dict(
        fraction_train=config["strategy.fraction-train"], fraction_evaluate=0.0,
        min_train_nodes=config["strategy.min-train-nodes"],
        min_available_nodes=config["strategy.min-available-nodes"],
    )
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
