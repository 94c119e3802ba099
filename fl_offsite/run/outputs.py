"""A run's outputs in the forms Hugging Face users load: final weights with the run in their metadata,
a model card, the PEFT folder of LoRA runs (after every round), and TensorBoard scalars."""
from __future__ import annotations

import json
import logging
import time

import torch
from peft import PeftModel

from fl_offsite.app.owner import ModelOwner, final_weights
from fl_offsite.data.models import describe_base_model
from fl_offsite.files import write_atomic
from fl_offsite.logs import clock_time
from fl_offsite.run.card import model_card, run_record, usage
from fl_offsite.run.folder import LORA, AfterRound, RunFolder
from fl_offsite.run.records import RoundRecord
from fl_offsite.run.tensorboard import TensorBoardLog
from fl_offsite.surgery.lora import save_peft_folder
from fl_offsite.surgery.split import RUN_METADATA, save_adapter
from fl_offsite.weights import save_tensors

log = logging.getLogger(__name__)


def after_round(owner: ModelOwner, run: RunFolder, num_clients: int,
                tracker: TensorBoardLog | None) -> AfterRound:
    """After each round's record: a progress line, its TensorBoard scalars, and for LoRA the PEFT folder of
    this round."""
    clock = RoundClock(owner.settings.num_rounds)

    def after(record: RoundRecord, payload: dict[str, torch.Tensor]) -> None:
        clock.tick(record.round)
        if tracker is not None:
            tracker.write(record)
        if record.round > 0 and isinstance(owner.model, PeftModel):
            owner.load_payload(owner.model, payload)
            summary = run_record(owner.settings, owner.plan, record, num_clients, run.distillation())
            card = model_card(owner.settings.model, owner.plan, summary,
                              usage("peft", owner.model_path or owner.settings.model, str(run.peft)), peft=True)
            save_peft_folder(owner.model, run.peft, card, describe_base_model(owner.settings.model).hub_id)
    return after


class RoundClock:
    """Logs, after each round, the run's elapsed time and what is left at the mean pace so far."""

    def __init__(self, num_rounds: int) -> None:
        self.num_rounds = num_rounds
        self.start: tuple[int, float] | None = None  # the first round seen (0, or the last one before a resume)

    def tick(self, rnd: int) -> None:
        now = time.perf_counter()
        if self.start is None:
            self.start = rnd, now
            return
        first, began = self.start
        per_round = (now - began) / max(1, rnd - first)
        log.info("round %d/%d done: %s since round %d, about %s left", rnd, self.num_rounds,
                 clock_time(now - began), first, clock_time(per_round * (self.num_rounds - rnd)))


def save_final(owner: ModelOwner, run: RunFolder, payload: dict[str, torch.Tensor], num_clients: int) -> None:
    """The final weights, with the run's record in their metadata, and the run's model card (README.md)."""
    summary = run_record(owner.settings, owner.plan, run.rounds()[-1], num_clients, run.distillation())
    name, final = final_weights(owner, payload)  # merges LoRA into the model: after the last PEFT folder
    if owner.plan:
        save_adapter(run.weights(name), final, owner.plan, run=summary)
    else:
        save_tensors(run.weights(name), final, metadata={RUN_METADATA: json.dumps(summary)})
    weights = "peft" if name == LORA else name
    path = str(run.peft if weights == "peft" else run.weights(name))
    card = model_card(owner.settings.model, owner.plan, summary,
                      usage(weights, owner.model_path or owner.settings.model, path), peft=weights == "peft")
    write_atomic(run.card, card)
