"""Checks run before a simulation starts, so that a config that cannot work fails in one line, not in Ray."""
from __future__ import annotations

import os

from fl_offsite.config.method import OFFSITE
from fl_offsite.config.settings import Settings
from fl_offsite.errors import UserError


def check_runnable(settings: Settings, num_clients: int) -> None:
    """The model resolves, the split fits it, the owner's corpus is not the task's own text and its files are
    served, the task loads, every client's partition is non-empty and the ``fleet.*`` lists name one value per
    client."""
    from transformers import AutoConfig

    from fl_offsite.app.profile import check_fleet
    from fl_offsite.data.corpora import check_public, corpus_composition
    from fl_offsite.data.models import resolve_model_path
    from fl_offsite.data.partition import partition_indices
    from fl_offsite.data.tasks import load_task
    from fl_offsite.run.tensorboard import require_tensorboard

    check_fleet(settings.fleet, num_clients, settings.emulator.emulator_layers)
    if settings.results.tensorboard:
        require_tensorboard()

    path = resolve_model_path(settings.model)
    try:
        model_config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        where = "folder" if os.path.isdir(path) else "hub id (or the hub is unreachable)"
        raise UserError(f"model {settings.model!r}: not a loadable {where}: {str(err).splitlines()[0]}") from err
    layers = getattr(model_config, "num_hidden_layers", None)
    recipe = settings.emulator
    offsite = settings.method.kind == OFFSITE  # zero-shot's split is checked by the owner
    if offsite and layers is not None:
        bottom, top = recipe.adapter_bottom, recipe.adapter_top
        k = recipe.emulator_layers or 0  # None with a drop ratio
        if bottom + top + k > layers:
            raise UserError(f"split {bottom},{k},{top} needs {bottom + top + k} blocks but {settings.model} has "
                            f"{layers}: lower split.adapter-layers or split.emulator-layers")
    if offsite and recipe.uses_corpus:
        check_public(recipe.corpus, settings.task, recipe.public_in_domain)
        corpus_composition(recipe.corpus, settings.task)  # downloads its files here: a missing one fails in one line
    labels = load_task(settings.task, seed=settings.seed).labels("train")
    for partition in range(num_clients):
        if not partition_indices(labels, num_clients, partition, settings.data.partitioner, settings.data.alpha,
                                 settings.seed):
            raise UserError(f"partition {partition} of {num_clients} is empty: use fewer clients")
