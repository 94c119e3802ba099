"""Logging set-up for the processes Flower starts."""
from __future__ import annotations

import logging

PROJECT_LOGGERS = ("fl_offsite", "strategies")


def log_to_console() -> None:
    """Show the project's INFO logs in processes Flower starts (they configure only Flower's logger)."""
    for name in PROJECT_LOGGERS:
        logger = logging.getLogger(name)
        if logger.handlers:
            continue
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
