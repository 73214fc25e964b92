"""FactorizedLinear and the rewrite of named nn.Linear submodules from a JSON description."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from recsys.compression.factorized import (
    FactorizedLayerSpec,
    FactorizedLinear,
    apply_compression,
    factorize_modules,
)
from recsys.errors import ConfigError


def _orthonormal(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(rows, cols, generator=generator, dtype=torch.float64))
    return q


@pytest.mark.parametrize("bias", [True, False])
def test_full_rank_factors_reproduce_the_linear_layer(bias: bool) -> None:
    """A = (U^T W, U^T b), B = (U, (I - U U^T) mu) with a square orthogonal U is exact for any
    mu (the correction term vanishes), with or without the original bias."""
    torch.manual_seed(0)
    linear = nn.Linear(12, 7, bias=bias)
    basis = _orthonormal(7, 7)
    mean = torch.randn(7, dtype=torch.float64)
    weight = linear.weight.detach().double()
    layer = FactorizedLinear.from_factors(
        basis.T @ weight,
        basis.T @ linear.bias.detach().double() if bias else None,
        basis,
        mean - basis @ (basis.T @ mean),
    )
    x = torch.randn(5, 3, 12)  # leading axes pass through, like attention's (B, F, in)
    assert (layer(x) - linear(x)).abs().max() < 1e-5
    assert (layer.first.bias is not None) == bias


def test_truncated_factors_project_onto_the_subspace_through_the_mean() -> None:
    """At rank k < out the output is U U^T (y - mu) + mu: its component outside span(U) is
    exactly that of mu."""
    torch.manual_seed(1)
    linear = nn.Linear(6, 5)
    basis = _orthonormal(5, 2, seed=3)
    mean = torch.randn(5, dtype=torch.float64)
    layer = FactorizedLinear.from_factors(
        basis.T @ linear.weight.detach().double(),
        basis.T @ linear.bias.detach().double(),
        basis,
        mean - basis @ (basis.T @ mean),
    )
    x = torch.randn(9, 6)
    y = linear(x).double()
    expected = (y - mean) @ basis @ basis.T + mean
    torch.testing.assert_close(layer(x).double(), expected, atol=1e-5, rtol=0)


def test_ada_act_puts_the_activation_between_the_factors() -> None:
    layer = FactorizedLinear(4, 3, rank=2, activation="relu")
    plain = FactorizedLinear(4, 3, rank=2)
    plain.load_state_dict(layer.state_dict())
    x = torch.randn(64, 4)
    hidden = layer.first(x)
    assert (hidden < 0).any()  # otherwise the test could not tell the two apart
    torch.testing.assert_close(layer(x), layer.second(torch.relu(hidden)))
    assert not torch.allclose(layer(x), plain(x))


@pytest.mark.parametrize(("first_bias", "expected"), [(True, 3 * (10 + 4) + 4 + 3), (False, 46)])
def test_parameter_count_is_k_in_plus_out_plus_biases(first_bias: bool, expected: int) -> None:
    spec = FactorizedLayerSpec("x", 10, 4, rank=3, first_bias=first_bias)
    layer = FactorizedLinear(10, 4, 3, first_bias=first_bias)
    assert sum(p.numel() for p in layer.parameters()) == spec.num_parameters == expected


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16))
        self.head = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.body(x)))


def test_factorize_modules_replaces_named_linears_from_a_json_description() -> None:
    specs = [
        FactorizedLayerSpec("body.0", 8, 16, rank=3),
        FactorizedLayerSpec("body.2", 16, 16, rank=5, first_bias=False, activation="relu"),
    ]
    description = json.loads(json.dumps({"layers": [s.to_json() for s in specs], "note": 1}))
    net = apply_compression(_Net(), description)
    first, second = net.get_submodule("body.0"), net.get_submodule("body.2")
    assert isinstance(first, FactorizedLinear) and first.rank == 3
    assert isinstance(second, FactorizedLinear) and second.rank == 5
    assert second.first.bias is None and second.activation_name == "relu"
    assert isinstance(net.head, nn.Linear)  # untouched
    assert net(torch.randn(2, 8)).shape == (2, 1)
    dense = sum(p.numel() for p in _Net().parameters())
    removed = (8 * 16 + 16) + (16 * 16 + 16)
    assert sum(p.numel() for p in net.parameters()) == dense - removed + sum(
        s.num_parameters for s in specs
    )
    # the keys a state dict of the compressed model needs
    assert {"body.0.first.weight", "body.0.second.bias", "body.2.first.weight"} <= set(
        net.state_dict()
    )


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (FactorizedLayerSpec("body.9", 8, 16, 2), "no submodule 'body.9'"),
        (FactorizedLayerSpec("body.1", 8, 16, 2), "is a ReLU"),
        (FactorizedLayerSpec("body.0", 8, 32, 2), r"is 8 -> 16 \(expected 8 -> 32"),
    ],
)
def test_a_description_that_does_not_fit_the_model_is_a_config_error(
    spec: FactorizedLayerSpec, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        factorize_modules(_Net(), [spec])


def test_malformed_descriptions_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="'layers' must be a list"):
        apply_compression(_Net(), {"layers": "body.0"})
    with pytest.raises(ConfigError, match="does not describe a factorised layer"):
        apply_compression(_Net(), {"layers": [{"name": "body.0", "rank": 2}]})
    with pytest.raises(ConfigError, match="unknown activation"):
        FactorizedLinear(4, 4, 2, activation="tanh")  # type: ignore[arg-type]
