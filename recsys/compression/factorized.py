"""Two-factor linear layers and the rewrite of a built model into them.

A trained `nn.Linear` (W: out x in, bias b) becomes `FactorizedLinear`: a k x in layer A then
an out x k layer B (optionally an activation between them). `recsys compress` computes the
factors (recsys/compression/lowrank.py); this module only knows their shapes, so that
`load_artifact` can rebuild a compressed model from the JSON description stored in the
artifact's config.json before loading its weights. Depends on torch only.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import nn

from recsys.errors import ConfigError

Activation = Literal["relu"]
_ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU}


class FactorizedLinear(nn.Module):
    """`y = B(act(A x))`: a rank-k replacement of an `in -> out` linear layer.

    With the activation-PCA factors of METHODS.md §8(b) (U: out x k, the top-k principal
    directions of the original layer's output y = W x + b, and mu its mean):
        A: W_A = U^T W (k x in),  b_A = U^T b   (no bias when the original had none)
        B: W_B = U (out x k),     b_B = (I - U U^T) mu
    so `y_hat = U U^T (y - mu) + mu`, the projection of y onto its principal subspace through
    its mean. At k = out it reproduces the original layer exactly. The original nonlinearity
    stays after B (it is outside this module).

    Paper: Yu et al., "Unified Low-rank Compression Framework for Click-through Rate
    Prediction" (Atomic Feature Mimicking), KDD 2024 ADS, arXiv:2405.18146.

    Differences from the paper:
        - The optional activation between A and B is the official code's `DNN_Ada_Act`
          variant; it is off by default because it breaks the exact reconstruction.

    Shapes: (..., in) -> (..., out); parameters k(in + out) + out (+ k with A's bias).

    Args:
        in_features: input width of the replaced layer.
        out_features: output width of the replaced layer.
        rank: k, the width between A and B; 1 <= k <= min(in, out) is the useful range.
        first_bias: whether A has a bias (the replaced layer had one).
        activation: an activation between A and B ("relu"), or None for the exact form.

    Example:
        >>> layer = FactorizedLinear(8, 6, rank=2)
        >>> layer(torch.zeros(3, 8)).shape, sum(p.numel() for p in layer.parameters())
        (torch.Size([3, 6]), 36)
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        first_bias: bool = True,
        activation: Activation | None = None,
    ) -> None:
        super().__init__()
        if rank < 1:
            raise ConfigError(f"compression: rank must be >= 1 (got {rank})")
        if activation is not None and activation not in _ACTIVATIONS:
            raise ConfigError(
                f"compression: unknown activation {activation!r} (expected one of "
                f"{sorted(_ACTIVATIONS)} or null)"
            )
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.activation_name = activation
        self.first = nn.Linear(in_features, rank, bias=first_bias)  # A
        self.activation = _ACTIVATIONS[activation]() if activation else None
        self.second = nn.Linear(rank, out_features, bias=True)  # B

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.first(x)  # (..., k)
        if self.activation is not None:
            hidden = self.activation(hidden)
        return self.second(hidden)  # (..., out)

    @classmethod
    def from_factors(
        cls,
        first_weight: torch.Tensor,
        first_bias: torch.Tensor | None,
        second_weight: torch.Tensor,
        second_bias: torch.Tensor,
        activation: Activation | None = None,
    ) -> FactorizedLinear:
        """A layer holding the given factors (copied, as float32 on the CPU).

        Shapes: first_weight (k, in), first_bias (k,) or None, second_weight (out, k),
        second_bias (out,).
        """
        rank, in_features = first_weight.shape
        layer = cls(
            in_features,
            second_weight.shape[0],
            rank,
            first_bias=first_bias is not None,
            activation=activation,
        )
        with torch.no_grad():
            layer.first.weight.copy_(first_weight)
            if first_bias is not None:
                assert layer.first.bias is not None
                layer.first.bias.copy_(first_bias)
            layer.second.weight.copy_(second_weight)
            layer.second.bias.copy_(second_bias)
        return layer

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"rank={self.rank}, activation={self.activation_name}"
        )


@dataclass(frozen=True)
class FactorizedLayerSpec:
    """How one named `nn.Linear` of a model is factorised (one entry of config.json's
    `compression.layers`).

    Args:
        name: the submodule's dotted name in the model (`layers.0.query`, `dnn.3`).
        in_features: its input width.
        out_features: its output width.
        rank: k.
        first_bias: whether A has a bias.
        activation: activation between A and B, or None.
    """

    name: str
    in_features: int
    out_features: int
    rank: int
    first_bias: bool = True
    activation: Activation | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> FactorizedLayerSpec:
        """Raises ConfigError naming the entry when a key is missing or unknown."""
        try:
            return cls(**raw)
        except TypeError as e:
            raise ConfigError(
                f"compression.layers: entry {raw!r} does not describe a factorised layer ({e}); "
                f"expected keys name, in_features, out_features, rank, first_bias, activation"
            ) from e

    @property
    def num_parameters(self) -> int:
        """k (in + out) weights, plus B's bias (out) and A's bias (k) when present."""
        k = self.rank
        return (
            k * (self.in_features + self.out_features)
            + self.out_features
            + (k if self.first_bias else 0)
        )


def factorize_modules(model: nn.Module, specs: Iterable[FactorizedLayerSpec]) -> nn.Module:
    """Replaces each named `nn.Linear` of `model` by a `FactorizedLinear` of the spec's shape,
    in place, and returns the model. The new layers hold fresh weights: load a state dict (or
    copy factors in) afterwards.

    Raises:
        ConfigError: a name that is not an `nn.Linear` of the model, or whose widths differ
            from the spec's (the description belongs to another model).
    """
    for spec in specs:
        try:
            module = model.get_submodule(spec.name)
        except AttributeError as e:
            raise ConfigError(
                f"compression: the model has no submodule '{spec.name}' (the compression "
                f"description does not match the model config)"
            ) from e
        if not isinstance(module, nn.Linear):
            raise ConfigError(
                f"compression: '{spec.name}' is a {type(module).__name__} (expected an "
                f"nn.Linear to factorise)"
            )
        if (module.in_features, module.out_features) != (spec.in_features, spec.out_features):
            raise ConfigError(
                f"compression: '{spec.name}' is {module.in_features} -> {module.out_features} "
                f"(expected {spec.in_features} -> {spec.out_features} as described)"
            )
        replace_module(
            model,
            spec.name,
            FactorizedLinear(
                spec.in_features,
                spec.out_features,
                spec.rank,
                first_bias=spec.first_bias,
                activation=spec.activation,
            ),
        )
    return model


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Sets the submodule at dotted `name` (`dnn.3`, `layers.0.query`) to `new`."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def apply_compression(model: nn.Module, description: dict[str, Any]) -> nn.Module:
    """Rebuilds the factorised layers a config.json `compression` entry lists (its `layers`
    key: a list of `FactorizedLayerSpec.to_json()` dicts); other keys are informational.

    Raises:
        ConfigError: the description is malformed or does not fit the model.
    """
    layers = description.get("layers")
    if not isinstance(layers, list):
        raise ConfigError(
            f"compression: 'layers' must be a list of factorised layers (got "
            f"{type(layers).__name__})"
        )
    return factorize_modules(model, [FactorizedLayerSpec.from_json(raw) for raw in layers])
