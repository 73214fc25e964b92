"""The model manager on its own (no gRPC): warm-up seeding of the admission estimate, one bad
model folder never blocking the others, roll back to an older version when the newest is
deleted, and queue gauges of evicted versions."""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from collections.abc import Coroutine
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TypeVar

import grpc
import numpy as np
import pyarrow as pa
import pytest

from recsys.artifact import write_artifact
from recsys.features.schema import FeatureSchema
from recsys.models.outputs import CTRModel
from serving import model_manager
from serving._pb.recsys.v1 import scoring_pb2 as pb
from serving.batcher import BatcherConfig
from serving.client import rows_request
from serving.errors import RequestError
from serving.interceptors import status_for
from serving.model_manager import ModelManager
from tests.serving.conftest import (
    EMBEDDING,
    MODEL,
    MODEL_NAME,
    WAIT_S,
    Gate,
    GatedModel,
    build_tiny_model,
    mixed_side_tables,
    write_version,
)

T = TypeVar("T")

MIXED_ROWS = {
    "uid": [1, 2],
    "iid": ["a", "b"],
    "tags": [["x"], ["y"]],
    "codes": [[7], [8]],
    "age": [20.0, 30.0],
    "price": [1.0, 2.0],
}


def _run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, WAIT_S))


def _request(schema: FeatureSchema, table: pa.Table) -> pb.ScoreRequest:
    return rows_request(MODEL_NAME, table.select(schema.dataset.input_columns()).slice(0, 2))


class _FakeClock:
    """`time` for the model manager: forwards advance it, 100 s the first, 1 ms afterwards
    (a model whose first forward pays a one-off cost, as lazy CUDA or JIT init do)."""

    def __init__(self) -> None:
        self.now = 0.0
        self.forwards = 0

    def perf_counter(self) -> float:
        return self.now

    def passage(self) -> None:
        self.now += 100.0 if self.forwards == 0 else 0.001
        self.forwards += 1


def test_only_the_last_warm_up_pass_seeds_the_deadline_estimate(
    repo: Path,
    tiny_schema: FeatureSchema,
    tiny_table: pa.Table,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = _FakeClock()
    monkeypatch.setattr(
        model_manager,
        "time",
        SimpleNamespace(perf_counter=clock.perf_counter, monotonic=time.monotonic),
    )

    def slow_first(model: CTRModel) -> CTRModel:
        return GatedModel(model, clock)  # type: ignore[arg-type]  # a Gate by duck typing

    async def go() -> None:
        manager = ModelManager(repo, poll_interval_s=3600, transform=slow_first)
        await manager.refresh()
        loaded = manager.get(MODEL_NAME)
        assert clock.forwards == 2
        assert loaded.batcher.batch_latency_s == pytest.approx(0.001)
        # a deadline far above the steady latency but below the first pass is scored
        scores = await loaded.score(_request(tiny_schema, tiny_table), 30.0)
        assert scores["ctr"].shape == (2,)
        await manager.close()

    _run(go())


@pytest.fixture
def mixed_repo(tmp_path: Path, mixed_schema: FeatureSchema) -> Path:
    """A repository holding version 1 of `mixed` (integer ids, bags, a standardised price)."""
    path = tmp_path / "repo"
    model = build_tiny_model(mixed_schema, 1)
    write_artifact(
        path, "mixed", model, MODEL, EMBEDDING, mixed_schema, {"auc": 0.5}, mixed_side_tables()
    )
    return path


def test_a_row_scoring_nan_is_refused_by_row_while_its_batch_mates_are_scored(
    mixed_repo: Path,
) -> None:
    async def go() -> list[Any]:
        # the batch closes at 4 rows: both 2-row requests share one forward pass
        config = BatcherConfig(max_batch_rows=4, max_wait_s=WAIT_S)
        manager = ModelManager(mixed_repo, batcher=config, poll_interval_s=3600)
        await manager.refresh()
        loaded = manager.get("mixed")
        # 1e30 standardises to a finite float32 but overflows inside the model: NaN
        bad = rows_request("mixed", {**MIXED_ROWS, "price": [2.0, 1e30]})
        good = rows_request("mixed", MIXED_ROWS)
        results = await asyncio.gather(
            loaded.score(bad, None), loaded.score(good, None), return_exceptions=True
        )
        registry = manager.metrics.registry
        assert registry.get_sample_value("recsys_batch_rows_count") == 1
        await manager.close()
        return list(results)

    error, scores = _run(go())
    assert isinstance(error, RequestError), error
    assert status_for(error) == grpc.StatusCode.INVALID_ARGUMENT
    assert (error.field, error.row) == ("price", 1)
    assert "score ctr=nan" in str(error) and "price=1e+30" in str(error)
    assert isinstance(scores, dict) and np.isfinite(scores["ctr"]).all()
    assert scores["ctr"].shape == (2,)


def test_a_model_folder_that_cannot_be_listed_does_not_block_the_others(
    repo: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # "²".isdigit() is True but int("²") fails: listing `other` raises
    (repo / "other" / "\u00b2").mkdir(parents=True)
    caplog.set_level(logging.WARNING, logger="serving.model_manager")

    async def go() -> None:
        manager = ModelManager(repo, poll_interval_s=3600)
        await manager.refresh()
        await manager.refresh()
        assert manager.ready
        assert manager.get(MODEL_NAME).version == 1
        assert dict(manager.statuses) == {"": True, MODEL_NAME: True}
        await manager.close()

    _run(go())
    warnings = [r.getMessage() for r in caplog.records if "model 'other'" in r.getMessage()]
    assert len(warnings) == 1, warnings  # once, not once per scan
    assert "cannot list the versions of model 'other'" in warnings[0]


def test_deleting_the_newest_version_rolls_back_to_the_older_one_on_disk(
    repo: Path, tiny_schema: FeatureSchema, tiny_table: pa.Table
) -> None:
    write_version(repo, tiny_schema, tiny_table, seed=2)

    async def go() -> None:
        manager = ModelManager(repo, poll_interval_s=3600, max_versions_per_model=1)
        await manager.refresh()
        assert manager.loaded_versions(MODEL_NAME) == [2]
        shutil.rmtree(repo / MODEL_NAME / "2")
        await manager.refresh()
        assert manager.loaded_versions(MODEL_NAME) == [1]
        assert manager.get(MODEL_NAME).version == 1
        await manager.close()

    _run(go())


def test_an_evicted_versions_queue_gauge_stays_gone_after_its_last_requests(
    repo: Path, tiny_schema: FeatureSchema, tiny_table: pa.Table
) -> None:
    gate = Gate()
    loads: list[int] = []

    def gate_first_version(model: CTRModel) -> CTRModel:
        loads.append(1)
        return gate.transform(model) if len(loads) == 1 else model

    def queue_series(manager: ModelManager) -> list[str]:
        lines = manager.metrics.render().splitlines()
        return [line for line in lines if line.startswith("recsys_queue_rows{")]

    async def go() -> None:
        manager = ModelManager(
            repo, poll_interval_s=3600, max_versions_per_model=1, transform=gate_first_version
        )
        await manager.refresh()
        first = manager.get(MODEL_NAME)
        request = _request(tiny_schema, tiny_table)
        gate.close()
        scoring = asyncio.ensure_future(first.score(request, None))
        await asyncio.to_thread(gate.wait_for_waiting, 1)
        queued = asyncio.ensure_future(first.score(request, None))
        while first.batcher.queued_rows == 0:
            await asyncio.sleep(0.005)
        write_version(repo, tiny_schema, tiny_table, seed=2)
        await manager.refresh()  # evicts version 1 while it still holds two requests
        assert manager.loaded_versions(MODEL_NAME) == [2]
        gate.open()
        await asyncio.gather(scoring, queued)
        assert queue_series(manager) == []
        await manager.get(MODEL_NAME).score(request, None)
        assert queue_series(manager) == ['recsys_queue_rows{model="tiny",version="2"} 0.0']
        await manager.close()

    _run(go())
