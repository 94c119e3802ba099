"""The data owner's Flower ClientApp: receive the model once, train what travels each round.

Importing it loads neither torch nor transformers: SuperNode starts a process per message, and the
profile and status queries answer without them; training imports them (fl_offsite.app.client_training).
"""
from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable

import psutil
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM  # internal: no public name for this key

from fl_offsite.app import wire
from fl_offsite.app.node_store import node_store
from fl_offsite.app.profile import node_profile
from fl_offsite.config.settings import Settings
from fl_offsite.logs import log_to_console

log = logging.getLogger(__name__)


def dp_clipping(msg: Message, context: Context, call_next) -> Message:
    """Flower's ``fixedclipping_mod`` on the training messages of a differentially private run."""
    if msg.metadata.message_type == MessageType.TRAIN and KEY_CLIPPING_NORM in msg.content["config"]:
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


app = ClientApp(mods=[dp_clipping])
Handler = Callable[[Message, Context], Message]


def details_stay_on_the_node(what: str) -> Callable[[Handler], Handler]:
    """A handler whose failures reach the model owner only as texts written for it (``wire.BadMessage``,
    ``wire.SharedError``: keys and counts) or as ``what`` failed and the error's type: Flower sends the owner
    ``str(exception)``, which may quote a local path or a row. The whole error goes to the node's log."""
    def wrap(handler: Handler) -> Handler:
        @functools.wraps(handler)
        def guarded(msg: Message, context: Context) -> Message:
            try:
                return handler(msg, context)
            except (wire.BadMessage, wire.SharedError):
                raise
            except Exception as err:  # noqa: BLE001 - its text may quote private data
                log.exception("node %s: %s failed", context.node_id, what)
                raise RuntimeError(f"{what} failed on node {context.node_id} ({type(err).__name__}); the details "
                                   "stay in the node's log") from None
        return guarded
    return wrap


@app.query("node_profile")
@details_stay_on_the_node("the profile query")
def report_profile(msg: Message, context: Context) -> Message:
    profile = node_profile(context.node_config, Settings.from_config(dict(context.run_config)).fleet)
    return Message(RecordDict({"profile": ConfigRecord(dict(profile.to_record()))}), reply_to=msg)


@app.query("model_status")
@details_stay_on_the_node("model status")
def model_status(msg: Message, context: Context) -> Message:
    store = node_store(context.node_config, context.node_id)
    has = store.has(wire.text(wire.config_record(msg, "model"), "digest", pattern=wire.DIGEST))
    return Message(RecordDict({"model": ConfigRecord({"has": has})}), reply_to=msg)


@app.query("model")
@details_stay_on_the_node("model delivery")
def receive_model(msg: Message, context: Context) -> Message:
    store = node_store(context.node_config, context.node_id)
    folder = store.store(msg)
    log.info("node %s cached the delivered model in %s", context.node_id, folder)
    return Message(RecordDict({"model": ConfigRecord({"has": True})}), reply_to=msg)


@app.train()
@details_stay_on_the_node("training")
def train(msg: Message, context: Context) -> Message:
    log_to_console()
    reached = time.time() - psutil.Process().create_time()
    started = time.perf_counter()
    from fl_offsite.app.client_training import train_round  # torch and transformers: only for training

    log.info("node %s: the training message reached its handler %.1f s after its process started; imports took "
             "%.1f s", context.node_id, reached, time.perf_counter() - started)
    return train_round(msg, context)
