"""Every registered model is served over real gRPC with all of its tasks: ESMM answers ctr,
cvr and ctcvr, AdaptDHM its routed towers (cluster centres loaded from the artifact), and each
task's scores equal the eager model's. So is AutoInt on every embedding variant (hashed,
unified, mixed-dimension, low-rank tables): the server rebuilds the stack from config.json."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from recsys.artifact import write_artifact
from recsys.embeddings import build_embedding
from recsys.features.batch import features_from_encoded
from recsys.features.schema import FeatureSchema, fit_feature_schema
from recsys.models.registry import MODELS, build_model
from tests.recsys.models.test_model_contract import TINY_CONFIGS, tiny_embedding
from tests.serving.conftest import StartServer, side_tables
from tests.tiny_data import TINY_MULTITASK_SCHEMA, make_tiny_table, with_ctcvr


@pytest.fixture(scope="module")
def table() -> pa.Table:
    return with_ctcvr(make_tiny_table(num_rows=300, seed=5))


@pytest.fixture(scope="module")
def schema(table: pa.Table) -> FeatureSchema:
    return fit_feature_schema(TINY_MULTITASK_SCHEMA, [table])


CASES = [
    *[(name, "per_feature") for name in sorted(MODELS)],
    *[("autoint", variant) for variant in ("hashed", "unified", "mixed_dim", "lowrank")],
]


@pytest.mark.parametrize(("name", "variant"), CASES, ids=[f"{n}-{v}" for n, v in CASES])
def test_every_model_is_served_with_all_its_tasks(
    name: str,
    variant: str,
    tmp_path: Path,
    start_server: StartServer,
    schema: FeatureSchema,
    table: pa.Table,
) -> None:
    torch.manual_seed(3)
    config = MODELS[name].config_class.model_validate({"name": name, **TINY_CONFIGS[name]})
    embedding = tiny_embedding(variant, schema)
    model = build_model(config, build_embedding(schema, embedding), schema)
    # a few training-mode forwards move state that only training changes (AdaptDHM's centres,
    # batch-norm statistics), so the served model must load it from the artifact
    encoded = schema.encode(table)
    with torch.no_grad():
        for start in range(0, 300, 100):
            model.train()(features_from_encoded(schema, encoded.slice(start, 100)))
    model.eval()
    repo = tmp_path / "repo"
    write_artifact(repo, name, model, config, embedding, schema, {"auc": 0.5}, side_tables(table))
    raw = table.select(schema.dataset.input_columns()).slice(0, 32)
    with torch.inference_mode():
        eager = model.probabilities(
            model(features_from_encoded(schema, schema.encode(raw, require_labels=False)))
        )

    server = start_server(repo)
    server.wait_serving()
    with server.client() as client:
        result = client.score_rows(name, raw)
        info = client.model_info(name)
    assert set(result.scores) == set(model.served_tasks) == set(info.tasks)
    for task, expected in eager.items():
        np.testing.assert_allclose(result.scores[task], expected.numpy(), rtol=0, atol=1e-6)
