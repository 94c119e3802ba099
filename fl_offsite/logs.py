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


def clock_time(seconds: float) -> str:
    """``seconds`` as m:ss (h:mm:ss from an hour)."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
