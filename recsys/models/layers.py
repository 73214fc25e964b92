"""Dense blocks shared by more than one model: a plain MLP and grouped (per-cluster or
per-domain) towers evaluated in one batched pass.

Used by the multi-domain family: AdaptDHM (`adaptdhm.py`, towers per learned cluster) and its
baselines SharedBottom and PerDomainTowers (`multidomain.py`). Blocks live here only when a
second model needs them unchanged (STYLE.md section 4).
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import nn
from torch.nn import functional as F

from recsys.embeddings.per_feature import FieldEmbedding
from recsys.errors import ConfigError
from recsys.features.schema import FeatureSchema


def build_mlp(
    in_dim: int, hidden_units: tuple[int, ...], dropout: float, out_dim: int | None = None
) -> nn.Sequential:
    """[Linear -> ReLU -> Dropout] per hidden width, then a final Linear to `out_dim` if given.

    With no hidden widths and no `out_dim` it is the identity (an empty Sequential).
    """
    blocks: list[nn.Module] = []
    for width in hidden_units:
        blocks += [nn.Linear(in_dim, width), nn.ReLU(), nn.Dropout(dropout)]
        in_dim = width
    if out_dim is not None:
        blocks.append(nn.Linear(in_dim, out_dim))
    return nn.Sequential(*blocks)


def mlp_output_dim(in_dim: int, hidden_units: tuple[int, ...]) -> int:
    """Width of `build_mlp(in_dim, hidden_units, ...)` without an output layer."""
    return hidden_units[-1] if hidden_units else in_dim


def tower_dims(in_dim: int, hidden_units: tuple[int, ...]) -> list[tuple[int, int]]:
    """(in, out) of every layer of a tower with these hidden widths and a 1-wide output."""
    dims = [in_dim, *hidden_units, 1]
    return list(itertools.pairwise(dims))


def linear_init_(weight: torch.Tensor, bias: torch.Tensor) -> None:
    """nn.Linear's default init, U(-1/sqrt(in), 1/sqrt(in)) for weight (..., out, in) and bias."""
    bound = 1.0 / math.sqrt(weight.shape[-1])
    nn.init.uniform_(weight, -bound, bound)
    nn.init.uniform_(bias, -bound, bound)


def grouped_tower_logits(
    x: torch.Tensor,
    weights: list[torch.Tensor],
    biases: list[torch.Tensor],
    dropout: float,
    training: bool,
) -> torch.Tensor:
    """Runs all G towers on every row: ReLU (and dropout) between layers, a logit at the end.

    Every row goes through every tower (G times one tower's cost) so the whole batch is a few
    einsums; the caller gathers each row's own tower. A tower gets exactly zero gradient from
    rows whose logit is not gathered.

    Shapes: x (B, in), weights[l] (G, out_l, in_l), biases[l] (G, out_l) -> logits (B, G).
    """
    hidden = x.unsqueeze(1).expand(-1, weights[0].shape[0], -1)  # (B, G, in)
    for index, (weight, bias) in enumerate(zip(weights, biases, strict=True)):
        hidden = torch.einsum("bgi,goi->bgo", hidden, weight) + bias  # (B, G, out_l)
        if index < len(weights) - 1:
            hidden = F.dropout(torch.relu(hidden), dropout, training)
    return hidden.squeeze(-1)  # (B, G)


def check_ctr_inputs(where: str, embedding: FieldEmbedding, schema: FeatureSchema) -> None:
    """The embedding covers the schema's fields and the schema trains the task "ctr".

    Raises:
        ConfigError: naming `where` and the mismatch.
    """
    if embedding.num_fields != schema.num_fields:
        raise ConfigError(
            f"{where}: the embedding gives {embedding.num_fields} fields (expected "
            f"{schema.num_fields}, the schema's sparse + dense features); build it from this "
            f"schema"
        )
    if "ctr" not in schema.tasks:
        raise ConfigError(
            f"{where}: trains the task 'ctr' (got schema tasks {list(schema.tasks)}); "
            f"set `task: ctr` on the click label"
        )
