"""Multi-domain baselines for AdaptDHM: one shared network, and one tower per known domain.

Data flow (both): Features -> injected field embedding (B, F, D) -> flatten (B, F*D) -> shared
bottom MLP (B, H) -> a tower -> the "ctr" logit. `SharedBottom` has a single tower (no domain
knowledge); `PerDomainTowers` scores each row with the tower of its domain id
(`Features.domain`), the prior-knowledge grouping AdaptDHM replaces with learned clusters. The
registry maps "shared_bottom" and "per_domain_towers" to these configs and models.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from recsys.embeddings.per_feature import FieldEmbedding
from recsys.errors import ConfigError, SchemaError
from recsys.features.batch import Features
from recsys.features.schema import FeatureSchema
from recsys.models.layers import (
    build_mlp,
    check_ctr_inputs,
    grouped_tower_logits,
    linear_init_,
    mlp_output_dim,
    tower_dims,
)
from recsys.models.outputs import CTRModel, ModelOutput


class SharedBottomConfig(BaseModel):
    """Hyperparameters of SharedBottom (the registry key is `name`).

    Args:
        name: registry discriminator, always "shared_bottom".
        bottom_hidden_units: widths of the shared bottom MLP on the flattened embeddings.
        tower_hidden_units: hidden widths of the tower (a final layer gives the logit).
        dropout: dropout rate after every hidden layer, in [0, 1).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: Literal["shared_bottom"] = "shared_bottom"
    bottom_hidden_units: tuple[Annotated[int, Field(ge=1)], ...] = (128,)
    tower_hidden_units: tuple[Annotated[int, Field(ge=1)], ...] = (64, 64)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)


class PerDomainTowersConfig(BaseModel):
    """Hyperparameters of PerDomainTowers (the registry key is `name`).

    Args:
        name: registry discriminator, always "per_domain_towers".
        bottom_hidden_units: widths of the shared bottom MLP on the flattened embeddings.
        tower_hidden_units: hidden widths of every domain tower (a final layer gives the logit).
        dropout: dropout rate after every hidden layer, in [0, 1).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: Literal["per_domain_towers"] = "per_domain_towers"
    bottom_hidden_units: tuple[Annotated[int, Field(ge=1)], ...] = (128,)
    tower_hidden_units: tuple[Annotated[int, Field(ge=1)], ...] = (64, 64)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)


class SharedBottom(CTRModel):
    """Shared-Bottom: one MLP for every domain (the multi-domain lower baseline).

    Not a paper model: the standard "one model for all domains" baseline of multi-domain CTR
    papers (STAR, AdaptDHM). Domain ids are ignored (the domain may still be an input feature).

    Differences from the paper: none to list; this is a plain MLP on the flattened embeddings,
    split into a bottom and a tower only to mirror the multi-domain models' layout.

    Shapes: Features with B rows and F fields of width D -> `ModelOutput(logits={"ctr": (B,)})`.

    Args:
        config: the model hyperparameters.
        embedding: the field embedding, built outside; must give schema.num_fields fields.
        schema: the fitted feature schema; its labels must train the task "ctr".

    Raises:
        ConfigError: the embedding's field count differs from the schema's, or the schema has
            no "ctr" task.

    Example:
        >>> import pyarrow as pa
        >>> from recsys.data.schema import DatasetSchema
        >>> from recsys.embeddings import EmbeddingConfig, build_embedding
        >>> from recsys.features.batch import features_from_rows
        >>> from recsys.features.schema import fit_feature_schema
        >>> dataset = DatasetSchema.model_validate({"name": "toy", "columns": [
        ...     {"name": "user_id", "role": "categorical"},
        ...     {"name": "click", "role": "label", "task": "ctr"}]})
        >>> schema = fit_feature_schema(dataset, [pa.table({"user_id": ["u1"], "click": [1]})])
        >>> config = SharedBottomConfig(bottom_hidden_units=(8,), tower_hidden_units=(4,))
        >>> model = SharedBottom(config, build_embedding(schema, EmbeddingConfig(dim=4)), schema)
        >>> model(features_from_rows(schema, [{"user_id": "u1"}])).logits["ctr"].shape
        torch.Size([1])
    """

    def __init__(
        self, config: SharedBottomConfig, embedding: FieldEmbedding, schema: FeatureSchema
    ) -> None:
        super().__init__()
        check_ctr_inputs("model.shared_bottom", embedding, schema)
        self.config = config
        self.embedding = embedding
        flat_dim = schema.num_fields * embedding.dim
        self.bottom = build_mlp(flat_dim, config.bottom_hidden_units, config.dropout)
        hidden_dim = mlp_output_dim(flat_dim, config.bottom_hidden_units)
        self.tower = build_mlp(hidden_dim, config.tower_hidden_units, config.dropout, out_dim=1)

    def forward(self, features: Features) -> ModelOutput:
        flat = self.embedding(features).flatten(start_dim=1)  # (B, F, D) -> (B, F*D)
        logits = self.tower(self.bottom(flat)).squeeze(-1)  # (B, H) -> (B,)
        return ModelOutput(logits={"ctr": logits})


class _DomainTowers(nn.Module):
    """G independent MLP towers (nn.Linear init each), stacked so all run in one batched pass.

    Shapes: hidden (B, H) -> logits (B, G), one per tower.
    """

    def __init__(
        self, num_towers: int, in_dim: int, hidden_units: tuple[int, ...], dropout: float
    ) -> None:
        super().__init__()
        self.dropout = dropout
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for layer_in, layer_out in tower_dims(in_dim, hidden_units):
            weight = torch.empty(num_towers, layer_out, layer_in)
            bias = torch.empty(num_towers, layer_out)
            linear_init_(weight, bias)
            self.weights.append(nn.Parameter(weight))
            self.biases.append(nn.Parameter(bias))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return grouped_tower_logits(
            hidden, list(self.weights), list(self.biases), self.dropout, self.training
        )


class PerDomainTowers(CTRModel):
    """Shared bottom plus one tower per domain; each row is scored by its own domain's tower.

    Not a paper model: the "one network per domain on a shared bottom" baseline that AdaptDHM
    (arXiv:2211.12105) argues against, since its cost grows with the number of domains and
    small domains train their towers on few rows.

    Differences from the paper: none to list. Towers cover domain ids 0..num_domains-1, where
    0 is the unseen-domain id; its tower trains only on training rows whose domain is out of
    vocabulary (rare values under the domain column's `min_count`), otherwise it keeps its init.

    Shapes: Features with B rows, F fields of width D and domain ids (B,) ->
    `ModelOutput(logits={"ctr": (B,)})`. All G towers run on every row (G times one tower's
    cost) and each row keeps its own tower's logit, so a tower gets no gradient from rows of
    other domains.

    Args:
        config: the model hyperparameters.
        embedding: the field embedding, built outside; must give schema.num_fields fields.
        schema: the fitted feature schema; must name a domain column and train "ctr".

    Raises:
        ConfigError: the schema has no domain column or no "ctr" task, or the embedding's
            field count differs from the schema's.

    Example:
        >>> import pyarrow as pa
        >>> from recsys.data.schema import DatasetSchema
        >>> from recsys.embeddings import EmbeddingConfig, build_embedding
        >>> from recsys.features.batch import features_from_rows
        >>> from recsys.features.schema import fit_feature_schema
        >>> dataset = DatasetSchema.model_validate({"name": "toy", "domain": "site", "columns": [
        ...     {"name": "user_id", "role": "categorical"},
        ...     {"name": "site", "role": "categorical"},
        ...     {"name": "click", "role": "label", "task": "ctr"}]})
        >>> rows = pa.table({"user_id": ["u1", "u2"], "site": ["a", "b"], "click": [1, 0]})
        >>> schema = fit_feature_schema(dataset, [rows])
        >>> config = PerDomainTowersConfig(bottom_hidden_units=(8,), tower_hidden_units=(4,))
        >>> model = PerDomainTowers(config, build_embedding(schema, EmbeddingConfig(dim=4)),
        ...                         schema)
        >>> len(model.towers.weights[0])  # domains: unseen, a, b
        3
        >>> model(features_from_rows(schema, [{"user_id": "u1", "site": "b"}])).logits["ctr"].shape
        torch.Size([1])
    """

    def __init__(
        self, config: PerDomainTowersConfig, embedding: FieldEmbedding, schema: FeatureSchema
    ) -> None:
        super().__init__()
        check_ctr_inputs("model.per_domain_towers", embedding, schema)
        if schema.num_domains == 0:
            raise ConfigError(
                f"model.per_domain_towers: needs a domain column (got dataset "
                f"'{schema.dataset.name}' with domain=None); set `domain:` in the dataset schema "
                f"or use shared_bottom"
            )
        self.config = config
        self.embedding = embedding
        self.num_domains = schema.num_domains
        flat_dim = schema.num_fields * embedding.dim
        self.bottom = build_mlp(flat_dim, config.bottom_hidden_units, config.dropout)
        hidden_dim = mlp_output_dim(flat_dim, config.bottom_hidden_units)
        self.towers = _DomainTowers(
            schema.num_domains, hidden_dim, config.tower_hidden_units, config.dropout
        )

    def forward(self, features: Features) -> ModelOutput:
        if features.domain is None:
            raise SchemaError(
                "features: no domain ids (expected a (B,) tensor, the model routes rows by "
                "domain); build Features with the schema that names the domain column"
            )
        flat = self.embedding(features).flatten(start_dim=1)  # (B, F, D) -> (B, F*D)
        tower_logits = self.towers(self.bottom(flat))  # (B, G)
        logits = tower_logits.gather(1, features.domain.unsqueeze(1)).squeeze(1)  # (B,)
        return ModelOutput(logits={"ctr": logits})
