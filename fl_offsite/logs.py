"""Logging set-up for the processes Flower starts."""
from __future__ import annotations

import logging


def log_to_console() -> None:
    """Show fl_offsite's INFO logs in processes Flower starts (they configure only Flower's logger)."""
    logger = logging.getLogger("fl_offsite")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
