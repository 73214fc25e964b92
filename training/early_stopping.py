"""Early stopping on a metric that should increase (valid AUC), with patience."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EarlyStopping:
    """Tracks the best value; `should_stop` once `patience` epochs pass without improvement.

    With patience 0 the run stops at the first epoch that does not improve.
    """

    patience: int
    min_delta: float = 0.0
    best: float = float("-inf")
    best_epoch: int = -1
    bad_epochs: int = 0

    def update(self, value: float, epoch: int) -> bool:
        """Records one epoch's metric; returns True when it is a new best."""
        if value > self.best + self.min_delta:
            self.best, self.best_epoch, self.bad_epochs = value, epoch, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.bad_epochs > self.patience
