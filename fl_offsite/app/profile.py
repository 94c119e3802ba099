"""What a node tells the model owner before delivery (``query.node_profile``): its memory budget or emulator size.

Stdlib only: a node answers this query without importing torch (fl_offsite.app.client_app).
"""
from __future__ import annotations

from dataclasses import dataclass

from flwr.app import ConfigRecord

from fl_offsite.app import wire
from fl_offsite.config.sections import FleetSettings
from fl_offsite.errors import UserError

BUDGET_KEY, LAYERS_KEY = "memory-budget-mb", "emulator-layers"  # node config keys, and the profile's


@dataclass(frozen=True)
class NodeProfile:
    """What a node tells the model owner at the delivery handshake (both optional)."""

    memory_budget_mb: float | None = None
    emulator_layers: int | None = None

    def to_record(self) -> dict[str, float | int]:
        return {k: v for k, v in ((BUDGET_KEY, self.memory_budget_mb), (LAYERS_KEY, self.emulator_layers))
                if v is not None}

    @classmethod
    def from_record(cls, record: ConfigRecord | dict) -> NodeProfile:
        """The profile a node sent; a value of the wrong type or out of range is a BadMessage."""
        record = ConfigRecord(dict(record))
        budget = wire.number(record, BUDGET_KEY, low=1, high=1e9) if BUDGET_KEY in record else None
        layers = wire.integer(record, LAYERS_KEY, low=1, high=100_000) if LAYERS_KEY in record else None
        return cls(budget, layers)


def _lists(fleet: FleetSettings) -> tuple[tuple[str, tuple], ...]:
    return (BUDGET_KEY, fleet.memory_budget_mb), (LAYERS_KEY, fleet.emulator_layers)


def node_profile(node_config: dict, fleet: FleetSettings) -> NodeProfile:
    """The node's own ``memory-budget-mb`` / ``emulator-layers``, else its entry in the run config's
    ``fleet.memory-budget-mb`` / ``fleet.emulator-layers`` lists (simulation: one per partition-id)."""
    values = {}
    for key, listed in _lists(fleet):
        if key in node_config:
            values[key] = float(node_config[key]) if key == BUDGET_KEY else int(node_config[key])
        elif listed:
            pid = int(node_config.get("partition-id", -1))
            if not 0 <= pid < len(listed):
                raise UserError(f"fleet.{key} names {len(listed)} value(s), one per simulated node by "
                                f"partition-id, but this node has partition-id {pid}: give one per node")
            values[key] = listed[pid]
    return NodeProfile.from_record(values)


def check_fleet(fleet: FleetSettings, num_nodes: int, cap: int | None) -> None:
    """Before a simulation starts: the ``fleet.*`` lists name one value per simulated node, and no forced
    emulator size exceeds ``cap``, the configured emulator's (None: not known before the model is split)."""
    for key, listed in _lists(fleet):
        if listed and len(listed) != num_nodes:
            raise UserError(f"fleet.{key} names {len(listed)} value(s) for {num_nodes} simulated nodes: "
                            "give one per node")
    if cap is not None and any(k > cap for k in fleet.emulator_layers):
        raise UserError(f"fleet.emulator-layers asks for {max(fleet.emulator_layers)} middle blocks, but the "
                        f"configured emulator (split.emulator-layers) has {cap}: the model owner gives out no "
                        "larger one")
