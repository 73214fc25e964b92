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
# Every model on per-feature tables; every other embedding variant under AutoInt, plus a
# multi-task and a routed model on one each (a variant must not assume one model's forward).
CASES = [
    *[(name, "per_feature") for name in sorted(MODELS)],
    *[("autoint", variant) for variant in ("hashed", "unified", "mixed_dim", "lowrank")],
    ("esmm", "unified"),
    ("adaptdhm", "mixed_dim"),
]

model_names = pytest.mark.parametrize(
    ("name", "variant"), CASES, ids=[f"{name}-{variant}" for name, variant in CASES]
)


def tiny_embedding(variant: str, schema: FeatureSchema) -> EmbeddingConfig:
    """A D=4 config of `variant` for the tiny schema: half the collisionless budget for the
    hashed stacks; for mixed_dim two frequency blocks per field (the head keeps every dim, the
    tail two or none); for lowrank codes of width 2."""
    if variant == "per_feature":
        return TINY_EMBEDDING
    rows = sum(f.num_embeddings for f in schema.sparse)
    if variant in ("hashed", "unified"):
        return EmbeddingConfig.model_validate(
            {
                "variant": variant,
                "dim": 4,
                "param_budget": rows * 4 // 2,
                "unified": {"chunk_dim": 2},
            }
        )
    if variant == "mixed_dim":
        fields = {
            f.name: [
                {"end": max(2, f.num_embeddings // 3), "kept": [0, 1, 2, 3]},  # OOV + top ids
                {"end": f.num_embeddings, "kept": [1, 3] if index % 2 else []},
            ]
            for index, f in enumerate(schema.sparse)
            if f.num_embeddings >= 3
        }
        return EmbeddingConfig.model_validate(
            {"variant": "mixed_dim", "dim": 4, "mixed_dim": {"fields": fields}}
        )
    ranks = {f.name: 2 for f in schema.sparse}
    return EmbeddingConfig.model_validate(
        {"variant": "lowrank", "dim": 4, "lowrank": {"ranks": ranks}}
    )


def _build(
    name: str, schema: FeatureSchema, seed: int = 0, variant: str = "per_feature"
) -> CTRModel:
    torch.manual_seed(seed)
    config = MODELS[name].config_class.model_validate({"name": name, **TINY_CONFIGS[name]})
    return build_model(config, build_embedding(schema, tiny_embedding(variant, schema)), schema)


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
def test_constructor_takes_at_most_five_parameters(name: str, variant: str) -> None:
    params = inspect.signature(MODELS[name].model_class).parameters.values()
    assert len(params) <= 5, [p.name for p in params]
    assert all(p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params)


@model_names
def test_outputs_match_declared_tasks(
    name: str, variant: str, tiny_schema: FeatureSchema, tiny_batch: Batch
) -> None:
    model = _build(name, tiny_schema, variant=variant).eval()
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
    name: str, variant: str, tiny_schema: FeatureSchema, tiny_batch: Batch
) -> None:
    model = _build(name, tiny_schema, variant=variant).train()
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
    name: str, variant: str, tiny_schema: FeatureSchema, tiny_batch: Batch
) -> None:
    model = _build(name, tiny_schema, variant=variant).train()
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
    variant: str,
    tiny_schema: FeatureSchema,
    tiny_table: pa.Table,
    encode_batch: Callable[[pa.Table], Batch],
) -> None:
    model = _build(name, tiny_schema, variant=variant).eval()
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
    name: str, variant: str, tiny_schema: FeatureSchema, tiny_batch: Batch
) -> None:
    first = _scores(_build(name, tiny_schema, seed=0, variant=variant).eval(), tiny_batch)
    second = _scores(_build(name, tiny_schema, seed=0, variant=variant).eval(), tiny_batch)
    other = _scores(_build(name, tiny_schema, seed=1, variant=variant).eval(), tiny_batch)
    for task, scores in first.items():
        torch.testing.assert_close(second[task], scores, rtol=0, atol=0)
        assert not torch.equal(other[task], scores), f"{task}: the seed does not reach the init"


@model_names
def test_overfits_tiny_batch(
    name: str,
    variant: str,
    tiny_schema: FeatureSchema,
    tiny_table: pa.Table,
    encode_batch: Callable[[pa.Table], Batch],
) -> None:
    batch = encode_batch(tiny_table.slice(0, OVERFIT_ROWS))
    model = _build(name, tiny_schema, variant=variant).train()
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
    name: str, variant: str, tiny_schema: FeatureSchema, tiny_batch: Batch, tmp_path: Path
) -> None:
    model = _build(name, tiny_schema, variant=variant).eval()
    config = MODELS[name].config_class.model_validate({"name": name, **TINY_CONFIGS[name]})
    embedding = tiny_embedding(variant, tiny_schema)
    path = write_artifact(tmp_path, name, model, config, embedding, tiny_schema, {"auc": 0.5})
    loaded = load_artifact(path)
    assert loaded.model.served_tasks == model.served_tasks
    expected, got = _scores(model, tiny_batch), _scores(loaded.model, tiny_batch)
    for task in expected:
        torch.testing.assert_close(got[task], expected[task], rtol=0, atol=0)
