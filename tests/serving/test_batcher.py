"""The micro-batcher on its own, with a scoring function the test controls: coalescing and
splitting, batch limits, and the admission rules (queue full, deadline that cannot be met,
deadline expiring in the queue)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import pytest

from serving.batcher import BatcherConfig, MicroBatcher, Scores
from serving.errors import DeadlineExceeded, Overloaded
from serving.metrics import ServerMetrics

T = TypeVar("T")
WAIT_S = 60.0


class FakeModel:
    """Scores each row as its `x` value / 1000; records batch sizes; can be held."""

    def __init__(self) -> None:
        self.batches: list[int] = []
        self.release = threading.Event()
        self.release.set()
        self.entered = threading.Event()

    def __call__(self, table: pa.Table) -> Scores:
        self.entered.set()
        assert self.release.wait(WAIT_S), "the test never released the model"
        self.batches.append(table.num_rows)
        x = table["x"].to_numpy(zero_copy_only=False).astype(np.float32)
        return {"ctr": x / 1000, "cvr": 1 - x / 1000}


def _rows(*values: int) -> pa.Table:
    return pa.table({"x": pa.array(values, pa.int64())})


def _run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, WAIT_S))


def _batcher(model: FakeModel, **overrides: Any) -> tuple[MicroBatcher, ThreadPoolExecutor]:
    config = {"max_batch_rows": 8, "max_wait_s": 0.05, "max_queue_rows": 32, "concurrency": 1}
    config.update(overrides)
    executor = ThreadPoolExecutor(1)
    metrics = ServerMetrics()
    return MicroBatcher(model, BatcherConfig(**config), executor, ("m", 1), metrics), executor


async def _until(predicate: Any) -> None:
    while not predicate():
        await asyncio.sleep(0.005)


def test_concurrent_requests_share_one_forward_and_get_their_own_rows() -> None:
    model = FakeModel()
    batcher, executor = _batcher(model, max_wait_s=5.0)  # the batch closes on rows, not time

    async def go() -> list[Scores]:
        requests = [_rows(1, 2), _rows(3), _rows(4, 5, 6, 7, 8)]  # 8 rows = max_batch_rows
        return await asyncio.gather(*(batcher.submit(t) for t in requests))

    results = _run(go())
    executor.shutdown()
    assert model.batches == [8]
    np.testing.assert_allclose(results[0]["ctr"], [0.001, 0.002])
    np.testing.assert_allclose(results[1]["cvr"], [0.997])
    np.testing.assert_allclose(results[2]["ctr"], np.arange(4, 9) / 1000, rtol=1e-6)
    assert batcher.queued_rows == 0


def test_batches_never_exceed_max_rows_unless_one_request_is_larger() -> None:
    model = FakeModel()
    batcher, executor = _batcher(model, max_batch_rows=4, max_wait_s=0.0)
    model.release.clear()

    async def go() -> list[Scores]:
        first = asyncio.ensure_future(batcher.submit(_rows(0)))
        await asyncio.to_thread(model.entered.wait, WAIT_S)  # the model is busy with row 0
        rest = [asyncio.ensure_future(batcher.submit(_rows(*range(k)))) for k in (3, 2, 6, 1)]
        await _until(lambda: batcher.queued_rows == 12)
        model.release.set()
        return await asyncio.gather(first, *rest)

    results = _run(go())
    executor.shutdown()
    # queued while busy: 3 | 2 (3+2 > 4) | 6 alone (larger than a batch) | 1
    assert model.batches == [1, 3, 2, 6, 1]
    assert [len(r["ctr"]) for r in results] == [1, 3, 2, 6, 1]


def test_a_full_queue_refuses_at_once_and_recovers() -> None:
    model = FakeModel()
    batcher, executor = _batcher(model, max_queue_rows=4, max_wait_s=0.0)
    model.release.clear()

    async def go() -> tuple[list[Scores], str]:
        busy = asyncio.ensure_future(batcher.submit(_rows(1)))
        await asyncio.to_thread(model.entered.wait, WAIT_S)
        queued = [asyncio.ensure_future(batcher.submit(_rows(2, 3))) for _ in range(2)]
        await _until(lambda: batcher.queued_rows == 4)
        with pytest.raises(Overloaded, match=r"queue full \(4 rows queued \+ 1 requested") as e:
            await batcher.submit(_rows(9))
        model.release.set()
        done = await asyncio.gather(busy, *queued)
        done.append(await batcher.submit(_rows(9)))  # room again
        return done, str(e.value)

    results, message = _run(go())
    executor.shutdown()
    assert "max_queue_rows=4" in message
    assert [len(r["ctr"]) for r in results] == [1, 2, 2, 1]


def test_a_deadline_the_queue_cannot_meet_is_refused_at_once() -> None:
    model = FakeModel()
    batcher, executor = _batcher(model, max_batch_rows=2, max_wait_s=0.0)
    batcher.record_latency(0.5)  # recent batches took 0.5 s each
    model.release.clear()

    async def go() -> None:
        busy = asyncio.ensure_future(batcher.submit(_rows(1)))
        await asyncio.to_thread(model.entered.wait, WAIT_S)
        queued = asyncio.ensure_future(batcher.submit(_rows(1, 2)))
        await _until(lambda: batcher.queued_rows == 2)
        # two batches ahead of it (its own and the queued one) at 0.5 s each: 1 s > 0.2 s
        with pytest.raises(Overloaded, match="the deadline cannot be met"):
            await batcher.submit(_rows(3), timeout_s=0.2)
        assert batcher.queued_rows == 2  # refused without being queued
        model.release.set()
        await asyncio.gather(busy, queued)
        # with time to spare it is accepted
        assert len((await batcher.submit(_rows(3), timeout_s=WAIT_S))["ctr"]) == 1

    _run(go())
    executor.shutdown()


def test_an_idle_batcher_admits_any_deadline_so_a_high_estimate_cannot_lock_it() -> None:
    model = FakeModel()
    batcher, executor = _batcher(model, max_wait_s=0.0)
    batcher.record_latency(10 * WAIT_S)  # one slow batch: every deadline below looks hopeless

    async def go() -> None:
        # idle: admitted and scored, whatever the estimate says
        for k in range(3):
            assert len((await batcher.submit(_rows(k), timeout_s=WAIT_S))["ctr"]) == 1
        model.release.clear()
        model.entered.clear()
        batcher.record_latency(10 * WAIT_S)
        busy = asyncio.ensure_future(batcher.submit(_rows(1)))
        await asyncio.to_thread(model.entered.wait, WAIT_S)
        # a batch in flight: the estimate is trusted again
        with pytest.raises(Overloaded, match="the deadline cannot be met"):
            await batcher.submit(_rows(2), timeout_s=WAIT_S)
        model.release.set()
        await busy

    _run(go())
    executor.shutdown()
    assert model.batches == [1, 1, 1, 1]


def test_a_deadline_that_expires_in_the_queue_ends_the_request_and_frees_its_rows() -> None:
    model = FakeModel()
    batcher, executor = _batcher(model, max_wait_s=0.0)
    model.release.clear()

    async def go() -> None:
        busy = asyncio.ensure_future(batcher.submit(_rows(1)))
        await asyncio.to_thread(model.entered.wait, WAIT_S)
        with pytest.raises(DeadlineExceeded, match="deadline expired in the queue"):
            await batcher.submit(_rows(2, 3), timeout_s=0.05)
        assert batcher.queued_rows == 0
        model.release.set()
        await busy
        assert len((await batcher.submit(_rows(4)))["ctr"]) == 1

    _run(go())
    executor.shutdown()
    assert model.batches == [1, 1]  # the expired request never reached the model


def test_a_cancelled_request_leaves_the_queue() -> None:
    model = FakeModel()
    batcher, executor = _batcher(model, max_wait_s=0.0)
    model.release.clear()

    async def go() -> None:
        busy = asyncio.ensure_future(batcher.submit(_rows(1)))
        await asyncio.to_thread(model.entered.wait, WAIT_S)
        waiting = asyncio.ensure_future(batcher.submit(_rows(2, 3, 4)))
        await _until(lambda: batcher.queued_rows == 3)
        waiting.cancel()
        await asyncio.sleep(0)
        await _until(lambda: batcher.queued_rows == 0)
        model.release.set()
        await busy

    _run(go())
    executor.shutdown()
    assert model.batches == [1]


def test_a_failing_forward_fails_every_request_of_its_batch_only() -> None:
    calls = []

    def flaky(table: pa.Table) -> Scores:
        calls.append(table.num_rows)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return {"ctr": np.zeros(table.num_rows, np.float32)}

    executor = ThreadPoolExecutor(1)
    batcher = MicroBatcher(flaky, BatcherConfig(max_batch_rows=4, max_wait_s=5.0), executor)

    async def go() -> None:
        outcomes = await asyncio.gather(
            batcher.submit(_rows(1, 2)), batcher.submit(_rows(3, 4)), return_exceptions=True
        )
        assert [type(o) for o in outcomes] == [RuntimeError, RuntimeError]
        assert len((await batcher.submit(_rows(5, 6, 7, 8)))["ctr"]) == 4

    _run(go())
    executor.shutdown()
    assert calls == [4, 4]


def test_a_scorer_returning_the_wrong_number_of_rows_is_an_error() -> None:
    executor = ThreadPoolExecutor(1)
    batcher = MicroBatcher(
        lambda t: {"ctr": np.zeros(1, np.float32)}, BatcherConfig(max_wait_s=0.0), executor
    )
    with pytest.raises(RuntimeError, match=r"returned 1 scores \(expected 3, one per row\)"):
        _run(batcher.submit(_rows(1, 2, 3)))
    executor.shutdown()


def test_value_counts_run_once_per_scored_batch_with_its_requests_missing_summed() -> None:
    model = FakeModel()
    calls: list[tuple[int, list[int]]] = []
    executor = ThreadPoolExecutor(1)
    batcher = MicroBatcher(
        model,
        BatcherConfig(max_batch_rows=8, max_wait_s=5.0, max_queue_rows=32),
        executor,
        count_values=lambda table, missing: calls.append((table.num_rows, missing.tolist())),
    )

    async def go() -> None:
        requests = [(_rows(1, 2), [1, 0]), (_rows(3), [0, 2]), (_rows(4, 5, 6, 7, 8), [3, 1])]
        await asyncio.gather(*(batcher.submit(t, None, np.array(m)) for t, m in requests))

    _run(go())
    executor.shutdown()
    assert calls == [(8, [4, 3])]  # one batch: its 8 rows, and the missing counts added up


def test_a_failing_value_count_does_not_fail_the_batch(caplog: pytest.LogCaptureFixture) -> None:
    def broken(table: pa.Table, missing: np.ndarray) -> None:
        raise ValueError("boom")

    executor = ThreadPoolExecutor(1)
    batcher = MicroBatcher(
        FakeModel(), BatcherConfig(max_wait_s=0.0), executor, ("m", 1), count_values=broken
    )
    result = _run(batcher.submit(_rows(5), None, np.array([0])))
    executor.shutdown()
    np.testing.assert_allclose(result["ctr"], [0.005])
    assert "counting the batch's values failed" in caplog.text
