"""The ``method`` of a run, parsed once: what kind of run it is and what of the model trains."""
from __future__ import annotations

from dataclasses import dataclass

from fl_offsite.errors import UserError

OFFSITE, FEDAVG, ZERO_SHOT = "offsite", "fedavg", "zero-shot"

# name -> (kind, tuning); tuning: all | lora | bitfit | bottleneck (see fl_offsite.surgery.tuning)
METHODS: dict[str, tuple[str, str]] = {
    "offsite": (OFFSITE, "all"),
    "offsite-lora": (OFFSITE, "lora"),
    "offsite-bitfit": (OFFSITE, "bitfit"),
    "offsite-bottleneck": (OFFSITE, "bottleneck"),
    "fedavg-full": (FEDAVG, "all"),
    "fedavg-lora": (FEDAVG, "lora"),
    "zero-shot": (ZERO_SHOT, "all"),
}


@dataclass(frozen=True)
class Method:
    """``offsite``: clients tune the adapter inside the emulator; ``fedavg``: clients tune the full model;
    ``zero-shot``: nothing trains, the full model and the emulator are evaluated."""

    name: str
    kind: str  # offsite | fedavg | zero-shot
    tuning: str  # all | lora | bitfit | bottleneck

    @classmethod
    def parse(cls, name: str) -> Method:
        if name not in METHODS:
            raise UserError(f"method = {name!r} is not one of {', '.join(METHODS)}")
        return cls(name, *METHODS[name])

    @property
    def trains(self) -> bool:
        return self.kind != ZERO_SHOT

    @property
    def tunes_adapter(self) -> bool:
        """Offsite-tuning: clients tune the adapter inside an emulator."""
        return self.kind == OFFSITE

    @property
    def trains_full_model(self) -> bool:
        """Clients hold and tune the full model (no split, no emulator)."""
        return self.kind == FEDAVG

    @property
    def uses_emulator(self) -> bool:
        """The model owner splits the model and builds an emulator (offsite-tuning, and zero-shot's baseline)."""
        return not self.trains_full_model
