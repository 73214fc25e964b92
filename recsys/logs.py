"""Logging for the project's entry points: our own progress at INFO, libraries from WARNING.

Each entry point (a CLI command, a Ray Train worker, the search task) configures the root
logger once. At INFO for everything, a training run printed dozens of lines of library
internals per worker before its first epoch (TorchRec's planner tables and per-table notes,
fbgemm_gpu's per-TBE argument dumps, which it logs on the root logger itself). The root logger
therefore stays at WARNING and only the project's packages log at INFO; library warnings and
errors still show, but for the few Python warnings and log lines of KNOWN_LIBRARY_WARNINGS and
KNOWN_LIBRARY_LOG_LINES.
"""

from __future__ import annotations

import logging
import warnings

PROJECT_LOGGERS = ("recsys", "training", "serving")
# Python warnings from inside the pinned libraries that a user cannot act on, each checked
# harmless here; every Ray Train worker printed them on every run. Any other warning shows.
KNOWN_LIBRARY_WARNINGS: tuple[tuple[type[Warning], str], ...] = (
    # TorchRec 1.8 wraps its dense part in DDP with broadcast_buffers=False (torch 2.13
    # deprecates the argument; the behaviour is what the trainer wants)
    (FutureWarning, r"`broadcast_buffers` is deprecated"),
    # TorchRec 1.8's sharded tables are ShardedTensors in its state dict and checkpoints
    (FutureWarning, r"Please use DTensor instead and we are deprecating ShardedTensor"),
    # replicated tables run fbgemm's dense kernel, whose backward is an autograd.Function;
    # tests/training/test_sharding.py checks its gradients against the plain model's
    (UserWarning, r"fbgemm::dense_embedding_codegen_lookup_function: an autograd kernel"),
)

# Library log lines that every Ray Train worker printed on every run and that say nothing
# about this project's use (logger name, start of the message). Other lines of these loggers
# still show.
KNOWN_LIBRARY_LOG_LINES: tuple[tuple[str, str], ...] = (
    # TorchRec's planner, on the root logger, for every replicated (data-parallel) table: such
    # tables have no sharding spec by design
    ("root", "Sharding spec not found for "),
    # TorchRec, for every replicated table: there are no caching options to ignore
    ("torchrec.distributed.utils", "Sharding Type is data_parallel, caching params will be"),
    # torch, once per process, about an API TorchRec calls
    ("torch.fx._symbolic_trace", "is_fx_tracing will return true for both"),
)


class _DropKnownLines(logging.Filter):
    """Drops the records of one logger whose message starts with one of `prefixes`."""

    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


_LINE_FILTERS = {
    name: _DropKnownLines(tuple(p for n, p in KNOWN_LIBRARY_LOG_LINES if n == name))
    for name in dict.fromkeys(n for n, _ in KNOWN_LIBRARY_LOG_LINES)
}


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
    for category, message in KNOWN_LIBRARY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name, line_filter in _LINE_FILTERS.items():  # a logger keeps one copy of a filter
        logging.getLogger(None if name == "root" else name).addFilter(line_filter)
