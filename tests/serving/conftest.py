"""Fixtures of the server tests: tiny artifacts, an in-process server on port 0, and a gate that
holds model forwards so tests can fill queues and catch loads in progress without timing.

The server runs in a background thread with its own asyncio loop (the way a real process runs
it); tests talk to it through a real gRPC channel with the blocking `ScoringClient`.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import pytest
import torch

from recsys.artifact import write_artifact
from recsys.data.movielens import ML100K_CTR_SCHEMA
from recsys.data.schema import DatasetSchema
from recsys.embeddings import EmbeddingConfig, build_embedding
from recsys.features.batch import Features, features_from_encoded
from recsys.features.schema import FeatureSchema, fit_feature_schema
from recsys.models.autoint import AutoIntConfig
from recsys.models.outputs import CTRModel, ModelOutput
from recsys.models.registry import build_model
from serving.client import ScoringClient
from serving.config import ServerConfig
from serving.model_manager import ModelManager, ModelTransform
from serving.server import create_server, shutdown
from tests.tiny_data import make_tiny_table

EMBEDDING = EmbeddingConfig(dim=4)
MODEL = AutoIntConfig(num_layers=1, attention_dim=8)
MODEL_NAME = "tiny"
WAIT_S = 60.0  # generous: the machine is small and shared

T = TypeVar("T")


# A second dataset with what ml100k-ctr lacks: integer vocabularies, integer bags, a bucketised
# and a standardised dense feature, and no domain column.
MIXED_SCHEMA = DatasetSchema.from_dict(
    {
        "name": "mixed",
        "columns": [
            {"name": "uid", "role": "categorical"},
            {"name": "iid", "role": "categorical"},
            {"name": "tags", "role": "multi_categorical"},
            {"name": "codes", "role": "multi_categorical"},
            {"name": "age", "role": "dense", "num_buckets": 3},
            {"name": "price", "role": "dense"},
            {"name": "click", "role": "label", "task": "ctr"},
        ],
        "user": {"id_column": "uid", "feature_columns": ["age"]},
        "item": {"id_column": "iid", "feature_columns": ["tags", "codes", "price"]},
    }
)


def mixed_table() -> pa.Table:
    return pa.table(
        {
            "uid": pa.array([1, 2, 3, 1, 2, 3], pa.int64()),
            "iid": ["a", "b", "c", "d", "a", "b"],
            "tags": pa.array(
                [["x"], ["y", "z"], [], ["x", "y"], ["x"], ["y", "z"]], pa.list_(pa.string())
            ),
            "codes": pa.array([[7], [8, 9], [7], [], [7], [8, 9]], pa.list_(pa.int64())),
            "age": [20.0, 30.0, 40.0, 20.0, 30.0, 40.0],
            "price": [1.0, 2.0, 3.0, 4.0, 1.0, 2.0],
            "click": pa.array([1, 0, 1, 0, 1, 0], pa.int8()),
        }
    )


def mixed_side_tables() -> dict[str, pa.Table]:
    """Side tables of the mixed dataset: users 1-3, items a-d."""
    return side_tables(mixed_table(), MIXED_SCHEMA)


@pytest.fixture(scope="session")
def mixed_schema() -> FeatureSchema:
    return fit_feature_schema(MIXED_SCHEMA, [mixed_table()])


@pytest.fixture(scope="session")
def tiny_table() -> pa.Table:
    return make_tiny_table(num_rows=200)


@pytest.fixture(scope="session")
def tiny_schema(tiny_table: pa.Table) -> FeatureSchema:
    return fit_feature_schema(ML100K_CTR_SCHEMA, [tiny_table])


def side_tables(table: pa.Table, dataset: DatasetSchema = ML100K_CTR_SCHEMA) -> dict[str, pa.Table]:
    """User and item features keyed by id (first occurrence), as the trainer exports them."""
    tables = {}
    for entity_name, entity in (("user", dataset.user), ("item", dataset.item)):
        if entity is None:
            continue
        columns = [entity.id_column, *entity.feature_columns]
        ids = table[entity.id_column].to_numpy(zero_copy_only=False)
        _, first = np.unique(ids, return_index=True)
        tables[entity_name] = table.select(columns).take(pa.array(np.sort(first)))
    return tables


def build_tiny_model(schema: FeatureSchema, seed: int) -> CTRModel:
    torch.manual_seed(seed)
    return build_model(MODEL, build_embedding(schema, EMBEDDING), schema).eval()


def write_version(
    repo: Path, schema: FeatureSchema, table: pa.Table, seed: int, name: str = MODEL_NAME
) -> Path:
    """Writes the next version of `name` (an untrained AutoInt whose weights depend on `seed`)."""
    model = build_tiny_model(schema, seed)
    metrics = {"auc": 0.5, "seed": seed}
    return write_artifact(repo, name, model, MODEL, EMBEDDING, schema, metrics, side_tables(table))


def eager_scores(schema: FeatureSchema, seed: int, table: pa.Table) -> np.ndarray:
    """The training path's ctr probabilities of raw rows for the model written with `seed`."""
    model = build_tiny_model(schema, seed)
    encoded = schema.encode(table, require_labels=False)
    with torch.inference_mode():
        probs = model.probabilities(model(features_from_encoded(schema, encoded)))
    return probs["ctr"].numpy()


@pytest.fixture
def repo(tmp_path: Path, tiny_schema: FeatureSchema, tiny_table: pa.Table) -> Path:
    """A model repository holding version 1 of `tiny` (seed 1)."""
    path = tmp_path / "repo"
    write_version(path, tiny_schema, tiny_table, seed=1)
    return path


def explicit_rows(table: pa.Table, user: str, items: list[str]) -> pa.Table:
    """What a client would send to score `items` for `user` with every feature spelled out,
    looked up here by hand from the training rows (first occurrence per id)."""
    rows = table.to_pylist()
    first_user = next(r for r in rows if r["user_id"] == user)
    first_item = {r["item_id"]: r for r in reversed(rows)}
    out = []
    for item in items:
        row = {c: first_user[c] for c in ("user_id", "age", "gender", "occupation", "zip3")}
        known = first_item.get(item)
        row["item_id"] = item
        row["release_year"] = known["release_year"] if known else None
        row["genres"] = known["genres"] if known else None
        out.append(row)
    return pa.Table.from_pylist(out, schema=table.select([*out[0]]).schema if out else None)


class Gate:
    """Holds every model forward while closed; counts forwards that are waiting or ran."""

    def __init__(self) -> None:
        self._open = threading.Event()
        self._open.set()
        self.waiting = 0
        self.calls = 0
        self.fail = False
        self._lock = threading.Lock()

    def close(self) -> None:
        self._open.clear()

    def open(self) -> None:
        self._open.set()

    def passage(self) -> None:
        with self._lock:
            self.waiting += 1
        try:
            if not self._open.wait(WAIT_S):
                raise TimeoutError("gate: the test never opened the gate")
        finally:
            with self._lock:
                self.waiting -= 1
                self.calls += 1
        if self.fail:
            raise RuntimeError("gate: simulated failure inside the model")

    def wait_for_waiting(self, count: int = 1) -> None:
        wait_until(lambda: self.waiting >= count, f"{count} forward(s) held at the gate")

    def transform(self, model: CTRModel) -> CTRModel:
        return GatedModel(model, self)


class GatedModel(CTRModel):
    """A served model whose forward passes through a Gate first (the test's transform hook)."""

    def __init__(self, inner: CTRModel, gate: Gate) -> None:
        super().__init__()
        self.inner = inner
        self.gate = gate
        self.trained_tasks = inner.trained_tasks

    @property
    def served_tasks(self) -> tuple[str, ...]:
        return self.inner.served_tasks

    def forward(self, features: Features) -> ModelOutput:
        self.gate.passage()
        return self.inner(features)

    def probabilities(self, output: ModelOutput) -> dict[str, torch.Tensor]:
        return self.inner.probabilities(output)


def self_signed_cert(folder: Path, name: str = "cert") -> tuple[Path, Path]:
    """A 1-day self-signed certificate for localhost and 127.0.0.1 and its unencrypted key,
    made by openssl (the test is skipped without it)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed")
    cert, key = folder / f"{name}.pem", folder / f"{name}.key"
    subprocess.run(
        [
            *(openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost"),
            *("-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return cert, key


def wait_until(predicate: Callable[[], bool], what: str, timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(0.02)


class ServerThread:
    """`create_server` in a background event loop; stopped (gracefully) by the fixture."""

    def __init__(self, cfg: ServerConfig, transform: ModelTransform | None = None) -> None:
        self.cfg = cfg
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.models = ModelManager.from_config(cfg, transform=transform)
        self.server, self.port = self.run(create_server(cfg, self.models))
        self.run(self.server.start())
        self.shut_down = False

    @property
    def address(self) -> str:
        return f"{self.cfg.host}:{self.port}"

    def run(self, coro: Coroutine[Any, Any, T], timeout_s: float = WAIT_S) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def client(self, **kwargs: Any) -> ScoringClient:
        return ScoringClient(self.address, timeout_s=WAIT_S, **kwargs)

    def wait_serving(self, service: str = "") -> None:
        with self.client() as client:
            wait_until(lambda: client.health(service) == "SERVING", f"health '{service}' SERVING")

    def stop(self, grace_s: float = 5.0) -> None:
        if self.loop.is_running():
            if not self.shut_down:
                self.run(shutdown(self.server, grace_s, drain_s=0.0))
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(WAIT_S)
            self.loop.close()


StartServer = Callable[..., ServerThread]


@pytest.fixture
def start_server() -> Iterator[StartServer]:
    """Starts servers on port 0: `start_server(repo, transform=None, **config_overrides)`."""
    servers: list[ServerThread] = []

    def start(
        repo: Path, transform: ModelTransform | None = None, **overrides: Any
    ) -> ServerThread:
        values: dict[str, Any] = {"model_repo": repo, "port": 0, "poll_interval_s": 0.2}
        values.update(overrides)
        server = ServerThread(ServerConfig(**values), transform)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()
