"""Optional experiment tracking: each round's metrics as TensorBoard scalars (``results.tensorboard = true``).

``tensorboard --logdir <results.dir>/tensorboard`` shows them while the run goes on.
"""
from __future__ import annotations

from pathlib import Path

TENSORBOARD_DIR = "tensorboard"


def round_scalars(record: dict) -> dict[str, float]:
    """TensorBoard tags and values of one round's record (metrics.jsonl line)."""
    scalars = {}
    for model, metrics in record["eval"].items():
        scalars[f"eval/{model}/acc"] = metrics["acc"]
        scalars[f"eval/{model}/acc_norm"] = metrics["acc_norm"]
    if clients := record.get("clients"):
        def mean(key):
            return sum(c[key] for c in clients) / len(clients)
        scalars.update({"train/loss": mean("train-loss"), "train/client_seconds": mean("train-seconds"),
                        "train/clients": len(clients), "train/lr": record["lr"],
                        "time/round_seconds": record["seconds"]})
    if traffic := record.get("communication"):
        for way in ("down", "up"):
            scalars[f"communication/MB_{way}"] = traffic[f"bytes_{way}"] / 1e6
            scalars[f"communication/MB_{way}_cumulative"] = traffic[f"cumulative_bytes_{way}"] / 1e6
        if "realign_bytes_down" in traffic:
            scalars["communication/realign_MB_down"] = traffic["realign_bytes_down"] / 1e6
    if realign := record.get("realign"):
        scalars["realign/owner_seconds"] = realign["seconds"]
        for k, r in realign["emulators"].items():  # fl_offsite.emulator.realign's record of emulator k
            scalars[f"realign/k{k}_error_before"] = r["error_before"]
            scalars[f"realign/k{k}_error_after"] = r["error_after"]
            if r["losses"]:
                scalars[f"realign/k{k}_last_loss"] = r["losses"][-1]
    if privacy := record.get("privacy"):
        scalars["privacy/epsilon"] = privacy["epsilon"]
    return scalars


class TensorBoardLog:
    """Writes rounds to ``folder``; a resumed run (``first_round`` > 0) drops any events of rounds it redoes."""

    def __init__(self, folder: str | Path, first_round: int = 0) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(folder), purge_step=first_round or None)

    def write(self, record: dict) -> None:
        for tag, value in round_scalars(record).items():
            self.writer.add_scalar(tag, value, global_step=record["round"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
