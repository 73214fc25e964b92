"""The model manager: which model versions the server serves, loaded, verified and warm.

It scans `MODEL_REPO/<name>/<version>/` (integer versions), loads the newest valid version of
every model with `recsys.artifact.load_artifact` (which verifies the manifest checksums and the
format version), applies an optional model transform (the hook quantized serving plugs into),
builds the request converter and micro-batcher, runs a warm-up forward pass, and only then
installs the version. It keeps the newest `max_versions_per_model` valid versions, so a request
may pin one of them.

It polls the repository in a background task. A new version is loaded off the event loop and
swapped in with one assignment of an immutable mapping: a request already in flight keeps the
`LoadedModel` it started with, so a swap fails no call. A version that fails to load, verify or
warm up is logged once (WARNING) and skipped while the previous version keeps serving; it is
retried only if its files change. Deleting the served version from disk rolls back to the
newest valid older version (while none loads, the deleted one keeps serving). Readiness
(overall, and per model) is pushed to listeners, which the server turns into grpc.health.v1
statuses. A model folder that cannot be listed is skipped (logged once); the others load.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import MappingProxyType

import numpy as np
import pyarrow as pa

from recsys.artifact import Artifact, list_versions, load_artifact
from recsys.errors import ArtifactError, ConfigError
from recsys.features.schema import FeatureSchema
from recsys.models.outputs import CTRModel
from serving._pb.recsys.v1 import scoring_pb2 as pb
from serving.batcher import BatcherConfig, MicroBatcher, Scores, forward
from serving.config import ServerConfig
from serving.convert import RequestConverter, warmup_table
from serving.errors import NotFound, NotReady, shorten
from serving.metrics import ServerMetrics

logger = logging.getLogger(__name__)

ModelTransform = Callable[[CTRModel], CTRModel]
StatusListener = Callable[[Mapping[str, bool]], Awaitable[None]]
OVERALL = ""  # the health service name of the server as a whole


def transform_for(quantize: str) -> tuple[ModelTransform | None, str]:
    """The model transform and table dtype label for a `--quantize` mode.

    `none` serves the fp32 tables as exported; `int8`/`int4` swap them for fbgemm row-wise
    quantized tables right after load (serving.quantize), so fp32 tables are never held twice.
    """
    if quantize == "none":
        return None, "fp32"
    if quantize in ("int8", "int4"):
        from serving.quantize import quantize_transform

        return quantize_transform(quantize), quantize  # type: ignore[arg-type]
    raise ConfigError(
        f"serve: unknown quantize mode '{quantize}' (expected 'none', 'int8' or 'int4')"
    )


def _count_values(
    metrics: ServerMetrics,
    model: str,
    schema: FeatureSchema,
    encoded: pa.Table,
    missing: np.ndarray,
) -> None:
    """A scored batch's categorical values into `recsys_feature_values_total`: its ids are
    counted here, in the scoring thread, once per batch; `missing` comes from the requests."""
    metrics.record_values(model, schema.outcomes_from(missing, schema.id_counts(encoded)))


@dataclass(frozen=True)
class LoadedModel:
    """One servable model version: the artifact, its (transformed) model, converter, batcher."""

    name: str
    version: int
    artifact: Artifact
    model: CTRModel
    converter: RequestConverter
    batcher: MicroBatcher
    table_dtype: str

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(self.model.served_tasks)

    async def score(self, request: pb.ScoreRequest, timeout_s: float | None) -> Scores:
        """Converts a request (on the event loop) and scores it through the micro-batcher.

        Raises:
            RequestError: the request is invalid, or its rows score NaN (`check_scores`).
        """
        raw = self.converter.raw_table(request)
        encoded = self.converter.encode_table(raw)
        # unseen ids score as the OOV id (cold start): counted, never refused. Only the missing
        # values are counted here (they need the raw rows); the ids, per batch, by the batcher.
        missing = self.converter.schema.missing_values(raw)
        scores = await self.batcher.submit(encoded, timeout_s, missing)
        self.converter.check_scores(raw, encoded, scores)
        return scores


@dataclass(frozen=True)
class _ModelVersions:
    versions: Mapping[int, LoadedModel]

    @property
    def newest(self) -> LoadedModel:
        return self.versions[max(self.versions)]


class ModelManager:
    """Loads, warms, hot-swaps and looks up the models of a repository.

    Args:
        model_repo: the repository, `MODEL_REPO/<name>/<version>/`.
        batcher: batching and admission limits of each version's micro-batcher.
        max_rows_per_request: rows (or candidates) allowed per request.
        max_versions_per_model: newest valid versions kept loaded per model.
        poll_interval_s: seconds between repository scans.
        warmup_rows: rows of the warm-up forward pass.
        transform: applied to each loaded model before warm-up (e.g. quantization).
        table_dtype: what `transform` serves the tables as (reported by GetModelInfo).
        metrics: where model versions, load failures, batches and queues are recorded.
    """

    def __init__(
        self,
        model_repo: Path,
        *,
        batcher: BatcherConfig | None = None,
        max_rows_per_request: int = 4096,
        max_versions_per_model: int = 2,
        poll_interval_s: float = 5.0,
        warmup_rows: int = 8,
        transform: ModelTransform | None = None,
        table_dtype: str = "fp32",
        metrics: ServerMetrics | None = None,
    ) -> None:
        self.model_repo = Path(model_repo)
        self.batcher_config = batcher or BatcherConfig()
        self.max_rows_per_request = max_rows_per_request
        self.max_versions_per_model = max_versions_per_model
        self.poll_interval_s = poll_interval_s
        self.warmup_rows = warmup_rows
        self.transform = transform
        self.table_dtype = table_dtype
        self.metrics = metrics or ServerMetrics()
        self._executor = ThreadPoolExecutor(
            max_workers=self.batcher_config.concurrency, thread_name_prefix="recsys-score"
        )
        self._models: Mapping[str, _ModelVersions] = MappingProxyType({})
        self._status: dict[str, bool] = {OVERALL: False}
        self._failed: dict[tuple[str, int], object] = {}
        self._failure_messages: dict[str, str] = {}
        self._gone_warned: set[tuple[str, int]] = set()
        self._scan_failures: dict[str, str] = {}  # model folder -> why it cannot be listed
        self._listeners: list[StatusListener] = []
        self._refresh_lock = asyncio.Lock()
        self._poller: asyncio.Task[None] | None = None
        self._initial_scan_done = False

    @classmethod
    def from_config(
        cls,
        cfg: ServerConfig,
        transform: ModelTransform | None = None,
        table_dtype: str = "fp32",
        metrics: ServerMetrics | None = None,
    ) -> ModelManager:
        """A manager with the limits of a ServerConfig (`transform` defaults to `cfg.quantize`)."""
        if transform is None:
            transform, table_dtype = transform_for(cfg.quantize)
        return cls(
            cfg.model_repo,
            batcher=BatcherConfig(
                max_batch_rows=cfg.max_batch_rows,
                max_wait_s=cfg.max_wait_ms / 1e3,
                max_queue_rows=cfg.max_queue_rows,
                concurrency=cfg.num_scoring_threads,
            ),
            max_rows_per_request=cfg.max_rows_per_request,
            max_versions_per_model=cfg.max_versions_per_model,
            poll_interval_s=cfg.poll_interval_s,
            warmup_rows=cfg.warmup_rows,
            transform=transform,
            table_dtype=table_dtype,
            metrics=metrics,
        )

    # --- readiness ---------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        """True once the first scan finished with at least one model loaded."""
        return self._status[OVERALL]

    @property
    def statuses(self) -> Mapping[str, bool]:
        """Serving status per health service name: "" (overall) and each model name."""
        return MappingProxyType(dict(self._status))

    def add_listener(self, listener: StatusListener) -> None:
        """Registers a coroutine called with `statuses` whenever one of them changes."""
        self._listeners.append(listener)

    async def wait_ready(self, timeout_s: float) -> bool:
        """Waits until `ready` (polling); returns whether it became ready in time."""
        deadline = time.monotonic() + timeout_s
        while not self.ready and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return self.ready

    # --- lookup ------------------------------------------------------------------------------
    def model_names(self) -> list[str]:
        return sorted(self._models)

    def loaded_versions(self, name: str) -> list[int]:
        models = self._models.get(name)
        return sorted(models.versions) if models else []

    def get(self, name: str, version: int = 0) -> LoadedModel:
        """The loaded version `version` of `name` (0 = the newest).

        Raises:
            NotReady: the repository has not been scanned yet, or the model's versions are
                still loading (or none of them loads).
            NotFound: the model is not in the repository, or the version is not loaded.
        """
        models = self._models.get(name)
        if models is None:
            if not self._initial_scan_done:
                raise NotReady(
                    f"model manager: still loading models from {self.model_repo}; retry shortly"
                )
            if name in self._status:
                reason = self._failure_messages.get(name, "its newest version is loading")
                raise NotReady(f"model manager: model '{name}' is not loaded yet ({reason})")
            raise NotFound(
                f"model manager: model '{shorten(name)}' is not in the repository "
                f"{self.model_repo} (got {shorten(name)!r}, expected one of {self.model_names()})"
            )
        if version == 0:
            return models.newest
        loaded = models.versions.get(version)
        if loaded is None:
            raise NotFound(
                f"model manager: version {version} of model '{name}' is not loaded (expected "
                f"one of {sorted(models.versions)}, or 0 for the newest); the newest "
                f"{self.max_versions_per_model} valid versions are kept"
            )
        return loaded

    # --- lifecycle ---------------------------------------------------------------------------
    def check_repository(self) -> None:
        """Raises ConfigError unless the model repository is a folder."""
        if not self.model_repo.is_dir():
            raise ConfigError(
                f"serve: model repository {self.model_repo} is not a folder (expected "
                "MODEL_REPO/<name>/<version>/); create it or fix --model-repo"
            )

    async def start(self) -> None:
        """Starts the background task: a first scan at once, then one every poll interval."""
        self.check_repository()
        if self._poller is None:
            self._poller = asyncio.get_running_loop().create_task(
                self._poll(), name="model-manager-poll"
            )

    async def close(self) -> None:
        """Stops polling, drains every batcher and stops the scoring threads."""
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
            self._poller = None
        for models in self._models.values():
            for loaded in models.versions.values():
                await loaded.batcher.close()
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _poll(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception:
                logger.exception("model manager: scan of %s failed; retrying", self.model_repo)
            await asyncio.sleep(self.poll_interval_s)

    async def refresh(self) -> None:
        """Scans the repository once: loads new versions, evicts old ones, updates statuses."""
        async with self._refresh_lock:
            on_disk = await asyncio.to_thread(self._scan)
            if not on_disk and not self._initial_scan_done:
                logger.warning(
                    "model manager: %s holds no model versions yet (expected "
                    "<name>/<version>/ folders as `recsys train` writes them); health stays "
                    "NOT_SERVING until one appears (scanned every %gs)",
                    self.model_repo,
                    self.poll_interval_s,
                )
            for name in sorted(on_disk):
                if name not in self._status:
                    await self._set_status(name, False)
                await self._refresh_model(name, on_disk[name])
            self._initial_scan_done = True
            await self._set_status(OVERALL, bool(self._models))

    def _scan(self) -> dict[str, list[int]]:
        found = {}
        for entry in sorted(self.model_repo.iterdir()):
            if not entry.is_dir() or entry.name.startswith("."):
                continue
            try:
                versions = list_versions(entry)
            except (OSError, ValueError) as e:
                # One unreadable model folder (a stray "²" sub-folder passes isdigit() but not
                # int()) must not stop the scan of the others; a model already served keeps
                # serving, as its versions are not refreshed while its folder cannot be read.
                problem = str(e)
                if self._scan_failures.get(entry.name) != problem:
                    self._scan_failures[entry.name] = problem
                    logger.warning(
                        "model manager: cannot list the versions of model '%s' in %s (%s); "
                        "skipping it until its folder is fixed (expected integer version "
                        "folders only)",
                        entry.name,
                        entry,
                        problem,
                    )
                continue
            self._scan_failures.pop(entry.name, None)
            if versions:
                found[entry.name] = versions
        return found

    async def _refresh_model(self, name: str, on_disk: list[int]) -> None:
        current = dict(self._models[name].versions) if name in self._models else {}
        # the newest served version still on disk: deleting the newest version from disk rolls
        # back to the newest valid older one
        on_disk_loaded = [version for version in current if version in on_disk]
        newest_loaded = max(on_disk_loaded) if on_disk_loaded else None
        keep: dict[int, LoadedModel] = {}
        for version in sorted(on_disk, reverse=True):
            if len(keep) >= self.max_versions_per_model:
                break
            if version in current:
                keep[version] = current[version]
                continue
            if newest_loaded is not None and version < newest_loaded:
                continue  # older than what is served: only loaded on the first scan
            path = self.model_repo / name / str(version)
            signature = await asyncio.to_thread(_signature, path)
            if self._failed.get((name, version)) == signature:
                continue
            try:
                keep[version] = await asyncio.to_thread(self._load, name, version, path)
            except Exception as e:  # any failure skips the version (logged below)
                self._failed[(name, version)] = signature
                self._failure_messages[name] = f"version {version} failed: {e}"
                self.metrics.load_failures.labels(name).inc()
                logger.warning(
                    "model manager: version %d of model '%s' failed to load and is skipped "
                    "(still serving %s): %s",
                    version,
                    name,
                    f"version {newest_loaded}" if newest_loaded else "no version",
                    e,
                    exc_info=not isinstance(e, ArtifactError),
                )
        gone = sorted(set(current) - set(on_disk))
        if not keep and current:
            keep = current  # every served version vanished from disk: keep serving them
            for version in gone:
                if (name, version) not in self._gone_warned:
                    self._gone_warned.add((name, version))
                    logger.warning(
                        "model manager: version %d of model '%s' was removed from disk; "
                        "still serving it (no other valid version)",
                        version,
                        name,
                    )
        if keep.keys() != current.keys():
            models = dict(self._models)
            if keep:
                models[name] = _ModelVersions(MappingProxyType(keep))
            self._models = MappingProxyType(models)  # the atomic swap
            newest = max(keep) if keep else None
            logger.info(
                "model manager: model '%s' now serves version %s (loaded %s, evicted %s)",
                name,
                newest,
                sorted(set(keep) - set(current)),
                sorted(set(current) - set(keep)),
            )
            if newest is not None:
                self.metrics.model_version.labels(name).set(newest)
                self._failure_messages.pop(name, None)
            for version in set(current) - set(keep):
                # Requests already holding an evicted version finish on it; its batcher then
                # idles and is garbage collected with the last reference.
                current[version].batcher.stop_reporting()
        await self._set_status(name, bool(keep))

    def _load(self, name: str, version: int, path: Path) -> LoadedModel:
        """Loads, verifies, transforms and warms one version (runs in a worker thread)."""
        start = time.perf_counter()
        artifact = load_artifact(path)
        model = self.transform(artifact.model) if self.transform else artifact.model
        model.eval()
        converter = RequestConverter(
            artifact.schema,
            artifact.side_table("user"),
            artifact.side_table("item"),
            self.max_rows_per_request,
        )
        score_fn = partial(forward, model, artifact.schema)
        batcher = MicroBatcher(
            score_fn,
            self.batcher_config,
            self._executor,
            (name, version),
            self.metrics,
            count_values=partial(_count_values, self.metrics, name, artifact.schema),
        )
        encoded = converter.encode_table(warmup_table(artifact.schema, self.warmup_rows))
        # The first pass pays one-off costs (lazy init, allocator warm-up) and says nothing
        # about steady latency, so only the second seeds the admission estimate.
        score_fn(encoded)
        warm_start = time.perf_counter()
        scores = score_fn(encoded)
        batcher.record_latency(time.perf_counter() - warm_start)
        _check_warmup(path, scores, model.served_tasks, self.warmup_rows)
        logger.info(
            "model manager: loaded %s version %d from %s in %.2fs (tasks %s)",
            name,
            version,
            path,
            time.perf_counter() - start,
            list(model.served_tasks),
        )
        return LoadedModel(name, version, artifact, model, converter, batcher, self.table_dtype)

    async def _set_status(self, name: str, serving: bool) -> None:
        if self._status.get(name) == serving:
            return
        self._status[name] = serving
        snapshot = self.statuses
        for listener in self._listeners:
            await listener(snapshot)


def _check_warmup(path: Path, scores: Scores, tasks: tuple[str, ...], rows: int) -> None:
    if sorted(scores) != sorted(tasks):
        raise ArtifactError(
            f"artifact {path}: warm-up returned tasks {sorted(scores)} (expected the served "
            f"tasks {sorted(tasks)})"
        )
    for task, p in scores.items():
        if p.shape != (rows,) or not np.isfinite(p).all() or ((p < 0) | (p > 1)).any():
            raise ArtifactError(
                f"artifact {path}: warm-up scores of task '{task}' are not {rows} "
                f"probabilities in [0, 1] (got shape {p.shape}, first values "
                f"{p[:3].tolist()}); the weights are probably corrupt"
            )


def _signature(path: Path) -> object:
    """What identifies a version folder's contents cheaply: (file, size, mtime) of each file."""
    entries = []
    for root, _dirs, files in os.walk(path):
        for file in files:
            full = os.path.join(root, file)
            try:
                stat = os.stat(full)
            except OSError:
                continue
            entries.append((os.path.relpath(full, path), stat.st_size, stat.st_mtime_ns))
    return tuple(sorted(entries))
