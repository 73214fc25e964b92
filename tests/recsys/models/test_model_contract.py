"""The model contract suite (STYLE.md section 11): every entry of `MODELS` must pass it.

A new model adds one line to TINY_CONFIGS: a small config that still exercises every branch
(all heads, all towers). Each test builds the model through the registry around the per-feature
embedding and runs it on the tiny ml100k-ctr-like batch from conftest.py.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
import torch
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from recsys.artifact import load_artifact, write_artifact
from recsys.embeddings import EmbeddingConfig, build_embedding
from recsys.features.batch import Batch
from recsys.features.schema import FeatureSchema
from recsys.metrics import auc
from recsys.models.outputs import CTRModel, ModelOutput
from recsys.models.registry import MODELS, build_model

# Registry name -> the fields of a tiny config (the registry key is added as `name`).
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "autoint": {"num_layers": 2, "num_heads": 2, "attention_dim": 8, "dnn_hidden_units": (16,)},
    "armnet": {
        "num_heads": 2,
        "num_neurons": 8,
        "mlp_hidden_units": (16,),
        "use_ensemble": True,
        "dnn_hidden_units": (16,),
    },
    "esmm": {"tower_hidden_units": (16, 8)},
    "adaptdhm": {"num_clusters": 3, "bottom_hidden_units": (32,), "tower_hidden_units": (16,)},
    "shared_bottom": {"bottom_hidden_units": (32,), "tower_hidden_units": (16,)},
    "per_domain_towers": {"bottom_hidden_units": (32,), "tower_hidden_units": (16,)},
}
# D = 4 differs from every tiny attention width, so projections from D are exercised too.
TINY_EMBEDDING = EmbeddingConfig(dim=4)
OVERFIT_ROWS = 256
OVERFIT_STEPS = 200

model_names = pytest.mark.parametrize("name", sorted(MODELS))


def _build(name: str, schema: FeatureSchema, seed: int = 0) -> CTRModel:
    torch.manual_seed(seed)
    config = MODELS[name].config_class.model_validate({"name": name, **TINY_CONFIGS[name]})
    return build_model(config, build_embedding(schema, TINY_EMBEDDING), schema)


def _loss(model: CTRModel, output: ModelOutput, batch: Batch) -> torch.Tensor:
    """The model's own training objective (what the trainer minimises)."""
    return model.loss(output, batch.labels)


def _table_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """The EmbeddingBagCollection weights (the sharded tables), by qualified name."""
    tables: dict[str, nn.Parameter] = {}
    for module_name, module in model.named_modules():
        if isinstance(module, EmbeddingBagCollection):
            for name, param in module.named_parameters():
                tables[f"{module_name}.{name}"] = param
    return tables


def _scores(model: CTRModel, batch: Batch) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return model.probabilities(model(batch.features))


def test_every_registered_model_has_a_tiny_config() -> None:
    assert set(TINY_CONFIGS) == set(MODELS)


@model_names
def test_constructor_takes_at_most_five_parameters(name: str) -> None:
    params = inspect.signature(MODELS[name].model_class).parameters.values()
    assert len(params) <= 5, [p.name for p in params]
    assert all(p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params)


@model_names
def test_outputs_match_declared_tasks(
    name: str, tiny_schema: FeatureSchema, tiny_batch: Batch
) -> None:
    model = _build(name, tiny_schema).eval()
    output = model(tiny_batch.features)
    probs = model.probabilities(output)
    assert set(probs) == set(model.served_tasks)
    assert set(output.logits) <= set(model.served_tasks)
    assert set(output.logits) == set(model.trained_tasks)
    for task, tensor in [*output.logits.items(), *probs.items()]:
        assert tensor.shape == (tiny_batch.batch_size,), task
        assert torch.isfinite(tensor).all(), task
    for task, prob in probs.items():
        assert ((prob >= 0) & (prob <= 1)).all(), task


@model_names
def test_every_dense_parameter_gets_a_gradient(
    name: str, tiny_schema: FeatureSchema, tiny_batch: Batch
) -> None:
    model = _build(name, tiny_schema).train()
    _loss(model, model(tiny_batch.features), tiny_batch).backward()
    table_ids = {id(p) for p in _table_params(model).values()}
    dense = [
        (param_name, param)
        for param_name, param in model.named_parameters()
        if param.requires_grad and id(param) not in table_ids
    ]
    assert dense
    for param_name, param in dense:
        if param.numel() == 0:  # e.g. the dense-feature vectors of a schema without dense columns
            continue
        assert param.grad is not None, f"{param_name} gets no gradient"
        assert torch.isfinite(param.grad).all(), f"{param_name} has a non-finite gradient"
        assert param.grad.abs().sum() > 0, f"{param_name} has an all-zero gradient"


@model_names
def test_tables_change_after_one_step(
    name: str, tiny_schema: FeatureSchema, tiny_batch: Batch
) -> None:
    model = _build(name, tiny_schema).train()
    tables = _table_params(model)
    assert tables, "the model has no EmbeddingBagCollection tables"
    before = {table: param.detach().clone() for table, param in tables.items()}
    optimizer = torch.optim.Adagrad(model.parameters(), lr=0.1)
    _loss(model, model(tiny_batch.features), tiny_batch).backward()
    optimizer.step()
    unchanged = [table for table, param in tables.items() if torch.equal(param, before[table])]
    assert not unchanged, f"tables unchanged after one step: {unchanged}"


@model_names
def test_rows_are_scored_independently_in_eval(
    name: str,
    tiny_schema: FeatureSchema,
    tiny_table: pa.Table,
    encode_batch: Callable[[pa.Table], Batch],
) -> None:
    model = _build(name, tiny_schema).eval()
    full = _scores(model, encode_batch(tiny_table))
    perm = torch.randperm(tiny_table.num_rows, generator=torch.Generator().manual_seed(0))
    permuted = _scores(model, encode_batch(tiny_table.take(pa.array(perm.numpy()))))
    # A permutation-equivariant batch coupling (e.g. subtracting the batch mean) passes the
    # permutation check, so a small sub-batch must also score its rows as the full batch does.
    head = _scores(model, encode_batch(tiny_table.slice(0, 7)))
    for task, scores in full.items():
        torch.testing.assert_close(permuted[task], scores[perm], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(head[task], scores[:7], rtol=1e-5, atol=1e-6)


@model_names
def test_same_seed_gives_same_output(
    name: str, tiny_schema: FeatureSchema, tiny_batch: Batch
) -> None:
    first = _scores(_build(name, tiny_schema, seed=0).eval(), tiny_batch)
    second = _scores(_build(name, tiny_schema, seed=0).eval(), tiny_batch)
    other = _scores(_build(name, tiny_schema, seed=1).eval(), tiny_batch)
    for task, scores in first.items():
        torch.testing.assert_close(second[task], scores, rtol=0, atol=0)
        assert not torch.equal(other[task], scores), f"{task}: the seed does not reach the init"


@model_names
def test_overfits_tiny_batch(
    name: str,
    tiny_schema: FeatureSchema,
    tiny_table: pa.Table,
    encode_batch: Callable[[pa.Table], Batch],
) -> None:
    batch = encode_batch(tiny_table.slice(0, OVERFIT_ROWS))
    model = _build(name, tiny_schema).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(OVERFIT_STEPS):
        optimizer.zero_grad()
        _loss(model, model(batch.features), batch).backward()
        optimizer.step()
    scores = _scores(model.eval(), batch)
    for task, label in batch.labels.items():
        if task in scores:
            train_auc = auc(label, scores[task])
            assert train_auc > 0.95, f"{task}: train AUC {train_auc:.3f} after {OVERFIT_STEPS}"


# --- artifact round-trip (saved-then-loaded artifact gives identical outputs) -----------------
@model_names
def test_artifact_round_trip_gives_identical_outputs(
    name: str, tiny_schema: FeatureSchema, tiny_batch: Batch, tmp_path: Path
) -> None:
    model = _build(name, tiny_schema).eval()
    config = MODELS[name].config_class.model_validate({"name": name, **TINY_CONFIGS[name]})
    path = write_artifact(tmp_path, name, model, config, TINY_EMBEDDING, tiny_schema, {"auc": 0.5})
    loaded = load_artifact(path)
    assert loaded.model.served_tasks == model.served_tasks
    expected, got = _scores(model, tiny_batch), _scores(loaded.model, tiny_batch)
    for task in expected:
        torch.testing.assert_close(got[task], expected[task], rtol=0, atol=0)
