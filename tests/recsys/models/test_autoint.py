"""AutoInt: the verification properties of METHODS.md section 1(g) and the config rules.

Layer tests build `_InteractingLayer` directly on random (B, F, D) tensors in float64; model
tests run the tiny ml100k-ctr-like batch from conftest.py.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from recsys.embeddings import EmbeddingConfig, build_embedding
from recsys.errors import ConfigError
from recsys.features.batch import Batch
from recsys.features.schema import FeatureSchema
from recsys.models.autoint import AutoInt, AutoIntConfig, _InteractingLayer

BATCH, FIELDS, IN_DIM = 3, 5, 6
VARIANTS = [
    pytest.param({"variant": "paper"}, id="paper"),
    pytest.param({"variant": "paper", "use_scale": True}, id="paper-scaled"),
    pytest.param({"variant": "official"}, id="official"),
]


def _layer(in_dim: int = IN_DIM, seed: int = 0, **overrides: Any) -> _InteractingLayer:
    torch.manual_seed(seed)
    config = AutoIntConfig.model_validate({"num_heads": 2, "attention_dim": 8, **overrides})
    layer = _InteractingLayer(in_dim, config).double().eval()
    if layer.layer_norm is not None:  # non-trivial gamma/beta, so a missing LN is detected
        nn.init.normal_(layer.layer_norm.weight)
        nn.init.normal_(layer.layer_norm.bias)
    for linear in (layer.query, layer.key, layer.value, layer.residual):
        if linear is not None and linear.bias is not None:
            nn.init.normal_(linear.bias, std=0.1)
    return layer


def _emb(in_dim: int = IN_DIM, seed: int = 1) -> torch.Tensor:
    return torch.randn(
        BATCH, FIELDS, in_dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )


def _model(schema: FeatureSchema, dim: int = 4, seed: int = 0, **overrides: Any) -> AutoInt:
    torch.manual_seed(seed)
    config = AutoIntConfig.model_validate(
        {"num_layers": 2, "num_heads": 2, "attention_dim": 8, **overrides}
    )
    return AutoInt(config, build_embedding(schema, EmbeddingConfig(dim=dim)), schema)


def _reference_layer(
    layer: _InteractingLayer, emb: torch.Tensor, official: bool, scaled: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The interacting layer from METHODS.md 1(b)2, one head and one query field at a time.

    W^h is the block of columns of W (= linear.weight transposed) that belongs to head h.
    """
    num_heads, head_dim = layer.num_heads, layer.head_dim

    def project(linear: nn.Linear, x: torch.Tensor, cols: slice) -> torch.Tensor:
        y = x @ linear.weight.T[:, cols]
        if not official:
            return y  # the paper's projections are linear maps: no bias, no activation
        assert linear.bias is not None
        return torch.relu(y + linear.bias[cols])

    batch_size, num_fields, _ = emb.shape
    weights = torch.zeros(batch_size, num_heads, num_fields, num_fields, dtype=emb.dtype)
    head_outputs = []
    for h in range(num_heads):
        cols = slice(h * head_dim, (h + 1) * head_dim)
        keys = [project(layer.key, emb[:, j], cols) for j in range(num_fields)]
        values = [project(layer.value, emb[:, j], cols) for j in range(num_fields)]
        per_field = []
        for i in range(num_fields):
            q_i = project(layer.query, emb[:, i], cols)  # (B, d')
            scores = [(q_i * keys[j]).sum(-1) for j in range(num_fields)]  # F x (B,)
            if scaled:
                scores = [s / math.sqrt(head_dim) for s in scores]
            exps = [torch.exp(s) for s in scores]
            total = sum(exps)
            o_i = torch.zeros_like(values[0])
            for j in range(num_fields):
                weights[:, h, i, j] = exps[j] / total
                o_i = o_i + (exps[j] / total).unsqueeze(-1) * values[j]
            per_field.append(o_i)
        head_outputs.append(torch.stack(per_field, dim=1))  # (B, F, d')
    out = torch.cat(head_outputs, dim=-1)  # concat_h O_h: (B, F, H*d')
    if layer.residual is not None:
        out = out + project(layer.residual, emb, slice(None))
    out = torch.relu(out)
    if official:
        assert layer.layer_norm is not None
        mean = out.mean(-1, keepdim=True)
        var = ((out - mean) ** 2).mean(-1, keepdim=True)
        out = (out - mean) / torch.sqrt(var + layer.layer_norm.eps)
        out = out * layer.layer_norm.weight + layer.layer_norm.bias
    return out, weights


# --- (c) vectorised layer == naive loop over heads and fields ---------------------------------
@pytest.mark.parametrize("overrides", VARIANTS)
@pytest.mark.parametrize("use_residual", [True, False])
def test_layer_matches_naive_loop(overrides: dict[str, Any], use_residual: bool) -> None:
    layer = _layer(use_residual=use_residual, **overrides)
    emb = _emb()
    out, weights = layer(emb, need_weights=True)
    expected_out, expected_weights = _reference_layer(
        layer,
        emb,
        official=overrides["variant"] == "official",
        scaled=bool(overrides.get("use_scale")) or overrides["variant"] == "official",
    )
    assert weights is not None
    torch.testing.assert_close(weights, expected_weights, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out, expected_out, rtol=1e-10, atol=1e-12)


def test_variants_differ_as_documented() -> None:
    paper, official = _layer(variant="paper"), _layer(variant="official")
    for linear in (paper.query, paper.key, paper.value, paper.residual):
        assert linear is not None and linear.bias is None
    assert paper.layer_norm is None
    for linear in (official.query, official.key, official.value, official.residual):
        assert linear is not None and linear.bias is not None
    assert official.layer_norm is not None


# --- (a) W_Q = W_K = 0: uniform attention, O_h = field mean of V_h ---------------------------
@pytest.mark.parametrize("variant", ["paper", "official"])
def test_zero_query_key_gives_uniform_attention_and_field_mean(variant: str) -> None:
    layer = _layer(variant=variant, use_residual=False)
    with torch.no_grad():
        for linear in (layer.query, layer.key):
            linear.weight.zero_()
            if linear.bias is not None:
                linear.bias.zero_()
        # Non-negative V, so the closing ReLU is the identity and the output is O itself.
        layer.value.weight.abs_()
        if layer.value.bias is not None:
            layer.value.bias.abs_()
    emb = _emb().abs()
    out, weights = layer(emb, need_weights=True)
    assert weights is not None
    torch.testing.assert_close(weights, torch.full_like(weights, 1.0 / FIELDS))
    field_mean = layer.value(emb).mean(dim=1, keepdim=True).expand(-1, FIELDS, -1)  # (B, F, H*d')
    if layer.layer_norm is not None:
        field_mean = layer.layer_norm(field_mean)
    torch.testing.assert_close(out, field_mean)


# --- (b) permuting fields permutes the outputs -----------------------------------------------
@pytest.mark.parametrize("overrides", VARIANTS)
def test_permuting_fields_permutes_layer_outputs(overrides: dict[str, Any]) -> None:
    layer = _layer(**overrides)
    emb = _emb()
    perm = torch.tensor([3, 0, 4, 1, 2])
    out, weights = layer(emb, need_weights=True)
    out_perm, weights_perm = layer(emb[:, perm], need_weights=True)
    assert weights is not None and weights_perm is not None
    torch.testing.assert_close(out_perm, out[:, perm])
    torch.testing.assert_close(weights_perm, weights[:, :, perm][:, :, :, perm])


# --- (d) attention rows sum to 1 --------------------------------------------------------------
@pytest.mark.parametrize("overrides", VARIANTS)
def test_attention_rows_sum_to_one(overrides: dict[str, Any]) -> None:
    layer = _layer(attention_dropout=0.5, **overrides).train()
    _, weights = layer(_emb() * 3.0, need_weights=True)
    assert weights is not None
    assert (weights >= 0).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(BATCH, 2, FIELDS, dtype=torch.float64))


def test_model_returns_last_layer_attention(tiny_schema: FeatureSchema, tiny_batch: Batch) -> None:
    model = _model(tiny_schema, num_heads=4).eval()
    output = model(tiny_batch.features)
    attention = output.extras["attention"]
    num_fields = tiny_schema.num_fields
    assert attention.shape == (tiny_batch.batch_size, 4, num_fields, num_fields)
    torch.testing.assert_close(attention.sum(-1), torch.ones(attention.shape[:-1]))
    hidden = model.embedding(tiny_batch.features)
    for layer in model.layers:
        hidden, weights = layer(hidden, need_weights=True)
    torch.testing.assert_close(attention, weights)


# --- (e) config validation --------------------------------------------------------------------
def test_config_rejects_width_not_divisible_by_heads() -> None:
    with pytest.raises(ValidationError, match="divisible by num_heads") as info:
        AutoIntConfig(num_heads=3, attention_dim=64)
    assert "attention_dim=64" in str(info.value) and "num_heads=3" in str(info.value)


@pytest.mark.parametrize(
    "bad",
    [
        {"num_head": 2},  # unknown key
        {"num_layers": 0},
        {"variant": "keras"},
        {"attention_dropout": 1.0},
        {"dnn_hidden_units": (16, 0)},
    ],
)
def test_config_rejects_invalid_values(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        AutoIntConfig.model_validate(bad)


def test_config_is_frozen() -> None:
    config = AutoIntConfig()
    with pytest.raises(ValidationError):
        config.num_heads = 4  # type: ignore[misc]


# --- (f) AutoInt+ has a DNN that trains -------------------------------------------------------
def test_autoint_plus_dnn_gets_gradients(tiny_schema: FeatureSchema, tiny_batch: Batch) -> None:
    model = _model(tiny_schema, dnn_hidden_units=(16, 8)).train()
    assert model.dnn is not None
    first = model.dnn[0]
    assert isinstance(first, nn.Linear)
    assert first.in_features == tiny_schema.num_fields * 4  # flattened E0: F * D
    logits = model(tiny_batch.features).logits["ctr"]
    nn.functional.binary_cross_entropy_with_logits(logits, tiny_batch.labels["ctr"]).backward()
    dnn_params = list(model.dnn.named_parameters())
    assert len(dnn_params) == 6  # 3 Linear layers, weight + bias each
    for name, param in dnn_params:
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_autoint_plus_logit_is_attention_logit_plus_dnn_logit(
    tiny_schema: FeatureSchema, tiny_batch: Batch
) -> None:
    plus = _model(tiny_schema, dnn_hidden_units=(16,)).eval()
    plain = _model(tiny_schema).eval()
    plain.load_state_dict({k: v for k, v in plus.state_dict().items() if not k.startswith("dnn.")})
    assert plus.dnn is not None
    emb = plus.embedding(tiny_batch.features)
    dnn_logits = plus.dnn(emb.flatten(start_dim=1)).squeeze(-1)
    torch.testing.assert_close(
        plus(tiny_batch.features).logits["ctr"],
        plain(tiny_batch.features).logits["ctr"] + dnn_logits,
    )


def test_plain_autoint_has_no_dnn(tiny_schema: FeatureSchema) -> None:
    model = _model(tiny_schema)
    assert model.dnn is None
    assert not any(name.startswith("dnn") for name, _ in model.named_parameters())


# --- (g) residual projection when D != H*d' ---------------------------------------------------
def test_first_layer_has_residual_projection(tiny_schema: FeatureSchema, tiny_batch: Batch) -> None:
    model = _model(tiny_schema, dim=4, num_layers=3).eval()  # D=4 -> attention_dim=8
    residuals = [r for layer in model.layers if isinstance(r := layer.residual, nn.Linear)]
    assert [(r.in_features, r.out_features) for r in residuals] == [(4, 8), (8, 8), (8, 8)]
    before = model(tiny_batch.features).logits["ctr"]
    with torch.no_grad():
        residuals[0].weight.zero_()
    after = model(tiny_batch.features).logits["ctr"]
    assert not torch.allclose(before, after), "the first residual projection is not used"


def test_no_residual_when_disabled(tiny_schema: FeatureSchema) -> None:
    model = _model(tiny_schema, use_residual=False)
    assert all(layer.residual is None for layer in model.layers)


# --- dropout acts in training only ------------------------------------------------------------
def test_dropout_only_in_training(tiny_schema: FeatureSchema, tiny_batch: Batch) -> None:
    model = _model(tiny_schema, attention_dropout=0.5, dnn_hidden_units=(16,), dnn_dropout=0.5)
    model.eval()
    first = model(tiny_batch.features).logits["ctr"]
    torch.testing.assert_close(model(tiny_batch.features).logits["ctr"], first, rtol=0, atol=0)
    model.train()
    torch.manual_seed(1)
    train_a = model(tiny_batch.features).logits["ctr"]
    torch.manual_seed(2)
    train_b = model(tiny_batch.features).logits["ctr"]
    assert not torch.allclose(train_a, train_b)


# --- construction-time checks -----------------------------------------------------------------
def test_embedding_with_wrong_field_count_is_rejected(tiny_schema: FeatureSchema) -> None:
    embedding = build_embedding(tiny_schema, EmbeddingConfig(dim=4))
    embedding.sparse_names = embedding.sparse_names[:-1]
    with pytest.raises(ConfigError, match="fields"):
        AutoInt(AutoIntConfig(), embedding, tiny_schema)
