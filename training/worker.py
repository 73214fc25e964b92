"""The function Ray Train ships to each worker: the log levels first, then the training loop.

Importing `training.loop` imports TorchRec and with it fbgemm_gpu, which logs an INFO line on
the root logger for each native library it loads (14 per process). On a Ray Train worker the
root logger is already at INFO by then (Ray Train configures it before the function runs), so
shipping `training.loop.train_loop_per_worker` itself put those lines on every worker's console.
This module imports nothing heavy at the top, so unpickling the function on a worker imports no
TorchRec; the levels are set before the loop's module is imported.
"""

from __future__ import annotations

from typing import Any


def train_loop_entry(config: dict[str, Any]) -> None:
    """Sets recsys/logs.py's levels, then runs `training.loop.train_loop_per_worker`."""
    from recsys.logs import quiet_libraries

    quiet_libraries()
    from training.loop import train_loop_per_worker

    train_loop_per_worker(config)
