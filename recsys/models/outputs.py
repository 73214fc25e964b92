"""ModelOutput and the CTRModel base: what every model's forward returns and serves.

`forward(features) -> ModelOutput` holds logits (pre-sigmoid) of the tasks the model trains;
`CTRModel.probabilities(output)` turns them into the probabilities of every task it serves
(ESMM derives `ctcvr` there). The loss lives outside forward, so serving equals training.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field

import torch
import torch.utils._pytree as pytree
from torch import nn
from torch.nn import functional as F

from recsys.features.batch import Features


@dataclass
class ModelOutput:
    """Logits (B,) per trained task, plus optional named extras (attention maps, routing)."""

    logits: dict[str, torch.Tensor]
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


# DMP wraps the dense part in DDP with static_graph=True, which finds the output's tensors by
# pytree flattening on the first step; an unregistered dataclass hides them, DDP then never
# all-reduces the dense gradients and the replicas drift apart silently.
pytree.register_dataclass(ModelOutput)


class CTRModel(nn.Module, abc.ABC):
    """Base of every registered model.

    Subclasses set `trained_tasks` (the keys of `ModelOutput.logits`) and, if they serve
    derived tasks, override `served_tasks` and `probabilities`.
    """

    trained_tasks: tuple[str, ...] = ("ctr",)

    @property
    def served_tasks(self) -> tuple[str, ...]:
        return self.trained_tasks

    @abc.abstractmethod
    def forward(self, features: Features) -> ModelOutput:
        """Logits of every trained task for the rows of `features` (no labels, no loss)."""

    def loss(self, output: ModelOutput, labels: dict[str, torch.Tensor]) -> torch.Tensor:
        """Training loss: mean binary cross-entropy of each trained task, summed over tasks.

        Models with a structured objective (ESMM's entire-space loss) override this.
        """
        return sum(
            (
                F.binary_cross_entropy_with_logits(output.logits[t], labels[t])
                for t in self.trained_tasks
            ),
            start=torch.zeros(()),
        )

    def probabilities(self, output: ModelOutput) -> dict[str, torch.Tensor]:
        """Probabilities (B,) of every served task."""
        return {task: torch.sigmoid(logit) for task, logit in output.logits.items()}
