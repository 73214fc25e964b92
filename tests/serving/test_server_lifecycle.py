"""The server's lifecycle through real gRPC channels: health List and Watch streams at
shutdown, the drain period, the Scoring-only concurrency limit and how deadlines are counted."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pyarrow as pa
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from recsys.features.schema import FeatureSchema
from serving.server import shutdown
from tests.serving.conftest import MODEL_NAME, WAIT_S, Gate, StartServer, wait_until

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SCORE = "/recsys.v1.Scoring/Score"


def _inputs(schema: FeatureSchema, table: pa.Table, num_rows: int) -> pa.Table:
    return table.select(schema.dataset.input_columns()).slice(0, num_rows)


class Watcher:
    """A health Watch stream read in a thread: the statuses it got and how it ended."""

    def __init__(self, address: str, service: str = "") -> None:
        self.channel = grpc.insecure_channel(address)
        self.statuses: list[int] = []
        self.ended_with: grpc.StatusCode | None = None
        stub = health_pb2_grpc.HealthStub(self.channel)
        self._stream = stub.Watch(health_pb2.HealthCheckRequest(service=service))
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for message in self._stream:
                self.statuses.append(message.status)
            self.ended_with = grpc.StatusCode.OK
        except grpc.RpcError as e:
            self.ended_with = e.code()  # type: ignore[attr-defined]

    def close(self) -> None:
        self._stream.cancel()
        self._thread.join(WAIT_S)
        self.channel.close()


def test_health_list_reports_the_server_and_every_model(
    repo: Path, start_server: StartServer
) -> None:
    """grpcio's async health servicer has no List (reflection advertises it): it used to end
    as INTERNAL with a logged traceback."""
    server = start_server(repo)
    server.wait_serving(MODEL_NAME)
    with grpc.insecure_channel(server.address) as channel:
        listed = health_pb2_grpc.HealthStub(channel).List(
            health_pb2.HealthListRequest(), timeout=WAIT_S
        )
    assert {name: s.status for name, s in listed.statuses.items()} == {
        "": SERVING,
        MODEL_NAME: SERVING,
    }


def test_the_rpc_limit_counts_scoring_calls_only(
    repo: Path, start_server: StartServer, tiny_schema: FeatureSchema, tiny_table: pa.Table
) -> None:
    """grpc's own `maximum_concurrent_rpcs` counted health checks and open Watch streams: a
    busy server failed its probes, and idle watchers refused every Score call."""
    gate = Gate()
    server = start_server(repo, transform=gate.transform, max_wait_ms=0, max_concurrent_rpcs=2)
    server.wait_serving()
    raw = _inputs(tiny_schema, tiny_table, 2)
    watchers = [Watcher(server.address) for _ in range(3)]
    try:
        wait_until(lambda: all(w.statuses == [SERVING] for w in watchers), "three open watches")
        with server.client() as client, ThreadPoolExecutor(2) as pool:
            assert client.score_rows(MODEL_NAME, raw).version == 1  # watchers take no slot
            gate.close()
            busy = pool.submit(client.score_rows, MODEL_NAME, raw)
            gate.wait_for_waiting()
            queued = pool.submit(client.score_rows, MODEL_NAME, raw)
            batcher = server.models.get(MODEL_NAME).batcher
            wait_until(lambda: batcher.queued_rows == 2, "the second call in the queue")
            assert client.health("") == "SERVING"  # a probe is answered at the limit
            with pytest.raises(grpc.RpcError) as call:
                client.score_rows(MODEL_NAME, raw)
            assert call.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
            assert "--max-concurrent-rpcs is 2" in call.value.details()  # type: ignore[attr-defined]
            gate.open()
            assert busy.result(WAIT_S).version == 1 and queued.result(WAIT_S).version == 1
            # both slots are given back
            results = [pool.submit(client.score_rows, MODEL_NAME, raw) for _ in range(2)]
            assert [r.result(WAIT_S).version for r in results] == [1, 1]
    finally:
        for watcher in watchers:
            watcher.close()


def test_a_deadline_passing_in_the_queue_is_counted_as_deadline_exceeded(
    repo: Path, start_server: StartServer, tiny_schema: FeatureSchema, tiny_table: pa.Table
) -> None:
    """grpc's deadline timer cancels the call's task; that used to be counted (and not
    logged) as CANCELLED, so queue timeouts looked like clients going away."""
    server = start_server(repo, max_wait_ms=300)
    server.wait_serving()
    raw = _inputs(tiny_schema, tiny_table, 1)
    with server.client() as client:
        for _ in range(2):
            with pytest.raises(grpc.RpcError) as call:
                client.score_rows(MODEL_NAME, raw, timeout_s=0.08)
            assert call.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # type: ignore[attr-defined]
    registry = server.models.metrics.registry

    def count(status: str) -> float | None:
        return registry.get_sample_value(
            "recsys_requests_total", {"method": SCORE, "status": status}
        )

    wait_until(lambda: count("DEADLINE_EXCEEDED") == 2, "two calls counted DEADLINE_EXCEEDED")
    assert count("CANCELLED") is None


def test_shutdown_answers_calls_during_the_drain_and_ends_watch_streams(
    repo: Path, start_server: StartServer, tiny_schema: FeatureSchema, tiny_table: pa.Table
) -> None:
    """Health turns NOT_SERVING first, calls are still answered for `drain_s`, and open Watch
    streams end with OK after NOT_SERVING, so they no longer hold the stop for all of
    `grace_s` (it used to take the whole grace period whenever a client watched)."""
    server = start_server(repo)
    server.wait_serving()
    raw = _inputs(tiny_schema, tiny_table, 2)
    watcher = Watcher(server.address)
    try:
        wait_until(lambda: watcher.statuses == [SERVING], "the watch to see SERVING")
        with server.client() as client:
            start = time.monotonic()
            stopping = asyncio.run_coroutine_threadsafe(
                shutdown(server.server, grace_s=40.0, drain_s=2.0), server.loop
            )
            server.shut_down = True
            wait_until(lambda: NOT_SERVING in watcher.statuses, "the watch to see NOT_SERVING")
            assert client.score_rows(MODEL_NAME, raw).version == 1  # still answered
            stopping.result(WAIT_S)
            elapsed = time.monotonic() - start
        wait_until(lambda: watcher.ended_with is not None, "the watch stream to end")
    finally:
        watcher.close()
    assert watcher.ended_with == grpc.StatusCode.OK
    assert watcher.statuses[0] == SERVING and set(watcher.statuses[1:]) == {NOT_SERVING}
    assert 2.0 <= elapsed < 20.0
