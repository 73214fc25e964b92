"""The micro-batcher: coalesces concurrent requests for one model version into batches.

Each request arrives as encoded Arrow rows (`serving.convert`). The batcher queues it, waits up
to `max_wait_s` after the oldest queued request for more rows (or until `max_batch_rows` are
queued), concatenates the tables and runs one forward pass under `torch.inference_mode()` in a
thread pool, off the event loop, then hands each request its slice of the probabilities.

Admission follows DESIGN.md step 7: a request that would push the queue over `max_queue_rows`,
or whose deadline the queue cannot meet (estimated from recent batch latency), is refused at
once (`Overloaded` -> RESOURCE_EXHAUSTED); a deadline that expires while the request waits in
the queue ends it with `DeadlineExceeded` (DEADLINE_EXCEEDED).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch

from recsys.features.batch import features_from_encoded
from recsys.features.schema import FeatureSchema
from recsys.models.outputs import CTRModel
from serving.errors import DeadlineExceeded, NotReady, Overloaded
from serving.metrics import ServerMetrics

logger = logging.getLogger(__name__)

Scores = dict[str, np.ndarray]
ScoreFn = Callable[[pa.Table], Scores]
_EWMA_WEIGHT = 0.2  # weight of the newest batch in the latency estimate


def forward(model: CTRModel, schema: FeatureSchema, encoded: pa.Table) -> Scores:
    """Probabilities (float32, one per row) of every served task for encoded rows.

    The scoring step of the server: `features_from_encoded` (the trainer's function) and the
    model's own `probabilities`, under `torch.inference_mode()` (thread-local, so it is entered
    here, in the scoring thread).
    """
    with torch.inference_mode():
        features = features_from_encoded(schema, encoded)
        probs = model.probabilities(model(features))
    return {task: p.detach().to(torch.float32).cpu().numpy() for task, p in probs.items()}


@dataclass(frozen=True)
class BatcherConfig:
    """Batching and admission limits of one model version's queue.

    Args:
        max_batch_rows: a batch closes at this many rows (one request larger than this runs
            alone).
        max_wait_s: how long the oldest queued request waits for more rows.
        max_queue_rows: rows allowed to wait; beyond it requests are refused at once.
        concurrency: batches in flight at once (the scoring threads).
    """

    max_batch_rows: int = 256
    max_wait_s: float = 0.002
    max_queue_rows: int = 8192
    concurrency: int = 1


@dataclass(eq=False)
class _Pending:
    table: pa.Table
    rows: int
    future: asyncio.Future[Scores]
    enqueued: float
    deadline: float | None
    missing: np.ndarray | None = None
    queued: bool = field(default=True)


class MicroBatcher:
    """Queue + batch loop for one model version.

    Args:
        score_fn: encoded rows -> probabilities per task (runs in `executor`).
        config: batching and admission limits.
        executor: the scoring thread pool (shared by every version's batcher).
        label: `(model, version)` for logs and metrics.
        metrics: where batch sizes and queue depth are recorded, if anywhere.
        count_values: called in the scoring thread with each scored batch's encoded rows and
            the sum of its requests' `missing` counts (the server's categorical value counts:
            counted once per batch, not once per request, and off the event loop).
    """

    def __init__(
        self,
        score_fn: ScoreFn,
        config: BatcherConfig,
        executor: Executor,
        label: tuple[str, int] = ("", 0),
        metrics: ServerMetrics | None = None,
        count_values: Callable[[pa.Table, np.ndarray], None] | None = None,
    ) -> None:
        self._score_fn = score_fn
        self._count_values = count_values
        self.config = config
        self._executor = executor
        self.label = label
        self._metrics = metrics
        self._pending: deque[_Pending] = deque()
        self._queued_rows = 0
        self._wakeup = asyncio.Event()
        self._slots: asyncio.Semaphore | None = None  # created in the loop that uses it
        self._runner: asyncio.Task[None] | None = None
        self._in_flight: set[asyncio.Task[None]] = set()
        self._batch_s: float | None = None
        self._closed = False
        self._reporting = True  # whether the queue gauge is this version's to update

    @property
    def queued_rows(self) -> int:
        """Rows waiting in the queue (not yet in a batch)."""
        return self._queued_rows

    @property
    def batch_latency_s(self) -> float | None:
        """Moving average of recent batch latencies (None before the first batch)."""
        return self._batch_s

    def record_latency(self, seconds: float) -> None:
        """Adds one batch latency to the estimate (the model manager seeds it at warm-up)."""
        if self._batch_s is None:
            self._batch_s = seconds
        else:
            self._batch_s = (1 - _EWMA_WEIGHT) * self._batch_s + _EWMA_WEIGHT * seconds

    def estimate_wait_s(self, rows: int) -> float | None:
        """Optimistic time until a request of `rows` more rows would be scored: the batches
        queued ahead of it, `concurrency` at a time, at the recent batch latency. Optimistic on
        purpose: only requests the queue certainly cannot serve in time are refused (and never
        one that finds the batcher idle, see `submit`)."""
        if self._batch_s is None:
            return None
        batches = math.ceil((self._queued_rows + rows) / self.config.max_batch_rows)
        return math.ceil(batches / self.config.concurrency) * self._batch_s

    async def submit(
        self, table: pa.Table, timeout_s: float | None = None, missing: np.ndarray | None = None
    ) -> Scores:
        """Queues encoded rows and returns their probabilities once their batch has run.

        Args:
            table: encoded rows of one request.
            timeout_s: time left until the request's deadline; None means no deadline.
            missing: the request's missing values per counted feature, for `count_values`.

        Raises:
            Overloaded: the queue is full, or (with requests queued or scoring) cannot meet
                the deadline.
            DeadlineExceeded: the deadline expired while the request was queued.
            NotReady: the batcher was closed (the server is shutting down).
        """
        if self._closed:
            raise NotReady(f"batcher {self._name}: closed (the server is shutting down)")
        loop = asyncio.get_running_loop()
        rows = table.num_rows
        limit = self.config.max_queue_rows
        if self._queued_rows + rows > limit:
            raise Overloaded(
                f"batcher {self._name}: queue full ({self._queued_rows} rows queued + {rows} "
                f"requested, expected at most max_queue_rows={limit}); retry with backoff"
            )
        if timeout_s is not None:
            estimate = self.estimate_wait_s(rows)
            # An idle batcher always admits: the estimate only falls when batches run, so one
            # too high (a slow first batch) would otherwise refuse every tight deadline forever.
            idle = not self._pending and not self._in_flight
            if timeout_s <= 0 or (not idle and estimate is not None and estimate > timeout_s):
                raise Overloaded(
                    f"batcher {self._name}: the deadline cannot be met (got {timeout_s * 1e3:.1f}"
                    f" ms left, expected about {(estimate or 0.0) * 1e3:.1f} ms of queueing "
                    f"for {self._queued_rows} queued rows); retry with a longer deadline"
                )
        now = loop.time()
        item = _Pending(
            table=table,
            rows=rows,
            future=loop.create_future(),
            enqueued=now,
            deadline=None if timeout_s is None else now + timeout_s,
            missing=missing,
        )
        self._pending.append(item)
        self._queued_rows += rows
        self._report_queue()
        self._wakeup.set()
        if self._runner is None:
            self._runner = loop.create_task(self._run(), name=f"batcher-{self._name}")
        try:
            if timeout_s is None:
                return await item.future
            return await asyncio.wait_for(asyncio.shield(item.future), timeout_s)
        except TimeoutError:
            where = "in the queue" if item.queued else "while its batch was scoring"
            self._discard(item)
            item.future.cancel()
            raise DeadlineExceeded(
                f"batcher {self._name}: deadline expired {where} (waited "
                f"{(loop.time() - now) * 1e3:.1f} ms); the server is overloaded"
            ) from None
        except asyncio.CancelledError:
            self._discard(item)
            item.future.cancel()
            raise

    def stop_reporting(self) -> None:
        """Removes this version's queue gauge for good (the version was evicted): requests
        still finishing on it would otherwise re-create the series, which then never goes."""
        self._reporting = False
        if self._metrics is not None:
            with contextlib.suppress(KeyError):
                self._metrics.queue_rows.remove(*map(str, self.label))

    async def close(self) -> None:
        """Refuses new requests, fails queued ones with NotReady, waits for running batches."""
        self._closed = True
        while self._pending:
            item = self._pending.popleft()
            item.queued = False
            if not item.future.done():
                item.future.set_exception(NotReady(f"batcher {self._name}: shutting down"))
        self._queued_rows = 0
        self._report_queue()
        if self._in_flight:
            await asyncio.gather(*self._in_flight, return_exceptions=True)
        if self._runner is not None:
            # awaited, so the task is finished when close returns: a loop stopped right after
            # would otherwise destroy it still pending ("Task was destroyed but it is pending")
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner

    # --- internals ---------------------------------------------------------------------------
    @property
    def _name(self) -> str:
        return f"{self.label[0]}/{self.label[1]}"

    def _report_queue(self) -> None:
        if self._metrics is not None and self._reporting:
            self._metrics.queue_rows.labels(*map(str, self.label)).set(self._queued_rows)

    def _discard(self, item: _Pending) -> None:
        if item.queued:
            item.queued = False
            self._pending.remove(item)
            self._queued_rows -= item.rows
            self._report_queue()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.config.concurrency)
        try:
            while self._pending:
                await self._slots.acquire()
                batch = await self._collect(loop)
                if not batch:
                    self._slots.release()
                    continue
                task = loop.create_task(self._execute(batch, self._slots))
                self._in_flight.add(task)
                task.add_done_callback(self._in_flight.discard)
        finally:
            self._runner = None

    async def _collect(self, loop: asyncio.AbstractEventLoop) -> list[_Pending]:
        # Wait for more rows until the oldest request has waited max_wait_s; when every
        # scoring thread was busy, it already has, and the batch leaves at once.
        while self._pending and self._queued_rows < self.config.max_batch_rows:
            remaining = self._pending[0].enqueued + self.config.max_wait_s - loop.time()
            if remaining <= 0:
                break
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                break
        batch: list[_Pending] = []
        rows = 0
        now = loop.time()
        while self._pending:
            item = self._pending[0]
            if batch and rows + item.rows > self.config.max_batch_rows:
                break
            self._pending.popleft()
            item.queued = False
            self._queued_rows -= item.rows
            if item.future.done():
                continue
            if item.deadline is not None and now >= item.deadline:
                item.future.set_exception(
                    DeadlineExceeded(
                        f"batcher {self._name}: deadline expired in the queue (waited "
                        f"{(now - item.enqueued) * 1e3:.1f} ms); the server is overloaded"
                    )
                )
                continue
            batch.append(item)
            rows += item.rows
        self._report_queue()
        return batch

    async def _execute(self, batch: list[_Pending], slots: asyncio.Semaphore) -> None:
        loop = asyncio.get_running_loop()
        try:
            start = time.perf_counter()
            scores = await loop.run_in_executor(self._executor, self._score_batch, batch)
            self.record_latency(time.perf_counter() - start)
            if self._metrics is not None:
                self._metrics.batch_rows.observe(sum(item.rows for item in batch))
            offset = 0
            for item in batch:
                if not item.future.done():
                    item.future.set_result(
                        {task: p[offset : offset + item.rows] for task, p in scores.items()}
                    )
                offset += item.rows
        except Exception as e:  # noqa: BLE001 - handed to every request of the batch
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(e)
        finally:
            slots.release()

    def _score_batch(self, batch: list[_Pending]) -> Scores:
        tables = [item.table for item in batch]
        table = tables[0] if len(tables) == 1 else pa.concat_tables(tables)
        scores = self._score_fn(table)
        for task, p in scores.items():
            if len(p) != table.num_rows:
                raise RuntimeError(
                    f"batcher {self._name}: task '{task}' returned {len(p)} scores (expected "
                    f"{table.num_rows}, one per row)"
                )
        if self._count_values is not None:
            missing = [item.missing for item in batch if item.missing is not None]
            try:
                if len(missing) == len(batch):
                    self._count_values(table, np.sum(missing, axis=0))
            except Exception:  # a metric must never fail the batch's scores
                logger.exception("batcher %s: counting the batch's values failed", self._name)
        return scores
