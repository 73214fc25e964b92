"""The model registry: name -> (model class, config class). Explicit, greppable, no magic."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from pydantic import BaseModel, Field

from recsys.errors import ConfigError
from recsys.features.schema import FeatureSchema
from recsys.models.adaptdhm import AdaptDHM, AdaptDHMConfig
from recsys.models.armnet import ARMNet, ARMNetConfig
from recsys.models.autoint import AutoInt, AutoIntConfig
from recsys.models.esmm import ESMM, ESMMConfig
from recsys.models.multidomain import (
    PerDomainTowers,
    PerDomainTowersConfig,
    SharedBottom,
    SharedBottomConfig,
)
from recsys.models.outputs import CTRModel


@dataclass(frozen=True)
class ModelSpec:
    model_class: type[CTRModel]
    config_class: type[BaseModel]


MODELS: dict[str, ModelSpec] = {
    "autoint": ModelSpec(AutoInt, AutoIntConfig),
    "armnet": ModelSpec(ARMNet, ARMNetConfig),
    "esmm": ModelSpec(ESMM, ESMMConfig),
    "adaptdhm": ModelSpec(AdaptDHM, AdaptDHMConfig),
    "shared_bottom": ModelSpec(SharedBottom, SharedBottomConfig),
    "per_domain_towers": ModelSpec(PerDomainTowers, PerDomainTowersConfig),
}

# The union of model configs, discriminated by their `name` field (used by ExperimentConfig):
# a YAML `model:` block is validated against the config class its `name` selects.
ModelConfig = Annotated[
    AutoIntConfig
    | ARMNetConfig
    | ESMMConfig
    | AdaptDHMConfig
    | SharedBottomConfig
    | PerDomainTowersConfig,
    Field(discriminator="name"),
]


def model_spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise ConfigError(f"model: unknown model '{name}' (expected one of {sorted(MODELS)})")
    return MODELS[name]


def build_model(config: BaseModel, embedding: object, schema: FeatureSchema) -> CTRModel:
    """Builds the registered model named by `config.name` around an injected embedding."""
    spec = model_spec(config.name)  # type: ignore[attr-defined]
    return spec.model_class(config, embedding, schema)  # type: ignore[call-arg]
