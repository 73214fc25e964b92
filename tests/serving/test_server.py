"""The scoring server in-process on port 0, through real gRPC channels: parity with the eager
model for both request shapes, health, every status rule, hot swap, a corrupt version,
auth, reflection, request ids and metrics."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pyarrow as pa
import pytest
import torch
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from recsys.artifact import WEIGHTS, write_artifact
from recsys.features.schema import FeatureSchema
from serving._pb.recsys.v1 import scoring_pb2 as pb
from serving._pb.recsys.v1 import scoring_pb2_grpc as pb_grpc
from serving.client import AsyncScoringClient, ScoringClient, rows_request
from serving.columns import column_from_values
from serving.interceptors import ServingInterceptor, _truncate_utf8
from serving.server import _finish_call_tasks, shutdown
from tests.serving.conftest import (
    EMBEDDING,
    MODEL,
    MODEL_NAME,
    WAIT_S,
    Gate,
    StartServer,
    build_tiny_model,
    eager_scores,
    explicit_rows,
    mixed_side_tables,
    mixed_table,
    self_signed_cert,
    wait_until,
    write_version,
)

ATOL = 1e-6


def _inputs(schema: FeatureSchema, table: pa.Table, num_rows: int = 16) -> pa.Table:
    return table.select(schema.dataset.input_columns()).slice(0, num_rows)


def _code(call: pytest.ExceptionInfo[grpc.RpcError]) -> grpc.StatusCode:
    return call.value.code()  # type: ignore[attr-defined]


def _details(call: pytest.ExceptionInfo[grpc.RpcError]) -> str:
    return call.value.details()  # type: ignore[attr-defined]


def _trailing(call: pytest.ExceptionInfo[grpc.RpcError]) -> dict[str, str | bytes]:
    return dict(call.value.trailing_metadata())  # type: ignore[attr-defined]


# --- parity -----------------------------------------------------------------------------------
def test_scores_equal_the_eager_model_for_rows_and_ranking(
    repo: Path, start_server: StartServer, tiny_schema: FeatureSchema, tiny_table: pa.Table
) -> None:
    server = start_server(repo)
    server.wait_serving()
    raw = _inputs(tiny_schema, tiny_table)
    with server.client() as client:
        result = client.score_rows(MODEL_NAME, raw)
        assert (result.model, result.version) == (MODEL_NAME, 1)
        np.testing.assert_allclose(
            result.scores["ctr"], eager_scores(tiny_schema, 1, raw), rtol=0, atol=ATOL
        )

        user = tiny_table["user_id"][3].as_py()
        items = [*tiny_table["item_id"].to_pylist()[:7], "unknown-item"]
        ranked = client.rank(MODEL_NAME, {"user_id": user}, items)
        explicit = explicit_rows(tiny_table, user, items)
        np.testing.assert_allclose(
            ranked.scores["ctr"], eager_scores(tiny_schema, 1, explicit), rtol=0, atol=ATOL
        )
        sent_explicitly = client.score_rows(MODEL_NAME, explicit)
        np.testing.assert_allclose(ranked.scores["ctr"], sent_explicitly.scores["ctr"], atol=ATOL)

        info = client.model_info(MODEL_NAME)
        assert (info.model, info.version, list(info.loaded_versions)) == (MODEL_NAME, 1, [1])
        assert list(info.tasks) == ["ctr"] and info.table_dtype == "fp32"
        assert (info.user_id_feature, info.item_id_feature) == ("user_id", "item_id")
        assert [f.name for f in info.features] == tiny_schema.dataset.input_columns()
        assert '"seed": 1' in info.metrics_json


def test_concurrent_async_requests_are_batched_and_each_gets_its_own_scores(
    repo: Path, start_server: StartServer, tiny_schema: FeatureSchema, tiny_table: pa.Table
) -> None:
    server = start_server(repo, max_wait_ms=20.0)
    server.wait_serving()
    raw = _inputs(tiny_schema, tiny_table, 64)
    expected = eager_scores(tiny_schema, 1, raw)

    async def go() -> list[np.ndarray]:
        async with AsyncScoringClient(server.address, timeout_s=WAIT_S) as client:
            parts = [raw.slice(i, 1 + i % 3) for i in range(0, 60, 3)]
            results = await asyncio.gather(*(client.score_rows(MODEL_NAME, p) for p in parts))
            assert await client.health(MODEL_NAME) == "SERVING"
            return [r.scores["ctr"] for r in results]

    got = asyncio.run(go())
    for i, scores in zip(range(0, 60, 3), got, strict=True):
        np.testing.assert_allclose(scores, expected[i : i + 1 + i % 3], rtol=0, atol=ATOL)
    batches = server.models.metrics.registry.get_sample_value("recsys_batch_rows_count")
    assert batches is not None and batches < len(got)  # some requests shared a forward


def test_several_models_are_served_side_by_side(
    repo: Path, start_server: StartServer, mixed_schema: FeatureSchema
) -> None:
    write_artifact(
        repo,
        "mixed",
        build_tiny_model(mixed_schema, 3),
        MODEL,
        EMBEDDING,
        mixed_schema,
        {"auc": 0.5},
        mixed_side_tables(),
    )
    server = start_server(repo)
    for service in ("", MODEL_NAME, "mixed"):
        server.wait_serving(service)
    table = mixed_table()
    inputs = table.select(mixed_schema.dataset.input_columns())
    with server.client() as client:
        rows = client.score_rows("mixed", inputs)
        np.testing.assert_allclose(
            rows.scores["ctr"], eager_scores(mixed_schema, 3, inputs), rtol=0, atol=ATOL
        )
        ranked = client.rank("mixed", {"uid": 2}, ["a", "d"])
        expected = eager_scores(
            mixed_schema,
            3,
            pa.table(
                {
                    "uid": [2, 2],
                    "iid": ["a", "d"],
                    "tags": pa.array([["x"], ["x", "y"]], pa.list_(pa.string())),
                    "codes": pa.array([[7], []], pa.list_(pa.int64())),
                    "age": [30.0, 30.0],
                    "price": [1.0, 4.0],
                }
            ),
        )
        np.testing.assert_allclose(ranked.scores["ctr"], expected, rtol=0, atol=ATOL)
        # a bad value in one row is named with its row
        with pytest.raises(grpc.RpcError) as call:
            client.score_rows(
                "mixed", inputs.set_column(5, "price", pa.array([1.0, 2, 3, 4, np.inf, 6]))
            )
        assert _code(call) == grpc.StatusCode.INVALID_ARGUMENT
        assert "feature 'price' row 4 holds inf" in _details(call)
        assert _trailing(call)["recsys-row"] == "4"


# --- health and readiness ---------------------------------------------------------------------
def test_health_is_not_serving_until_the_model_is_loaded_and_warm(
    repo: Path, start_server: StartServer, tiny_schema: FeatureSchema, tiny_table: pa.Table
) -> None:
    gate = Gate()
    gate.close()  # holds the warm-up forward, so the load cannot finish
    server = start_server(repo, transform=gate.transform)
    gate.wait_for_waiting()
    with server.client() as client:
        assert client.health("") == "NOT_SERVING"
        wait_until(lambda: client.health(MODEL_NAME) == "NOT_SERVING", "the model discovered")
        with pytest.raises(grpc.RpcError) as call:
            client.score_rows(MODEL_NAME, _inputs(tiny_schema, tiny_table, 2))
        assert _code(call) == grpc.StatusCode.UNAVAILABLE
        assert "not loaded yet" in _details(call) or "still loading" in _details(call)
        gate.open()
        server.wait_serving("")
        server.wait_serving(MODEL_NAME)
        assert client.score_rows(MODEL_NAME, _inputs(tiny_schema, tiny_table, 2)).version == 1


def test_an_empty_repository_is_not_serving_until_a_model_arrives(
    tmp_path: Path,
    start_server: StartServer,
    tiny_schema: FeatureSchema,
    tiny_table: pa.Table,
    caplog: pytest.LogCaptureFixture,
) -> None:
    repo = tmp_path / "empty"
    repo.mkdir()
    caplog.set_level(logging.WARNING, logger="serving")
    server = start_server(repo)
    with server.client() as client:
        wait_until(lambda: server.models.statuses.get("") is False, "the first scan")
        assert client.health("") == "NOT_SERVING"
        # one warning says why, on the first scan only (the poll runs every 0.2 s here)
        time.sleep(0.6)
        empty = [r for r in caplog.records if "holds no model versions yet" in r.getMessage()]
        assert len(empty) == 1 and str(repo) in empty[0].getMessage()
        with pytest.raises(grpc.RpcError) as call:
            client.score_rows(MODEL_NAME, _inputs(tiny_schema, tiny_table, 1))
        assert _code(call) == grpc.StatusCode.NOT_FOUND
        write_version(repo, tiny_schema, tiny_table, seed=1)
        server.wait_serving("")
        server.wait_serving(MODEL_NAME)


# --- status rules -----------------------------------------------------------------------------
BAD_ROWS = [
    ("unknown feature", {"ganres": [["Drama"]] * 2}, "ganres", "did you mean 'genres'"),
    ("non-ASCII unknown feature", {"génres": [["Drama"]] * 2}, "génres", "not an input feature"),
    ("doubles for a categorical bag", {"genres": [1.0, 2.0]}, "genres", "has doubles values"),
    ("missing feature", {"zip3": None}, "zip3", "is missing"),
    ("inconsistent lengths", {"gender": ["M"]}, "gender", "has 1 rows (expected 2"),
]


@pytest.mark.parametrize(
    ("change", "feature", "message"),
    [case[1:] for case in BAD_ROWS],
    ids=[case[0] for case in BAD_ROWS],
)
def test_bad_input_is_invalid_argument_naming_the_feature(
    repo: Path,
    start_server: StartServer,
    tiny_schema: FeatureSchema,
    tiny_table: pa.Table,
    change: dict[str, list | None],
    feature: str,
    message: str,
) -> None:
    server = start_server(repo)
    server.wait_serving()
    columns = {
        n: _inputs(tiny_schema, tiny_table, 2)[n] for n in tiny_schema.dataset.input_columns()
    }
    for name, values in change.items():
        if values is None:
            columns.pop(name)
        else:
            columns[name] = values  # type: ignore[assignment]
    with server.client() as client, pytest.raises(grpc.RpcError) as call:
        client.score_rows(MODEL_NAME, columns, request_id="bad-input-1")
    assert _code(call) == grpc.StatusCode.INVALID_ARGUMENT
    assert f"feature '{feature}'" in _details(call) and message in _details(call)
    trailing = _trailing(call)
    assert trailing["recsys-feature-bin"] == feature.encode()
    assert trailing["x-request-id"] == "bad-input-1"


def test_too_many_rows_and_empty_requests_are_invalid_argument(
    repo: Path, start_server: StartServer, tiny_schema: FeatureSchema, tiny_table: pa.Table
) -> None:
    server = start_server(repo, max_rows_per_request=8)
    server.wait_serving()
    with server.client() as client:
        with pytest.raises(grpc.RpcError) as call:
            client.score_rows(MODEL_NAME, _inputs(tiny_schema, tiny_table, 9))
        assert _code(call) == grpc.StatusCode.INVALID_ARGUMENT
        assert "holds 9 rows (expected at most 8" in _details(call)
        for request in (
            pb.ScoreRequest(model=MODEL_NAME),
            pb.ScoreRequest(model=MODEL_NAME, rows=pb.Rows()),
            pb.ScoreRequest(rows=pb.Rows()),
        ):
            with pytest.raises(grpc.RpcError) as call:
                client.score(request)
            assert _code(call) == grpc.StatusCode.INVALID_ARGUMENT, request


def test_unknown_model_or_version_is_not_found(
    repo: Path, start_server: StartServer, tiny_schema: FeatureSchema, tiny_table: pa.Table
) -> None:
    server = start_server(repo)
    server.wait_serving()
    raw = _inputs(tiny_schema, tiny_table, 2)
    with server.client() as client:
        with pytest.raises(grpc.RpcError) as call:
            client.score_rows("no-such-model", raw)
        assert _code(call) == grpc.StatusCode.NOT_FOUND
        assert "model 'no-such-model' is not in the repository" in _details(call)
        with pytest.raises(grpc.RpcError) as call:
            client.score_rows(MODEL_NAME, raw, version=7)
        assert _code(call) == grpc.StatusCode.NOT_FOUND
        assert "version 7 of model 'tiny' is not loaded (expected one of [1]" in _details(call)
        with pytest.raises(grpc.RpcError) as call:
            client.model_info(MODEL_NAME, version=7)
        assert _code(call) == grpc.StatusCode.NOT_FOUND
        assert client.score_rows(MODEL_NAME, raw, version=1).version == 1


def test_long_unknown_names_are_refused_with_their_echo_cut_short(
    repo: Path, start_server: StartServer, tiny_schema: FeatureSchema, tiny_table: pa.Table
) -> None:
    # echoed whole, a 200,000-character name overflowed the trailers (16 KiB) and the client
    # got RESOURCE_EXHAUSTED instead of the status the server meant
    server = start_server(repo)
    server.wait_serving()
    raw = _inputs(tiny_schema, tiny_table, 2)
    columns = {n: raw[n] for n in raw.column_names}
    with server.client() as client:
        with pytest.raises(grpc.RpcError) as call:
            client.score_rows(MODEL_NAME, {**columns, "x" * 200_000: [1, 2]})
        assert _code(call) == grpc.StatusCode.INVALID_ARGUMENT
        assert f"feature '{'x' * 64}…' is not an input feature" in _details(call)
        assert _trailing(call)["recsys-feature-bin"] == ("x" * 64 + "…").encode()
        with pytest.raises(grpc.RpcError) as call:
            client.score_rows("y" * 20_000, columns)
        assert _code(call) == grpc.StatusCode.NOT_FOUND
        assert f"model '{'y' * 64}…' is not in the repository" in _details(call)
        assert len(_details(call)) < 1000


@pytest.mark.parametrize(
    ("text", "max_bytes", "expected"),
    [("abc", 3, "abc"), ("abcd", 3, "abc…"), ("aé€", 4, "aé…"), ("€€", 5, "€…")],
)
def test_status_details_are_cut_to_whole_characters_within_the_byte_limit(
    text: str, max_bytes: int, expected: str
) -> None:
    assert _truncate_utf8(text, max_bytes) == expected


def test_a_malformed_message_is_invalid_argument_counted_and_not_logged_as_an_error(
    repo: Path, start_server: StartServer, caplog: pytest.LogCaptureFixture
) -> None:
    server = start_server(repo)
    server.wait_serving()
    caplog.set_level(logging.WARNING)
    valid = pb.ScoreRequest(model=MODEL_NAME).SerializeToString()
    bad_utf8 = valid.replace(MODEL_NAME.encode(), b"ti\xffy")
    assert bad_utf8 != valid
    with grpc.insecure_channel(server.address) as channel:
        score = channel.unary_unary("/recsys.v1.Scoring/Score")  # sends and returns raw bytes
        for message in (b"\xff\xff\xff", bad_utf8):
            with pytest.raises(grpc.RpcError) as call:
                score(message, timeout=WAIT_S)
            assert _code(call) == grpc.StatusCode.INVALID_ARGUMENT
            assert "the message cannot be parsed" in _details(call)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    registry = server.models.metrics.registry
    labels = {"method": "/recsys.v1.Scoring/Score", "status": "INVALID_ARGUMENT"}
    # counted as the call's task ends, which may be just after the client has the status
    wait_until(
        lambda: registry.get_sample_value("recsys_requests_total", labels) == 2,
        "both malformed calls counted as INVALID_ARGUMENT",
    )


def test_a_message_over_the_receive_limit_is_refused_by_grpc(
    repo: Path, start_server: StartServer, tiny_schema: FeatureSchema, tiny_table: pa.Table
) -> None:
    limit = 64 * 1024
    server = start_server(repo, max_receive_message_bytes=limit)
    server.wait_serving()
    raw = _inputs(tiny_schema, tiny_table, 2)
    huge = raw.set_column(0, "user_id", pa.array(["u" * limit, "1"]))
    assert rows_request(MODEL_NAME, huge).ByteSize() > limit
    with server.client() as client:
        with pytest.raises(grpc.RpcError) as call:
            client.score_rows(MODEL_NAME, huge)
        assert _code(call) == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "larger than max" in _details(call)
        assert client.score_rows(MODEL_NAME, raw).version == 1  # the server is fine
    # refused before any handler ran: no Score call was counted
    registry = server.models.metrics.registry
    labels = {"method": "/recsys.v1.Scoring/Score", "status": "RESOURCE_EXHAUSTED"}
    assert registry.get_sample_value("recsys_requests_total", labels) is None


def test_a_flood_beyond_the_queue_is_refused_while_the_server_stays_healthy(
    repo: Path, start_server: StartServer, tiny_schema: FeatureSchema, tiny_table: pa.Table
) -> None:
    gate = Gate()
    server = start_server(
        repo, transform=gate.transform, max_queue_rows=8, max_rows_per_request=4, max_wait_ms=0
    )
    server.wait_serving()
    raw = _inputs(tiny_schema, tiny_table, 4)
    gate.close()
    with server.client() as client, ThreadPoolExecutor(4) as pool:
        busy = pool.submit(client.score_rows, MODEL_NAME, raw.slice(0, 1))
        gate.wait_for_waiting()  # the only scoring thread is held
        queued = [pool.submit(client.score_rows, MODEL_NAME, raw) for _ in range(2)]
        batcher = server.models.get(MODEL_NAME).batcher
        wait_until(lambda: batcher.queued_rows == 8, "a full queue")
        refused = 0
        for _ in range(5):
            with pytest.raises(grpc.RpcError) as call:
                client.score_rows(MODEL_NAME, raw.slice(0, 1))
            assert _code(call) == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "queue full" in _details(call)
            refused += 1
        assert client.health("") == "SERVING" and client.health(MODEL_NAME) == "SERVING"
        gate.open()
        assert busy.result(WAIT_S).version == 1
        assert [len(f.result(WAIT_S).scores["ctr"]) for f in queued] == [4, 4]
        assert client.score_rows(MODEL_NAME, raw).version == 1
    assert refused == 5


def _grpc_call_tasks_running() -> list[str]:
    names = ("_schedule_rpc_coro", "_handle_exceptions")  # grpc.aio's per-call coroutines
    return [
        task.get_name()
        for task in asyncio.all_tasks()
        if not task.done() and getattr(task.get_coro(), "__name__", "") in names
    ]


def test_a_graceful_stop_answers_queued_calls_and_leaves_no_call_task_running(
    repo: Path,
    start_server: StartServer,
    tiny_schema: FeatureSchema,
    tiny_table: pa.Table,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """grpc.aio's stop returns once the last response is sent; a call's task still finishing
    then would be cancelled by the closing loop, its traceback in the log. `shutdown` waits
    for them before it releases the models."""
    gate = Gate()
    server = start_server(repo, transform=gate.transform, max_wait_ms=0)
    server.wait_serving()
    running_at_release: list[list[str]] = []
    release = server.models.close

    async def record_and_release() -> None:
        running_at_release.append(_grpc_call_tasks_running())
        await release()

    monkeypatch.setattr(server.models, "close", record_and_release)
    raw = _inputs(tiny_schema, tiny_table, 4)
    caplog.set_level(logging.INFO, logger="serving.server")
    gate.close()
    with server.client() as client, ThreadPoolExecutor(8) as pool:
        busy = pool.submit(client.score_rows, MODEL_NAME, raw.slice(0, 1))
        gate.wait_for_waiting()
        queued = [pool.submit(client.score_rows, MODEL_NAME, raw) for _ in range(7)]
        batcher = server.models.get(MODEL_NAME).batcher
        wait_until(lambda: batcher.queued_rows == 28, "seven calls in the queue")
        stopping = asyncio.run_coroutine_threadsafe(shutdown(server.server, 30.0), server.loop)
        server.shut_down = True
        wait_until(lambda: "serve: shutting down" in caplog.text, "the stop to begin")
        gate.open()
        assert busy.result(WAIT_S).version == 1
        assert [len(f.result(WAIT_S).scores["ctr"]) for f in queued] == [4] * 7
        stopping.result(WAIT_S)
    assert running_at_release == [[]]


def test_a_deadline_that_expires_in_the_queue_is_deadline_exceeded(
    repo: Path, start_server: StartServer, tiny_schema: FeatureSchema, tiny_table: pa.Table
) -> None:
    gate = Gate()
    server = start_server(repo, transform=gate.transform, max_wait_ms=0)
    server.wait_serving()
    raw = _inputs(tiny_schema, tiny_table, 2)
    gate.close()
    with server.client() as client, ThreadPoolExecutor(1) as pool:
        busy = pool.submit(client.score_rows, MODEL_NAME, raw)
        gate.wait_for_waiting()
        with pytest.raises(grpc.RpcError) as call:
            client.score_rows(MODEL_NAME, raw, timeout_s=0.3)
        assert _code(call) == grpc.StatusCode.DEADLINE_EXCEEDED
        batcher = server.models.get(MODEL_NAME).batcher
        wait_until(lambda: batcher.queued_rows == 0, "the expired request to leave the queue")
        gate.open()
        assert busy.result(WAIT_S).version == 1
        assert client.score_rows(MODEL_NAME, raw).version == 1
    assert gate.calls == 2 + 2  # two warm-up passes, then the busy and the last request


def test_an_unexpected_error_is_internal_with_the_request_id_and_no_traceback(
    repo: Path,
    start_server: StartServer,
    tiny_schema: FeatureSchema,
    tiny_table: pa.Table,
    caplog: pytest.LogCaptureFixture,
) -> None:
    gate = Gate()
    server = start_server(repo, transform=gate.transform)
    server.wait_serving()
    gate.fail = True
    caplog.set_level(logging.WARNING, logger="serving")
    with server.client() as client, pytest.raises(grpc.RpcError) as call:
        client.score_rows(MODEL_NAME, _inputs(tiny_schema, tiny_table, 2), request_id="req-42")
    assert _code(call) == grpc.StatusCode.INTERNAL
    assert "request_id=req-42" in _details(call)
    assert "simulated failure" not in _details(call) and "Traceback" not in _details(call)
    failures = [r for r in caplog.records if "req-42" in r.getMessage()]
    assert len(failures) == 1 and failures[0].exc_info is not None


# --- model versions ---------------------------------------------------------------------------
def test_a_new_version_is_picked_up_while_clients_stream_with_zero_failures(
    repo: Path, start_server: StartServer, tiny_schema: FeatureSchema, tiny_table: pa.Table
) -> None:
    server = start_server(repo, poll_interval_s=0.1, max_wait_ms=1.0)
    server.wait_serving()
    raw = _inputs(tiny_schema, tiny_table, 8)
    stop = threading.Event()
    versions: list[list[int]] = [[], []]
    failures: list[BaseException] = []

    def stream(seen: list[int]) -> None:
        with server.client() as client:
            while not stop.is_set():
                try:
                    seen.append(client.score_rows(MODEL_NAME, raw).version)
                except grpc.RpcError as e:
                    failures.append(e)

    threads = [threading.Thread(target=stream, args=(seen,)) for seen in versions]
    for thread in threads:
        thread.start()
    try:
        wait_until(lambda: all(len(seen) >= 3 for seen in versions), "responses from v1")
        write_version(repo, tiny_schema, tiny_table, seed=2)
        wait_until(lambda: all(seen[-1] == 2 for seen in versions), "responses from v2")
        count = [len(seen) for seen in versions]
        wait_until(
            lambda: all(len(s) >= c + 3 for s, c in zip(versions, count, strict=True)),
            "more responses after the swap",
        )
    finally:
        stop.set()
        for thread in threads:
            thread.join(WAIT_S)
    assert failures == []
    for seen in versions:
        assert seen == sorted(seen) and seen[0] == 1 and seen[-1] == 2  # one switch, no return
    with server.client() as client:
        newest = client.score_rows(MODEL_NAME, raw)
        pinned = client.score_rows(MODEL_NAME, raw, version=1)
        assert list(client.model_info(MODEL_NAME).loaded_versions) == [1, 2]
    np.testing.assert_allclose(newest.scores["ctr"], eager_scores(tiny_schema, 2, raw), atol=ATOL)
    np.testing.assert_allclose(pinned.scores["ctr"], eager_scores(tiny_schema, 1, raw), atol=ATOL)
    assert (
        server.models.metrics.registry.get_sample_value(
            "recsys_model_version", {"model": MODEL_NAME}
        )
        == 2
    )


def _flip_byte(path: Path) -> None:
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_corrupted_version_is_rejected_and_the_old_one_keeps_serving(
    repo: Path,
    start_server: StartServer,
    tiny_schema: FeatureSchema,
    tiny_table: pa.Table,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="serving.model_manager")
    server = start_server(repo, poll_interval_s=0.1)
    server.wait_serving()
    # write elsewhere, corrupt one byte, then move it in: the server only ever sees it corrupt
    staged = write_version(tmp_path / "staging", tiny_schema, tiny_table, seed=2)
    _flip_byte(staged / WEIGHTS)
    os.rename(staged, repo / MODEL_NAME / "2")
    registry = server.models.metrics.registry

    def failures() -> float:
        value = registry.get_sample_value("recsys_model_load_failures_total", {"model": MODEL_NAME})
        return value or 0.0

    wait_until(lambda: failures() >= 1, "the corrupt version to be rejected")
    for _ in range(3):  # later scans skip it without another warning
        server.run(server.models.refresh())
    assert failures() == 1
    warnings = [r.getMessage() for r in caplog.records if "version 2 of model" in r.getMessage()]
    assert len(warnings) == 1
    assert (
        f"checksum mismatch for {WEIGHTS}" in warnings[0]
        and "still serving version 1" in warnings[0]
    )
    raw = _inputs(tiny_schema, tiny_table, 4)
    with server.client() as client:
        assert client.health(MODEL_NAME) == "SERVING"
        result = client.score_rows(MODEL_NAME, raw)
        assert result.version == 1
        np.testing.assert_allclose(
            result.scores["ctr"], eager_scores(tiny_schema, 1, raw), atol=ATOL
        )
        # a good version after the bad one is picked up
        shutil.rmtree(repo / MODEL_NAME / "2", ignore_errors=True)
        write_version(repo, tiny_schema, tiny_table, seed=3)
        wait_until(lambda: client.score_rows(MODEL_NAME, raw).version == 2, "the next version")


# --- auth, reflection, request ids, metrics ---------------------------------------------------
def test_a_bearer_token_is_required_when_configured(
    repo: Path, start_server: StartServer, tiny_schema: FeatureSchema, tiny_table: pa.Table
) -> None:
    server = start_server(repo, auth_token="s3cret")
    server.wait_serving()  # health checks need no token
    raw = _inputs(tiny_schema, tiny_table, 2)
    for token in (None, "wrong"):
        with server.client(token=token) as client, pytest.raises(grpc.RpcError) as call:
            client.score_rows(MODEL_NAME, raw)
        assert _code(call) == grpc.StatusCode.UNAUTHENTICATED
        assert "bearer token" in _details(call)
    with server.client(token="s3cret") as client:
        assert client.score_rows(MODEL_NAME, raw).version == 1
        assert client.model_info(MODEL_NAME).version == 1


def test_reflection_lists_and_describes_the_services(repo: Path, start_server: StartServer) -> None:
    server = start_server(repo)
    with grpc.insecure_channel(server.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        requests = [
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="recsys.v1.Scoring"),
        ]
        listed, described = list(stub.ServerReflectionInfo(iter(requests), timeout=WAIT_S))
    services = {s.name for s in listed.list_services_response.service}
    assert {"recsys.v1.Scoring", "grpc.health.v1.Health"} <= services
    files = described.file_descriptor_response.file_descriptor_proto
    assert files and b"recsys/v1/scoring.proto" in files[0]


def test_request_ids_are_echoed_and_metrics_are_exported(
    repo: Path, start_server: StartServer, tiny_schema: FeatureSchema, tiny_table: pa.Table
) -> None:
    server = start_server(repo, metrics_port=0)
    server.wait_serving()
    request = rows_request(MODEL_NAME, _inputs(tiny_schema, tiny_table, 3))
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.ScoringStub(channel)
        _, call = stub.Score.with_call(
            request, metadata=(("x-request-id", "abc-123"),), timeout=WAIT_S
        )
        assert dict(call.trailing_metadata())["x-request-id"] == "abc-123"
        _, call = stub.Score.with_call(request, timeout=WAIT_S)
        assert len(dict(call.trailing_metadata())["x-request-id"]) == 16  # generated
    port = server.models.metrics.http_port
    assert port is not None
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=WAIT_S) as page:
        text = page.read().decode()
    assert 'recsys_requests_total{method="/recsys.v1.Scoring/Score",status="OK"} 2.0' in text
    assert 'recsys_model_version{model="tiny"} 1.0' in text
    assert "recsys_request_latency_seconds_bucket" in text and "recsys_batch_rows_count" in text
    assert 'recsys_queue_rows{model="tiny",version="1"} 0.0' in text


def test_out_of_vocabulary_values_are_counted_per_model_and_feature(
    repo: Path, start_server: StartServer, tiny_schema: FeatureSchema, tiny_table: pa.Table
) -> None:
    server = start_server(repo)
    server.wait_serving()
    raw = _inputs(tiny_schema, tiny_table, 3)
    users = raw["user_id"].to_pylist()
    raw = raw.set_column(
        raw.column_names.index("user_id"), "user_id", pa.array(["new-user", *users[1:]])
    )
    with server.client() as client:
        client.score_rows(MODEL_NAME, raw)
        client.rank(MODEL_NAME, {"user_id": users[1]}, [raw["item_id"][0].as_py(), "new-item"])
        with pytest.raises(grpc.RpcError):  # a refused request counts nothing
            client.score_rows(MODEL_NAME, raw.drop_columns(["gender"]))
    text = server.models.metrics.render()

    def count(feature: str, outcome: str) -> float:
        line = (
            f'recsys_feature_values_total{{feature="{feature}",model="tiny",outcome="{outcome}"}}'
        )
        values = [float(row.split()[-1]) for row in text.splitlines() if row.startswith(line)]
        assert len(values) == 1, f"{line} not exported"
        return values[0]

    assert (count("user_id", "known"), count("user_id", "out_of_vocabulary")) == (4.0, 1.0)
    assert (count("item_id", "known"), count("item_id", "out_of_vocabulary")) == (4.0, 1.0)
    assert count("genres", "missing") == 1.0  # the unknown item has no side row
    assert count("gender", "missing") == 0.0


def test_ranking_columns_built_by_hand_match_the_client_helper(
    repo: Path, start_server: StartServer, tiny_table: pa.Table
) -> None:
    server = start_server(repo)
    server.wait_serving()
    user = tiny_table["user_id"][0].as_py()
    request = pb.ScoreRequest(
        model=MODEL_NAME,
        ranking=pb.RankingRequest(
            context={"user_id": column_from_values("user_id", [user])},
            candidate_item_ids=column_from_values("item_id", ["1", "2"]),
        ),
    )
    with server.client() as client:
        by_hand = client.score(request)
        helper = client.rank(MODEL_NAME, {"user_id": user}, ["1", "2"])
    np.testing.assert_array_equal(by_hand.scores["ctr"], helper.scores["ctr"])


def test_scoring_client_over_tls(
    repo: Path,
    start_server: StartServer,
    tiny_schema: FeatureSchema,
    tiny_table: pa.Table,
    tmp_path: Path,
) -> None:
    cert, key = self_signed_cert(tmp_path)
    server = start_server(repo, tls_cert_file=cert, tls_key_file=key)
    raw = _inputs(tiny_schema, tiny_table, 2)
    with ScoringClient(
        f"localhost:{server.port}", root_certificates=cert.read_bytes(), timeout_s=WAIT_S
    ) as client:
        wait_until(lambda: client.health() == "SERVING", "TLS health SERVING")
        assert client.score_rows(MODEL_NAME, raw).version == 1
    with ScoringClient(server.address, timeout_s=5.0) as plaintext, pytest.raises(grpc.RpcError):
        plaintext.health()


# --- quantized tables -------------------------------------------------------------------------
def test_int8_serving_holds_uint8_tables_and_scores_close_to_fp32(
    repo: Path, start_server: StartServer, tiny_schema: FeatureSchema, tiny_table: pa.Table
) -> None:
    server = start_server(repo, quantize="int8")
    server.wait_serving()
    raw = _inputs(tiny_schema, tiny_table)
    with server.client() as client:
        result = client.score_rows(MODEL_NAME, raw)
        assert client.model_info(MODEL_NAME).table_dtype == "int8"
    served = server.models.get(MODEL_NAME, 0).model
    table_dtypes = {t.dtype for t in served.state_dict().values() if t.dtype == torch.uint8}
    assert table_dtypes == {torch.uint8}
    assert not any(isinstance(m, EmbeddingBagCollection) for m in served.modules()), (
        "an fp32 EmbeddingBagCollection is still served"
    )
    fp32 = eager_scores(tiny_schema, 1, raw)
    np.testing.assert_allclose(result.scores["ctr"], fp32, rtol=0, atol=1e-2)
    assert not np.allclose(result.scores["ctr"], fp32, rtol=0, atol=1e-9)  # really quantized


async def _schedule_rpc_coro(finished: asyncio.Event) -> None:
    """Stands in for grpc.aio's per-call coroutine (same name) that outlives the core's call."""
    await finished.wait()


def test_shutdown_waits_for_call_tasks_the_grpc_core_already_finished() -> None:
    async def scenario() -> tuple[int, bool, int]:
        interceptor = ServingInterceptor()
        finished, hung = asyncio.Event(), asyncio.Event()
        late = asyncio.create_task(_schedule_rpc_coro(finished))
        asyncio.get_running_loop().call_later(0.2, finished.set)
        unfinished = await _finish_call_tasks(interceptor, timeout_s=10.0)
        stuck = asyncio.create_task(_schedule_rpc_coro(hung))
        await asyncio.sleep(0)
        left = await _finish_call_tasks(interceptor, timeout_s=0.1)
        stuck.cancel()
        return unfinished, late.done(), left

    unfinished, late_done, left = asyncio.run(scenario())
    assert (unfinished, late_done) == (0, True)  # waited for the late one to finish
    assert left == 1  # a task that never finishes is counted, not waited for forever
