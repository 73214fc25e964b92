"""Logging for the project's entry points: our own progress at INFO, libraries from WARNING.

Each entry point (a CLI command, a Ray Train worker, the search task) configures the root
logger once. At INFO for everything, a training run printed dozens of lines of library
internals per worker before its first epoch (TorchRec's planner tables and per-table notes,
fbgemm_gpu's per-TBE argument dumps, which it logs on the root logger itself). The root logger
therefore stays at WARNING and only the project's packages log at INFO; library warnings and
errors still show.
"""

from __future__ import annotations

import logging

PROJECT_LOGGERS = ("recsys", "training", "serving")


def configure_logging(fmt: str, level: int = logging.INFO, *, force: bool = False) -> None:
    """Root handler with `fmt`; the project's loggers at `level`, everything else at WARNING
    (or `level` when that is higher). `force` replaces handlers an earlier setup installed (a
    Ray worker process inherits Ray's)."""
    logging.basicConfig(format=fmt, force=force)
    quiet_libraries(level)


def quiet_libraries(level: int = logging.INFO) -> None:
    """The levels of `configure_logging` without touching handlers (a Ray Train worker that
    does not report keeps Ray Train's handlers). A Ray Train worker calls it before importing
    TorchRec, whose fbgemm_gpu logs its library loads at INFO on import (training/worker.py)."""
    logging.getLogger().setLevel(max(level, logging.WARNING))
    for name in PROJECT_LOGGERS:
        logging.getLogger(name).setLevel(level)
