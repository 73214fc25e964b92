"""ESMM: the verification properties of METHODS.md section 3(g), the stable loss, the gradient
paths of both objectives, and the config rules.

Loss tests call `ESMM.loss` on hand-made logits; model tests run the tiny ml100k-esmm-like batch
from conftest.py (click = user/item parity XOR, ctcvr = click AND an item-level conversion).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import torch
from pydantic import ValidationError
from torch import nn
from torch.nn import functional as F

from recsys.data.movielens import ML100K_CTR_SCHEMA
from recsys.data.schema import DatasetSchema
from recsys.embeddings import EmbeddingConfig, build_embedding
from recsys.errors import ConfigError
from recsys.features.batch import Batch, batch_from_encoded
from recsys.features.schema import FeatureSchema, fit_feature_schema
from recsys.metrics import auc
from recsys.models.esmm import ESMM, ESMMConfig
from recsys.models.outputs import ModelOutput
from tests.tiny_data import make_tiny_table


def _model(schema: FeatureSchema, dim: int = 4, seed: int = 0, **overrides: Any) -> ESMM:
    torch.manual_seed(seed)
    config = ESMMConfig.model_validate({"tower_hidden_units": (16, 8), **overrides})
    return ESMM(config, build_embedding(schema, EmbeddingConfig(dim=dim)), schema)


def _loss_model(objective: str = "entire_space") -> ESMM:
    """A model used only for its `loss` (which reads the config, not the weights)."""
    schema = fit_feature_schema(
        DatasetSchema.model_validate(
            {
                "name": "loss-only",
                "columns": [
                    {"name": "item_id", "role": "categorical"},
                    {"name": "click", "role": "label", "task": "ctr"},
                    {"name": "ctcvr", "role": "label"},
                ],
            }
        ),
        [pa.table({"item_id": ["i1"], "click": [1], "ctcvr": [0]})],
    )
    return _model(schema, objective=objective)


def _naive_loss(
    ctr_logits: torch.Tensor, cvr_logits: torch.Tensor, labels: dict[str, torch.Tensor]
) -> torch.Tensor:
    """METHODS.md 3(d) written on probabilities: BCE(click, pCTR) + BCE(ctcvr, pCTR * pCVR)."""
    ctr_prob, cvr_prob = torch.sigmoid(ctr_logits), torch.sigmoid(cvr_logits)
    return F.binary_cross_entropy(ctr_prob, labels["ctr"]) + F.binary_cross_entropy(
        ctr_prob * cvr_prob, labels["ctcvr"]
    )


def _random_logits_and_labels(
    num_rows: int = 64, scale: float = 3.0, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    ctr_logits = torch.randn(num_rows, generator=gen, dtype=torch.float64) * scale
    cvr_logits = torch.randn(num_rows, generator=gen, dtype=torch.float64) * scale
    click = (torch.rand(num_rows, generator=gen) < 0.5).double()
    conversion = (torch.rand(num_rows, generator=gen) < 0.5).double()
    return ctr_logits, cvr_logits, {"ctr": click, "ctcvr": click * conversion}


def _tower_params(tower: nn.Module) -> list[nn.Parameter]:
    return list(tower.parameters())


def _table_grads(model: ESMM) -> list[torch.Tensor]:
    grads = []
    for param in model.embedding.tables.parameters():
        assert param.grad is not None
        grads.append(param.grad.detach().clone())
    return grads


# --- (g) pCTCVR = pCTR * pCVR <= pCTR ---------------------------------------------------------
def test_ctcvr_is_the_product_of_ctr_and_cvr(tiny_schema: FeatureSchema, tiny_batch: Batch) -> None:
    model = _model(tiny_schema).eval()
    with torch.no_grad():
        output = model(tiny_batch.features)
        probs = model.probabilities(output)
    assert set(output.logits) == {"ctr", "cvr"}
    assert set(probs) == {"ctr", "cvr", "ctcvr"} == set(model.served_tasks)
    torch.testing.assert_close(probs["ctr"], torch.sigmoid(output.logits["ctr"]), rtol=0, atol=0)
    torch.testing.assert_close(probs["cvr"], torch.sigmoid(output.logits["cvr"]), rtol=0, atol=0)
    torch.testing.assert_close(probs["ctcvr"], probs["ctr"] * probs["cvr"], rtol=0, atol=0)
    assert (probs["ctcvr"] <= probs["ctr"]).all()
    assert (probs["ctcvr"] <= probs["cvr"]).all()


def test_ctr_tower_and_cvr_tower_differ(tiny_schema: FeatureSchema, tiny_batch: Batch) -> None:
    """Two towers with their own weights (not one tower read twice)."""
    model = _model(tiny_schema).eval()
    with torch.no_grad():
        output = model(tiny_batch.features)
    assert not torch.equal(output.logits["ctr"], output.logits["cvr"])
    shared = {id(p) for p in model.ctr_tower.parameters()} & {
        id(p) for p in model.cvr_tower.parameters()
    }
    assert not shared


# --- (d) the stable loss -----------------------------------------------------------------------
def test_stable_loss_equals_naive_bce_and_its_gradient() -> None:
    model = _loss_model()
    ctr_logits, cvr_logits, labels = _random_logits_and_labels()
    ctr_logits.requires_grad_(True)
    cvr_logits.requires_grad_(True)
    stable = model.loss(ModelOutput(logits={"ctr": ctr_logits, "cvr": cvr_logits}), labels)
    stable_grads = torch.autograd.grad(stable, [ctr_logits, cvr_logits])
    naive = _naive_loss(ctr_logits, cvr_logits, labels)
    naive_grads = torch.autograd.grad(naive, [ctr_logits, cvr_logits])
    torch.testing.assert_close(stable, naive, rtol=1e-10, atol=1e-12)
    for got, expected in zip(stable_grads, naive_grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(
    ("ctr_logit", "cvr_logit", "click", "ctcvr", "expected_ctcvr_term"),
    [
        # -log p = softplus(50) + softplus(-50): a clamp at 1e-7 would give 16.1 instead.
        pytest.param(50.0, -50.0, 1.0, 1.0, 50.0, id="confident-miss"),
        # p = sigmoid(50)^2 rounds to 1 in float32; -log(1 - p) = -log(2 e^-50) = 50 - log 2.
        pytest.param(50.0, 50.0, 1.0, 0.0, 50.0 - math.log(2.0), id="saturated-p"),
        pytest.param(-50.0, -50.0, 0.0, 0.0, 0.0, id="confident-hit"),
        pytest.param(50.0, 50.0, 1.0, 1.0, 0.0, id="saturated-hit"),
    ],
)
def test_stable_loss_is_exact_for_extreme_logits(
    ctr_logit: float, cvr_logit: float, click: float, ctcvr: float, expected_ctcvr_term: float
) -> None:
    model = _loss_model()
    ctr_logits = torch.tensor([ctr_logit], requires_grad=True)  # float32, as in training
    cvr_logits = torch.tensor([cvr_logit], requires_grad=True)
    labels = {"ctr": torch.tensor([click]), "ctcvr": torch.tensor([ctcvr])}
    loss = model.loss(ModelOutput(logits={"ctr": ctr_logits, "cvr": cvr_logits}), labels)
    loss.backward()
    ctr_term = F.binary_cross_entropy_with_logits(ctr_logits.detach(), labels["ctr"])
    torch.testing.assert_close(
        loss - ctr_term, torch.tensor(expected_ctcvr_term), atol=1e-4, rtol=1e-5
    )
    for logits in (ctr_logits, cvr_logits):
        assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_loss_stays_finite_for_huge_logits() -> None:
    """Beyond float32's range for softplus(-a) (= 0 at a = 200) the loss is still finite."""
    model = _loss_model()
    values = torch.tensor([-200.0, -50.0, 0.0, 50.0, 200.0])
    ctr_logits, cvr_logits = torch.meshgrid(values, values, indexing="ij")
    ctr_logits = ctr_logits.flatten().requires_grad_(True)
    cvr_logits = cvr_logits.flatten().requires_grad_(True)
    for click, ctcvr in [(0.0, 0.0), (1.0, 0.0), (1.0, 1.0)]:
        labels = {"ctr": torch.full((25,), click), "ctcvr": torch.full((25,), ctcvr)}
        loss = model.loss(ModelOutput(logits={"ctr": ctr_logits, "cvr": cvr_logits}), labels)
        grads = torch.autograd.grad(loss, [ctr_logits, cvr_logits])
        assert torch.isfinite(loss), (click, ctcvr)
        assert all(torch.isfinite(g).all() for g in grads), (click, ctcvr)


# --- (f) no direct loss on pCVR: the CVR tower learns through pCTCVR only -----------------------
def test_cvr_gradient_comes_from_the_ctcvr_term_only() -> None:
    model = _loss_model()
    ctr_logits, cvr_logits, labels = _random_logits_and_labels()
    cvr_logits.requires_grad_(True)
    output = ModelOutput(logits={"ctr": ctr_logits, "cvr": cvr_logits})
    (grad,) = torch.autograd.grad(model.loss(output, labels), [cvr_logits])
    ctcvr_only = F.binary_cross_entropy(
        torch.sigmoid(ctr_logits) * torch.sigmoid(cvr_logits), labels["ctcvr"]
    )
    (expected,) = torch.autograd.grad(ctcvr_only, [cvr_logits])
    torch.testing.assert_close(grad, expected, rtol=1e-9, atol=1e-12)
    # Every impression, clicked or not, moves pCVR (a clicked-only CVR loss would leave the
    # unclicked rows at zero).
    assert (grad[labels["ctr"] == 0].abs() > 0).all()
    # The click label does not enter the CVR gradient: flipping it leaves the gradient unchanged.
    flipped = {"ctr": 1.0 - labels["ctr"], "ctcvr": labels["ctcvr"]}
    (grad_flipped,) = torch.autograd.grad(model.loss(output, flipped), [cvr_logits])
    torch.testing.assert_close(grad_flipped, grad, rtol=0, atol=0)


def test_cvr_tower_trains_from_the_loss(tiny_schema: FeatureSchema, tiny_batch: Batch) -> None:
    model = _model(tiny_schema).train()
    model.loss(model(tiny_batch.features), tiny_batch.labels).backward()
    for param in _tower_params(model.cvr_tower):
        assert param.grad is not None and param.grad.abs().sum() > 0


# --- clicked_only: the naive CVR baseline --------------------------------------------------------
def test_clicked_only_cvr_term_is_bce_on_clicked_rows() -> None:
    model = _loss_model("clicked_only")
    ctr_logits, cvr_logits, labels = _random_logits_and_labels()
    cvr_logits.requires_grad_(True)
    output = ModelOutput(logits={"ctr": ctr_logits, "cvr": cvr_logits})
    loss = model.loss(output, labels)
    clicked = labels["ctr"] == 1
    expected = F.binary_cross_entropy_with_logits(ctr_logits, labels["ctr"]) + (
        F.binary_cross_entropy(torch.sigmoid(cvr_logits[clicked]), labels["ctcvr"][clicked])
    )
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    (grad,) = torch.autograd.grad(loss, [cvr_logits])
    assert (grad[~clicked] == 0).all()
    assert (grad[clicked].abs() > 0).all()


def test_clicked_only_without_clicks_gives_a_zero_cvr_term(
    tiny_schema: FeatureSchema, tiny_batch: Batch
) -> None:
    model = _model(tiny_schema, objective="clicked_only").train()
    no_clicks = {
        "ctr": torch.zeros(tiny_batch.batch_size),
        "ctcvr": torch.zeros(tiny_batch.batch_size),
    }
    output = model(tiny_batch.features)
    loss = model.loss(output, no_clicks)
    ctr_term = F.binary_cross_entropy_with_logits(output.logits["ctr"], no_clicks["ctr"])
    torch.testing.assert_close(loss, ctr_term, rtol=0, atol=0)
    loss.backward()  # the zero CVR term is still in the graph
    for param in _tower_params(model.cvr_tower):
        assert param.grad is not None and (param.grad == 0).all()
    for param in _tower_params(model.ctr_tower):
        assert param.grad is not None and param.grad.abs().sum() > 0


def _shuffle_unclicked_features(table: pa.Table) -> pa.Table:
    """The same labels, but the unclicked rows get the user and item of other unclicked rows."""
    click = table["click"].to_numpy(zero_copy_only=False)
    unclicked = np.flatnonzero(click == 0)
    order = np.arange(table.num_rows)
    order[unclicked] = np.roll(unclicked, 1)
    moved = table.take(pa.array(order))
    for column in ("user_id", "item_id", "genres", "release_year"):
        table = table.set_column(table.schema.get_field_index(column), column, moved[column])
    return table


@pytest.mark.parametrize("objective", ["clicked_only", "entire_space"])
def test_embedding_gradient_ignores_unclicked_rows_only_when_clicked_only(
    objective: str,
    tiny_schema: FeatureSchema,
    tiny_table: pa.Table,
    encode_batch: Callable[[pa.Table], Batch],
) -> None:
    grads = []
    for table in (tiny_table, _shuffle_unclicked_features(tiny_table)):
        model = _model(tiny_schema, objective=objective).train()
        batch = encode_batch(table)
        model.loss(model(batch.features), batch.labels).backward()
        grads.append(_table_grads(model))
        for param in _tower_params(model.ctr_tower):  # the CTR tower always trains
            assert param.grad is not None and param.grad.abs().sum() > 0
        assert any(g.abs().sum() > 0 for g in grads[-1])
    # clicked_only: no impression-level signal reaches the shared embedding; entire_space: it
    # does. (Equal only up to summation order: the table backward regroups the clicked rows.)
    scale = max(g.abs().max().item() for g in grads[0])
    change = max((a - b).abs().max().item() for a, b in zip(*grads, strict=True))
    if objective == "clicked_only":
        assert change <= 1e-5 * scale, (change, scale)
    else:
        assert change > 1e-2 * scale, (change, scale)


def test_clicked_only_ctr_tower_reads_a_detached_embedding(
    tiny_schema: FeatureSchema, tiny_batch: Batch
) -> None:
    model = _model(tiny_schema, objective="clicked_only").train()
    output = model(tiny_batch.features)
    F.binary_cross_entropy_with_logits(output.logits["ctr"], tiny_batch.labels["ctr"]).backward()
    assert all(p.grad is None for p in model.embedding.parameters())


# --- (g) synthetic data with a known CVR: ESMM recovers it ---------------------------------------
def _planted_esmm_data(num_rows: int, seed: int) -> tuple[pa.Table, np.ndarray]:
    """Clicks depend on `placement` only, conversions on `item_id` only (METHODS.md 3(g))."""
    rng = np.random.default_rng(seed)
    placement = rng.integers(0, 6, num_rows)
    item = rng.integers(0, 8, num_rows)
    ctr_prob = np.array([0.05, 0.15, 0.3, 0.5, 0.7, 0.9])[placement]
    cvr_prob = np.where(item % 2 == 0, 0.9, 0.1)
    click = (rng.random(num_rows) < ctr_prob).astype(np.int8)
    conversion = (rng.random(num_rows) < cvr_prob).astype(np.int8)
    table = pa.table(
        {
            "placement": pa.array([f"p{v}" for v in placement]),
            "item_id": pa.array([f"i{v}" for v in item]),
            "click": pa.array(click),
            "ctcvr": pa.array(click * conversion),
        }
    )
    return table, conversion


def test_entire_space_training_recovers_a_planted_cvr() -> None:
    dataset = DatasetSchema.model_validate(
        {
            "name": "planted-cvr",
            "columns": [
                {"name": "placement", "role": "categorical"},
                {"name": "item_id", "role": "categorical"},
                {"name": "click", "role": "label", "task": "ctr"},
                {"name": "ctcvr", "role": "label"},
            ],
        }
    )
    table, conversion = _planted_esmm_data(num_rows=4000, seed=0)
    schema = fit_feature_schema(dataset, [table])
    batch = batch_from_encoded(schema, schema.encode(table))
    model = _model(schema, tower_hidden_units=(8,)).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-2)
    for _ in range(150):
        optimizer.zero_grad()
        model.loss(model(batch.features), batch.labels).backward()
        optimizer.step()
    with torch.no_grad():
        probs = model.probabilities(model.eval()(batch.features))
    clicked = batch.labels["ctr"].numpy() == 1
    cvr_prob = probs["cvr"].numpy()[clicked]
    cvr_auc = auc(conversion[clicked], cvr_prob)
    assert cvr_auc > 0.85, f"CVR AUC on clicked rows {cvr_auc:.3f}"
    # Calibrated, not just ranked: pCVR is 0.9 / 0.1, whereas pCTCVR would be scaled by pCTR.
    items = np.array([int(v[1:]) for v in table["item_id"].to_pylist()])[clicked]
    planted = np.where(items % 2 == 0, 0.9, 0.1)
    assert np.abs(cvr_prob - planted).mean() < 0.08


# --- config and schema rules ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"tower_hidden_units": (16, 0)}, "tower_hidden_units"),
        ({"tower_dropout": 1.0}, "tower_dropout"),
        ({"objective": "clicked"}, "objective"),
        ({"towers": (16,)}, "towers"),
    ],
)
def test_config_errors_name_the_field(overrides: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError, match=field):
        ESMMConfig.model_validate(overrides)


def test_config_error_for_a_zero_width_says_how_to_fix_it() -> None:
    with pytest.raises(
        ValidationError, match=r"widths >= 1 \(got \(16, 0\)\).*tower_hidden_units="
    ):
        ESMMConfig(tower_hidden_units=(16, 0))


def test_schema_without_a_ctcvr_task_is_rejected() -> None:
    table = make_tiny_table(num_rows=32)
    schema = fit_feature_schema(ML100K_CTR_SCHEMA, [table])  # click -> ctr, no ctcvr label
    with pytest.raises(ConfigError, match=r"missing \['ctcvr'\].*task: ctcvr"):
        _model(schema)


def test_embedding_with_the_wrong_field_count_is_rejected(tiny_schema: FeatureSchema) -> None:
    small = DatasetSchema.model_validate(
        {
            "name": "one-field",
            "columns": [
                {"name": "item_id", "role": "categorical"},
                {"name": "click", "role": "label", "task": "ctr"},
            ],
        }
    )
    embedding = build_embedding(
        fit_feature_schema(small, [pa.table({"item_id": ["1"], "click": [1]})]),
        EmbeddingConfig(dim=4),
    )
    with pytest.raises(ConfigError, match="fields"):
        ESMM(ESMMConfig(), embedding, tiny_schema)
