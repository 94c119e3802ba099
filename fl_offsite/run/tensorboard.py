"""Optional experiment tracking: each round's metrics as TensorBoard scalars (``results.tensorboard = true``).

``tensorboard --logdir <results.dir>/tensorboard`` shows them while the run goes on.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from fl_offsite.errors import UserError
from fl_offsite.run.records import RoundRecord
from fl_offsite.run.tables import mean


def require_tensorboard() -> None:
    """A UserError saying how to install TensorBoard, an optional dependency, when it is missing."""
    if importlib.util.find_spec("tensorboard") is None:
        raise UserError("results.tensorboard = true needs TensorBoard: pip install 'fl-offsite[tensorboard]' "
                        "(or pip install tensorboard), or set results.tensorboard = false")


def round_scalars(record: RoundRecord) -> dict[str, float]:
    """TensorBoard tags and values of one round's record: every part it has (a part absent, no tags)."""
    scalars: dict[str, float | None] = {}
    for model, metrics in record.scores.items():
        scalars[f"eval/{model}/acc"] = metrics["acc"]
        scalars[f"eval/{model}/acc_norm"] = metrics["acc_norm"]
    if clients := record.clients:
        scalars.update({"train/loss": mean(clients, "train_loss"), "train/clients": len(clients),
                        "train/client_seconds": mean(clients, "train_seconds")})
    scalars.update({"train/lr": record.lr, "time/round_seconds": record.seconds})
    if traffic := record.traffic:
        for way, now, so_far in (("down", traffic.bytes_down, traffic.cumulative_bytes_down),
                                 ("up", traffic.bytes_up, traffic.cumulative_bytes_up)):
            scalars.update({f"communication/MB_{way}": now / 1e6, f"communication/MB_{way}_cumulative": so_far / 1e6})
        if traffic.realign_bytes_down is not None:
            scalars["communication/realign_MB_down"] = traffic.realign_bytes_down / 1e6
    if realign := record.realign:
        scalars["realign/owner_seconds"] = realign.seconds
        for k, r in realign.emulators.items():
            scalars.update({f"realign/k{k}_error_before": r.error_before, f"realign/k{k}_error_after": r.error_after,
                            f"realign/k{k}_last_loss": r.losses[-1] if r.losses else None})
    if privacy := record.privacy:
        scalars["privacy/epsilon"] = privacy.epsilon
    return {tag: value for tag, value in scalars.items() if value is not None}


class TensorBoardLog:
    """Writes rounds to ``folder``; a resumed run (``first_round`` > 0) drops any events of rounds it redoes."""

    def __init__(self, folder: str | Path, first_round: int = 0) -> None:
        require_tensorboard()
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(folder), purge_step=first_round or None)

    def write(self, record: RoundRecord) -> None:
        for tag, value in round_scalars(record).items():
            self.writer.add_scalar(tag, value, global_step=record.round)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
