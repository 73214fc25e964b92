"""Quantized serving tables (`serving.quantize`): storage, bytes, scores and pooling.

A briefly trained tiny AutoInt artifact (D=16) is loaded, quantized to int8 or int4 and scored
through `recsys.artifact.score_table`, the path the server's eager reference uses. Byte counts
are checked against fbgemm's layout rules written out here independently: a row holds
ceil(D * bits / 8) code bytes plus a 4-byte fp16 scale and bias, padded to `row_alignment`
bytes, and every table starts on a 128-byte cache line.
"""

from __future__ import annotations

import gc
import math
import weakref
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.quant.embedding_modules import (
    EmbeddingBagCollection as QuantEmbeddingBagCollection,
)

from recsys.artifact import load_artifact, score_table, write_artifact
from recsys.data.movielens import ML100K_CTR_SCHEMA
from recsys.data.schema import DatasetSchema
from recsys.embeddings import EmbeddingConfig, build_embedding
from recsys.errors import ConfigError
from recsys.features.batch import batch_from_encoded, features_from_encoded
from recsys.features.schema import FeatureSchema, fit_feature_schema
from recsys.metrics import auc
from recsys.models.autoint import AutoInt, AutoIntConfig
from recsys.models.outputs import CTRModel
from recsys.models.registry import build_model
from serving.quantize import (
    QuantDtype,
    embedding_bytes,
    fp32_embedding_bytes,
    quantize_tables,
    quantize_transform,
)
from tests.tiny_data import make_tiny_table

DIM = 16
EMBEDDING = EmbeddingConfig(dim=DIM)
MODEL = AutoIntConfig(num_layers=1, attention_dim=8)
TRAIN_STEPS = 30
BITS = {"int8": 8, "int4": 4}
SCALE_BIAS_BYTES = 4
CACHE_LINE_BYTES = 128
# Probability tolerances vs fp32 on the trained tiny model; int4 has 16 levels per row.
MAX_PROB_DIFF = {"int8": 1e-2, "int4": 1e-1}
MAX_AUC_DELTA = {"int8": 1e-3, "int4": 1e-2}

dtypes = pytest.mark.parametrize("dtype", ["int8", "int4"])


@pytest.fixture(scope="module")
def table() -> pa.Table:
    return make_tiny_table()


@pytest.fixture(scope="module")
def schema(table: pa.Table) -> FeatureSchema:
    return fit_feature_schema(ML100K_CTR_SCHEMA, [table])


@pytest.fixture(scope="module")
def artifact_path(
    table: pa.Table, schema: FeatureSchema, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A tiny AutoInt trained for a few steps (scores spread out, AUC well above 0.5)."""
    torch.manual_seed(0)
    model = build_model(MODEL, build_embedding(schema, EMBEDDING), schema)
    batch = batch_from_encoded(schema, schema.encode(table))
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-2)
    for _ in range(TRAIN_STEPS):
        optimizer.zero_grad()
        model.loss(model(batch.features), batch.labels).backward()
        optimizer.step()
    repo = tmp_path_factory.mktemp("repo")
    return write_artifact(repo, "m", model.eval(), MODEL, EMBEDDING, schema, {"auc": 0.0})


def _load(path: Path) -> CTRModel:
    return load_artifact(path).model


def _labels(table: pa.Table) -> torch.Tensor:
    return torch.from_numpy(table["click"].to_numpy().astype(np.float32))


def _tensors(value: object) -> Iterator[torch.Tensor]:
    """Tensors held by an attribute value, looking into lists, tuples and dicts."""
    if isinstance(value, torch.Tensor):
        # a UInt4Tensor wraps its packed uint8 bytes in `elem`
        yield getattr(value, "elem", value)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)


def _reachable_storages(model: nn.Module) -> dict[tuple[int, torch.dtype], int]:
    """Every tensor storage any submodule holds (parameters, buffers, plain attributes)."""
    storages: dict[tuple[int, torch.dtype], int] = {}
    for module in model.modules():
        for tensor in _tensors(vars(module)):
            if tensor.numel():
                storage = tensor.untyped_storage()
                storages[(storage.data_ptr(), tensor.dtype)] = storage.nbytes()
    return storages


def _expected_bytes(
    model: nn.Module, dtype: QuantDtype, row_alignment: int = 16
) -> tuple[int, int]:
    """(quantized, fp32) table bytes from fbgemm's layout rules, from the fp32 model's tables."""
    quantized = fp32 = 0
    for module in model.modules():
        if isinstance(module, EmbeddingBagCollection):
            for table in module.embedding_bag_configs():
                rows, dim = table.num_embeddings, table.embedding_dim
                row_bytes = math.ceil(dim * BITS[dtype] / 8) + SCALE_BIAS_BYTES
                padded_row = math.ceil(row_bytes / row_alignment) * row_alignment
                quantized += math.ceil(rows * padded_row / CACHE_LINE_BYTES) * CACHE_LINE_BYTES
                fp32 += rows * dim * 4
    return quantized, fp32


def _large_model(dim: int) -> AutoInt:
    """An AutoInt whose tables are large enough (20k users, 5k items) that the 128-byte table
    alignment is negligible, as on real data."""
    num_rows = 20_000
    rng = np.random.default_rng(0)
    dataset = DatasetSchema.model_validate(
        {
            "name": "large",
            "columns": [
                {"name": "user_id", "role": "categorical"},
                {"name": "item_id", "role": "categorical"},
                {"name": "genres", "role": "multi_categorical"},
                {"name": "click", "role": "label", "task": "ctr"},
            ],
        }
    )
    rows = pa.table(
        {
            "user_id": [f"u{i}" for i in range(num_rows)],
            "item_id": [f"i{i % 5_000}" for i in range(num_rows)],
            "genres": [
                [f"g{g}" for g in rng.choice(18, 2, replace=False)] for _ in range(num_rows)
            ],
            "click": rng.integers(0, 2, num_rows).astype(np.int8),
        }
    )
    schema = fit_feature_schema(dataset, [rows])
    config = AutoIntConfig(num_layers=1, attention_dim=8)
    return AutoInt(config, build_embedding(schema, EmbeddingConfig(dim=dim)), schema)


@dtypes
def test_served_tables_hold_uint8_weights_and_no_float_copy(
    artifact_path: Path, dtype: QuantDtype
) -> None:
    model = _load(artifact_path)
    params = [
        param
        for module in model.modules()
        if isinstance(module, EmbeddingBagCollection)
        for param in module.parameters()
    ]
    table_shapes = {tuple(param.shape) for param in params}
    fp32_tables = [weakref.ref(param) for param in params]
    del params
    quantized = quantize_transform(dtype)(model)  # what the model manager applies, in place
    del model
    gc.collect()
    assert all(ref() is None for ref in fp32_tables), "an fp32 table outlived quantization"

    assert not any(isinstance(m, EmbeddingBagCollection) for m in quantized.modules())
    collections = [m for m in quantized.modules() if isinstance(m, QuantEmbeddingBagCollection)]
    assert len(collections) == 1
    served = dict(collections[0].named_buffers())
    for table in collections[0].embedding_bag_configs():
        assert served[f"embedding_bags.{table.name}.weight"].dtype == torch.uint8
    for name, tensor in [*quantized.named_parameters(), *quantized.named_buffers()]:
        assert not (tensor.is_floating_point() and tuple(tensor.shape) in table_shapes), name

    # Beyond the served uint8 storage, only a few bytes of uint8 metadata (fbgemm's per-table
    # type codes) may be held: no second, unpadded copy of the quantized rows.
    storages = _reachable_storages(quantized)
    uint8_bytes = sum(n for (_, dt), n in storages.items() if dt == torch.uint8)
    assert embedding_bytes(quantized) <= uint8_bytes < embedding_bytes(quantized) + 64
    # Every float storage is a registered dense parameter or buffer (attention, output layer).
    registered = {
        t.untyped_storage().data_ptr()
        for t in [*quantized.parameters(), *quantized.buffers()]
        if t.is_floating_point()
    }
    assert {ptr for (ptr, dt), _ in storages.items() if dt.is_floating_point} <= registered


@dtypes
def test_quantized_scores_stay_close_to_fp32_through_score_table(
    artifact_path: Path, table: pa.Table, dtype: QuantDtype
) -> None:
    artifact = load_artifact(artifact_path)
    fp32_prob = score_table(artifact.model, artifact.schema, table)["ctr"]
    quantized = quantize_tables(artifact.model, dtype)
    quantized_prob = score_table(quantized, artifact.schema, table)["ctr"]

    assert quantized is not artifact.model and not quantized.training
    # the input model is left untouched when not in place
    torch.testing.assert_close(
        score_table(artifact.model, artifact.schema, table)["ctr"], fp32_prob, rtol=0, atol=0
    )
    max_diff = (quantized_prob - fp32_prob).abs().max().item()
    assert 0 < max_diff < MAX_PROB_DIFF[dtype]  # > 0: the quantized tables are really used
    labels = _labels(table)
    fp32_auc, quantized_auc = auc(labels, fp32_prob), auc(labels, quantized_prob)
    assert fp32_auc > 0.75, f"the fixture model did not train (AUC {fp32_auc:.3f})"
    assert abs(quantized_auc - fp32_auc) < MAX_AUC_DELTA[dtype]


def test_mean_pooled_bags_equal_the_mean_of_dequantized_rows(
    artifact_path: Path, schema: FeatureSchema, table: pa.Table
) -> None:
    fp32_model = _load(artifact_path)
    quantized = quantize_tables(fp32_model, "int8")
    features = features_from_encoded(schema, schema.encode(table, require_labels=False))
    bags = features.sparse["genres"]
    assert bags.lengths().max() >= 3  # the tiny table has multi-genre bags

    # Dequantize the served int8 rows by hand: [fp16 scale | fp16 bias | D codes | padding].
    rows = quantized.get_buffer("embedding.tables.embedding_bags.t_genres.weight")
    scale = rows[:, 0:2].contiguous().view(torch.float16).float()
    bias = rows[:, 2:4].contiguous().view(torch.float16).float()
    dequantized = rows[:, 4 : 4 + DIM].float() * scale + bias  # (rows, D)
    segments = torch.repeat_interleave(torch.arange(len(bags.lengths())), bags.lengths())
    expected = torch.zeros(len(bags.lengths()), DIM).index_add_(
        0, segments, dequantized[bags.values()]
    ) / bags.lengths().unsqueeze(-1)

    field = schema.sparse_names.index("genres")
    with torch.inference_mode():
        got = quantized.get_submodule("embedding")(features)[:, field]  # (B, D)
        fp32 = fp32_model.get_submodule("embedding")(features)[:, field]
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    # and within half a quantization step (plus fp16 rounding) of the fp32 mean
    torch.testing.assert_close(got, fp32, rtol=0, atol=0.51 * scale.max().item() + 1e-3)


@pytest.mark.parametrize(
    ("dtype", "row_alignment"), [("int8", 16), ("int4", 16), ("int8", 1), ("int4", 1)]
)
def test_embedding_bytes_follow_the_padding_rules(
    schema: FeatureSchema, dtype: QuantDtype, row_alignment: int
) -> None:
    torch.manual_seed(0)
    model = build_model(MODEL, build_embedding(schema, EMBEDDING), schema)
    expected, fp32 = _expected_bytes(model, dtype, row_alignment)
    assert embedding_bytes(model) == fp32_embedding_bytes(model) == fp32
    quantized = quantize_tables(model, dtype, row_alignment=row_alignment)
    assert embedding_bytes(quantized) == expected
    assert fp32_embedding_bytes(quantized) == fp32


@pytest.mark.parametrize(
    ("dtype", "dim", "max_ratio"),
    [("int8", 16, 0.55), ("int8", 32, 0.40), ("int8", 64, 0.33), ("int4", 16, 0.30)],
)
def test_large_tables_shrink_to_the_padded_row_ratio(
    dtype: QuantDtype, dim: int, max_ratio: float
) -> None:
    model = _large_model(dim)
    expected, fp32 = _expected_bytes(model, dtype)
    quantized = quantize_tables(model, dtype, inplace=True)
    assert embedding_bytes(quantized) == expected
    assert embedding_bytes(quantized) / fp32 <= max_ratio


def test_rejects_what_it_cannot_quantize(schema: FeatureSchema) -> None:
    odd = build_model(MODEL, build_embedding(schema, EmbeddingConfig(dim=6)), schema)
    with pytest.raises(ConfigError, match=r"embedding_dim 6.*as int4 \(expected a multiple of 4"):
        quantize_tables(odd, "int4")
    with pytest.raises(ConfigError, match="unknown table dtype 'int2'"):
        quantize_tables(odd, "int2")  # type: ignore[arg-type]  # as an unchecked CLI string
    quantized = quantize_tables(odd, "int8")
    with pytest.raises(ConfigError, match=r"no fp32 EmbeddingBagCollection.*quantized already"):
        quantize_tables(quantized, "int8")
