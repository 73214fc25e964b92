"""ARM-Net: the verification properties of METHODS.md section 2(g) and the config rules.

Gate and neuron tests build `_SparseGates` / `_exponential_neurons` directly on random
(B, F, D) tensors; model tests run the tiny ml100k-ctr-like batch from conftest.py.
"""

from __future__ import annotations

import math
from typing import Any

import entmax
import pyarrow as pa
import pytest
import torch
from pydantic import ValidationError
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from recsys.data.schema import DatasetSchema
from recsys.embeddings import EmbeddingConfig, build_embedding
from recsys.errors import ConfigError
from recsys.features.batch import Batch, Features, batch_from_encoded
from recsys.features.schema import FeatureSchema, fit_feature_schema
from recsys.models.armnet import (
    ARMNet,
    ARMNetConfig,
    _entmax,
    _exponential_neurons,
    _SparseGates,
    _squash_dense,
)

BATCH, FIELDS, DIM = 6, 8, 4


def _gates(seed: int = 0, **overrides: Any) -> _SparseGates:
    torch.manual_seed(seed)
    config = ARMNetConfig.model_validate({"num_heads": 2, "num_neurons": 5, **overrides})
    return _SparseGates(FIELDS, DIM, config).double()


def _emb(seed: int = 1, scale: float = 3.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return scale * torch.randn(BATCH, FIELDS, DIM, generator=generator, dtype=torch.float64)


def _model(schema: FeatureSchema, seed: int = 0, dim: int = 4, **overrides: Any) -> ARMNet:
    torch.manual_seed(seed)
    config = ARMNetConfig.model_validate(
        {"num_heads": 2, "num_neurons": 8, "mlp_hidden_units": (16,), **overrides}
    )
    return ARMNet(config, build_embedding(schema, EmbeddingConfig(dim=dim)), schema)


def _tables(model: ARMNet) -> list[EmbeddingBagCollection]:
    return [m for m in model.modules() if isinstance(m, EmbeddingBagCollection)]


# --- sparse gates ---------------------------------------------------------------------------
@pytest.mark.parametrize("alpha", [1.5, 1.7, 2.0])
def test_gates_have_exact_zeros_and_rows_sum_to_one(alpha: float) -> None:
    gates, _ = _gates(alpha=alpha)(_emb())
    assert gates.shape == (BATCH, 2, 5, FIELDS)
    assert (gates >= 0).all()
    assert (gates == 0).any(), f"alpha={alpha} gave no exact zero"
    torch.testing.assert_close(gates.sum(-1), torch.ones(BATCH, 2, 5, dtype=gates.dtype))


def test_softmax_gates_at_alpha_one() -> None:
    layer = _gates(alpha=1.0)
    gates, _ = layer(_emb())
    torch.testing.assert_close(gates, torch.softmax(layer.logits(_emb()), dim=-1))
    assert (gates > 0).all()


def test_sparsemax_gates_at_alpha_two() -> None:
    layer = _gates(alpha=2.0)
    gates, _ = layer(_emb())
    torch.testing.assert_close(gates, entmax.sparsemax(layer.logits(_emb()), dim=-1))


def test_bisection_path_matches_exact_entmax15() -> None:
    logits = _emb().flatten(0, 1)  # (B*F, D): any rows will do
    torch.testing.assert_close(
        _entmax(logits, 1.5), entmax.entmax15(logits, dim=-1), rtol=1e-5, atol=1e-6
    )
    assert not torch.allclose(_entmax(logits, 1.7), _entmax(logits, 1.5))


def test_logits_match_naive_loop() -> None:
    layer, emb = _gates(), _emb()
    num_heads, num_neurons, attention_dim = layer.query.shape
    expected = torch.zeros(BATCH, num_heads, num_neurons, FIELDS, dtype=emb.dtype)
    for b in range(BATCH):
        for h in range(num_heads):
            for k in range(num_neurons):
                for f in range(FIELDS):
                    key = emb[b, f] @ layer.bilinear[h]  # (d_k,)
                    expected[b, h, k, f] = key @ layer.query[h, k] / math.sqrt(attention_dim)
    torch.testing.assert_close(layer.logits(emb), expected)


def test_weights_are_gates_times_unnormalised_values() -> None:
    layer = _gates()
    assert (layer.value < 0).any()  # values may be negative: division-like terms
    gates, weights = layer(_emb())
    torch.testing.assert_close(weights, gates * layer.value)


def test_attention_dim_defaults_to_embedding_width() -> None:
    assert _gates().bilinear.shape == (2, DIM, DIM)
    assert _gates(attention_dim=6).bilinear.shape == (2, DIM, 6)
    assert _gates(attention_dim=6).query.shape == (2, 5, 6)


# --- exponential neurons --------------------------------------------------------------------
def _one_neuron_weights(entries: dict[int, float]) -> torch.Tensor:
    weights = torch.zeros(BATCH, 1, 1, FIELDS, dtype=torch.float64)
    for field, value in entries.items():
        weights[..., field] = value
    return weights


def test_one_gate_gives_exp_of_that_field() -> None:
    emb = _emb(scale=1.0)
    out = _exponential_neurons(_one_neuron_weights({3: 1.0}), emb, 30.0)
    torch.testing.assert_close(out[:, 0, 0], torch.exp(emb[:, 3]))


def test_two_gates_multiply_and_negative_values_divide() -> None:
    emb = _emb(scale=1.0)
    product = _exponential_neurons(_one_neuron_weights({1: 1.0, 5: 1.0}), emb, 30.0)
    torch.testing.assert_close(product[:, 0, 0], torch.exp(emb[:, 1]) * torch.exp(emb[:, 5]))
    ratio = _exponential_neurons(_one_neuron_weights({1: 1.0, 5: -1.0}), emb, 30.0)
    torch.testing.assert_close(ratio[:, 0, 0], torch.exp(emb[:, 1]) / torch.exp(emb[:, 5]))


def test_exponent_clamp_prevents_overflow() -> None:
    emb = torch.full((BATCH, FIELDS, DIM), 1e4)  # float32: exp(1e4) would be inf
    out = _exponential_neurons(_one_neuron_weights({0: 1.0, 2: 1.0}).float(), emb, 30.0)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, torch.full_like(out, math.exp(30.0)))


def test_model_stays_finite_with_huge_embeddings(
    tiny_schema: FeatureSchema, tiny_batch: Batch
) -> None:
    model = _model(tiny_schema, use_ensemble=True).train()
    with torch.no_grad():
        for table in _tables(model):
            for param in table.parameters():
                param.fill_(1e3)
    output = model(tiny_batch.features)
    loss = model.loss(output, tiny_batch.labels)
    loss.backward()
    assert torch.isfinite(output.logits["ctr"]).all()
    assert torch.isfinite(loss)
    for name, param in model.named_parameters():
        assert param.grad is None or torch.isfinite(param.grad).all(), name


# --- gradient clamp -------------------------------------------------------------------------
def test_gradient_hooks_clamp_dense_parameters(tiny_schema: FeatureSchema) -> None:
    model = _model(tiny_schema, use_ensemble=True, grad_clamp=1.0)
    table = _tables(model)[0]
    table_weight = next(table.parameters())
    dense = [model.gates.value, model.mix.weight, model.mlp[0].weight]  # type: ignore[union-attr]
    loss = 1e6 * (sum(p.sum() for p in dense) + table_weight.sum())
    loss.backward()
    for param in dense:
        torch.testing.assert_close(param.grad, torch.ones_like(param))
    # the tables use a fused optimizer in training and are left alone
    torch.testing.assert_close(table_weight.grad, torch.full_like(table_weight, 1e6))


@pytest.mark.parametrize("grad_clamp", [None, 0.0])
def test_gradient_clamp_can_be_disabled(
    tiny_schema: FeatureSchema, grad_clamp: float | None
) -> None:
    model = _model(tiny_schema, grad_clamp=grad_clamp)
    (1e6 * model.gates.value.sum()).backward()
    torch.testing.assert_close(model.gates.value.grad, torch.full_like(model.gates.value, 1e6))


def test_no_nan_over_many_training_steps(tiny_schema: FeatureSchema, tiny_batch: Batch) -> None:
    model = _model(tiny_schema, use_ensemble=True).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-2)
    for step in range(60):
        optimizer.zero_grad()
        output = model(tiny_batch.features)
        loss = model.loss(output, tiny_batch.labels)
        loss.backward()
        optimizer.step()
        assert torch.isfinite(loss), f"step {step}: loss {loss}"
        assert torch.isfinite(output.extras["gates"]).all(), f"step {step}: gates"
    for name, param in model.named_parameters():
        assert torch.isfinite(param).all(), name


def test_arm_block_runs_in_float32_under_autocast(
    tiny_schema: FeatureSchema, tiny_batch: Batch
) -> None:
    model = _model(tiny_schema).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        output = model(tiny_batch.features)
    assert output.extras["gates"].dtype == torch.float32
    assert torch.isfinite(output.logits["ctr"]).all()


# --- model wiring ---------------------------------------------------------------------------
def test_model_returns_gates(tiny_schema: FeatureSchema, tiny_batch: Batch) -> None:
    model = _model(tiny_schema).eval()
    output = model(tiny_batch.features)
    gates = output.extras["gates"]
    assert gates.shape == (tiny_batch.batch_size, 2, 8, tiny_schema.num_fields)
    torch.testing.assert_close(gates.sum(-1), torch.ones(gates.shape[:-1]))


def test_arm_net_plus_has_its_own_tables_and_starts_as_the_mean(
    tiny_schema: FeatureSchema, tiny_batch: Batch
) -> None:
    model = _model(tiny_schema, use_ensemble=True).eval()
    tables = _tables(model)
    assert len(tables) == 2
    arm_names = {c.name for c in model.embedding.tables.embedding_bag_configs()}
    assert model.dnn_embedding is not None and model.dnn is not None and model.mix is not None
    dnn_names = {c.name for c in model.dnn_embedding.tables.embedding_bag_configs()}
    assert len(arm_names) == len(dnn_names) == len(tiny_schema.sparse)
    assert not arm_names & dnn_names
    assert all(name.startswith("dnn_") for name in dnn_names)
    torch.testing.assert_close(model.mix.weight, torch.full((1, 2), 0.5))
    torch.testing.assert_close(model.mix.bias, torch.zeros(1))
    # the mix is exactly 0.5 * (ARM logit + DNN logit) at init
    output = model(tiny_batch.features)
    features = _squash_dense(tiny_batch.features)
    with torch.no_grad():
        model.mix = None  # type: ignore[assignment]
        arm_only = model(tiny_batch.features).logits["ctr"]
        dnn_emb = model.dnn_embedding(features)
        dnn_logits = model.dnn(dnn_emb.flatten(start_dim=1)).squeeze(-1)
    torch.testing.assert_close(output.logits["ctr"], 0.5 * (arm_only + dnn_logits))


def test_plain_arm_net_has_one_table_set(tiny_schema: FeatureSchema) -> None:
    model = _model(tiny_schema)
    assert len(_tables(model)) == 1
    assert model.dnn_embedding is None and model.dnn is None and model.mix is None


def test_dnn_embedding_follows_the_injected_one(tiny_schema: FeatureSchema) -> None:
    config = ARMNetConfig(num_neurons=4, mlp_hidden_units=(8,), use_ensemble=True)
    embedding = build_embedding(
        tiny_schema, EmbeddingConfig(dim=6, init_scale=0.2), device=torch.device("meta")
    )
    model = ARMNet(config, embedding, tiny_schema)
    assert model.dnn_embedding is not None
    assert model.dnn_embedding.dim == 6
    assert all(p.is_meta for p in model.dnn_embedding.tables.parameters())
    for table_config in model.dnn_embedding.tables.embedding_bag_configs():
        assert table_config.weight_init_max == 0.2
        assert table_config.weight_init_min == -0.2


def test_dense_values_are_squashed_into_the_official_range() -> None:
    dataset = DatasetSchema.model_validate(
        {
            "name": "toy",
            "columns": [
                {"name": "user_id", "role": "categorical"},
                {"name": "score", "role": "dense"},
                {"name": "click", "role": "label", "task": "ctr"},
            ],
        }
    )
    rows = pa.table({"user_id": ["u1", "u2", "u3"], "score": [0.0, 5.0, 1e4], "click": [1, 0, 1]})
    schema = fit_feature_schema(dataset, [rows])
    features = batch_from_encoded(schema, schema.encode(rows)).features
    seen: list[Features] = []
    model = _model(schema)
    model.embedding.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    model.eval()(features)
    torch.testing.assert_close(seen[0].dense, torch.sigmoid(features.dense).clamp(1e-3, 1.0))
    squashed = _squash_dense(Features(features.sparse, torch.tensor([[-100.0], [0.0], [100.0]])))
    torch.testing.assert_close(squashed.dense, torch.tensor([[1e-3], [0.5], [1.0]]))


def test_embedding_with_wrong_field_count_is_rejected(tiny_schema: FeatureSchema) -> None:
    embedding = build_embedding(tiny_schema, EmbeddingConfig(dim=4))
    embedding.sparse_names = embedding.sparse_names[:-1]
    with pytest.raises(ConfigError, match="fields"):
        ARMNet(ARMNetConfig(), embedding, tiny_schema)


def test_schema_without_ctr_task_is_rejected() -> None:
    dataset = DatasetSchema.model_validate(
        {
            "name": "toy",
            "columns": [
                {"name": "user_id", "role": "categorical"},
                {"name": "buy", "role": "label", "task": "cvr"},
            ],
        }
    )
    schema = fit_feature_schema(dataset, [pa.table({"user_id": ["u1"], "buy": [1]})])
    with pytest.raises(ConfigError, match="ctr"):
        ARMNet(ARMNetConfig(), build_embedding(schema, EmbeddingConfig(dim=4)), schema)


# --- config ---------------------------------------------------------------------------------
def test_config_defaults_follow_methods_ml100k() -> None:
    config = ARMNetConfig()
    assert (config.num_heads, config.num_neurons, config.attention_dim) == (1, 64, None)
    assert config.alpha == 1.7 and config.mlp_hidden_units == (256, 256)
    assert (config.exponent_clamp, config.grad_clamp, config.use_ensemble) == (30.0, 1.0, False)


@pytest.mark.parametrize(
    ("bad", "field"),
    [
        ({"alpha": 0.5}, "alpha"),
        ({"alpha": float("nan")}, "alpha"),
        ({"exponent_clamp": 100.0}, "exponent_clamp"),
        ({"exponent_clamp": 0.0}, "exponent_clamp"),
        ({"grad_clamp": -1.0}, "grad_clamp"),
        ({"use_ensemble": True, "dnn_hidden_units": ()}, "dnn_hidden_units"),
        ({"num_neurons": 0}, "num_neurons"),
        ({"num_heads": 0}, "num_heads"),
        ({"attention_dim": 0}, "attention_dim"),
        ({"mlp_dropout": 1.0}, "mlp_dropout"),
        ({"mlp_hidden_units": (0,)}, "mlp_hidden_units"),
        ({"num_neuron": 8}, "num_neuron"),
    ],
)
def test_config_errors_name_the_field(bad: dict[str, object], field: str) -> None:
    with pytest.raises(ValidationError, match=field):
        ARMNetConfig.model_validate(bad)


def test_config_is_frozen() -> None:
    with pytest.raises(ValidationError):
        ARMNetConfig().alpha = 2.0  # type: ignore[misc]
