"""The only place that builds a Ray Train `TorchTrainer`.

Starts (or joins) Ray, builds the Ray Data dataset of the encoded train split, and runs
`train_loop_per_worker` (through training/worker.py's entry) on `num_workers` workers with gloo
(CPU) or nccl (GPU). Checkpoints live under `<run_root>/_ray/<run_name>/`: Ray Train restarts
the worker group from the latest one after a failure (up to `ray.max_failures` times), and a
new `fit()` with the same run name resumes from it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import ray
import ray.data
from ray.data import ExecutionOptions, FileShuffleConfig, RandomSeedConfig
from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from recsys.errors import USER_ERRORS, ConfigError, Interrupted
from training.config import ExperimentConfig
from training.loop import RAY_STORAGE_DIR, RunPaths
from training.worker import train_loop_entry

logger = logging.getLogger(__name__)


def ensure_ray(address: str | None, num_workers: int, cpus_per_worker: float) -> None:
    """Joins `address`, or starts an embedded local Ray sized so Ray Data keeps CPUs to read."""
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    if address:
        check_reachable(address)
        ray.init(address=address, log_to_driver=True)
        return
    # The embedded Ray is this machine alone: no node is drained or preempted, so Ray Train's
    # preemption watcher (one more actor process per run) has nothing to watch, and the
    # controller polls its workers every 0.5 s instead of 2 s, so a run ends (and a failure is
    # seen) sooner. On 2 cores this took a 1-epoch ml100k run from 60 to 53 s. Both stay
    # settable from the environment; a cluster joined with `address` keeps Ray's defaults.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    # Workers reserve fractional CPUs; advertise at least 4 logical CPUs so that read tasks
    # (1 CPU each by default) can run beside them on a 2-core machine (DESIGN.md pitfalls).
    logical = max(4, int(num_workers * cpus_per_worker) + 2, os.cpu_count() or 1)
    # The dashboard serves the state API, which Ray Train's placement-group cleaner polls (it
    # warns every few seconds without it); it listens on loopback only.
    dashboard_port = _free_loopback_port()
    with _state_api_for_ray_processes(f"http://127.0.0.1:{dashboard_port}"):
        ray.init(
            num_cpus=logical,
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            dashboard_port=dashboard_port,
            log_to_driver=True,
            configure_logging=True,
            logging_level=logging.WARNING,
        )


# How long a joined cluster's address may take to accept a TCP connection.
CONNECT_TIMEOUT_S = 5.0


def check_reachable(address: str) -> None:
    """Raises ConfigError unless `address` (host:port or ray://host:port) accepts a TCP
    connection within CONNECT_TIMEOUT_S; "auto" and "local" are left to Ray.

    Written here because `ray.init` retries an unreachable address 20 times, about 40 s
    each, printing three warnings per try: a mistyped --address hung for about 14 minutes."""
    if address in ("auto", "local"):
        return
    target = address.removeprefix("ray://")
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(
            f"ray.address: {address!r} is not host:port (e.g. 10.0.0.1:6379, the head's "
            "GCS port) nor ray://host:port, auto or local"
        )
    try:
        with socket.create_connection((host.strip("[]"), int(port)), CONNECT_TIMEOUT_S):
            pass
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise ConfigError(
            f"ray.address: nothing accepts connections at {address} ({reason}); check the "
            "head's address and port (`ray status` on the head), or leave --address out to "
            "run on an embedded local Ray"
        ) from e


# Ports Ray gives its own components by default (GCS, dashboard, dashboard agent HTTP): a
# dashboard port the OS happened to pick among them makes ray.init refuse the configuration
# ("dashboard_agent_http is trying to use a port number 52365 that is used by other
# components"), as it once did in CI.
RAY_DEFAULT_PORTS = frozenset({6379, 8265, 52365})


def _free_loopback_port() -> int:
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        if port not in RAY_DEFAULT_PORTS:
            return port


@contextlib.contextmanager
def _state_api_for_ray_processes(url: str) -> Iterator[None]:
    """RAY_API_SERVER_ADDRESS=`url` (the embedded Ray's dashboard) while Ray starts, so that
    the processes it starts, and the workers they start later, inherit it; this process's
    environment is restored afterwards.

    Ray Train's placement-group cleaner (a detached actor) polls the state API with no
    address, and Ray then looks for a running cluster on this machine: with a second Ray
    instance running (another `recsys train`, a benchmark) it fails with "Found multiple
    active Ray instances", printing a traceback, and stops watching. The variable is the
    state API's own override (it wins over any address) and `ray.init` does not read it. A
    value already set is meant for some other cluster, so Ray's processes get this one."""
    name = "RAY_API_SERVER_ADDRESS"
    previous = os.environ.get(name)
    os.environ[name] = url
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


@contextlib.contextmanager
def _sigint_handler_restored() -> Iterator[None]:
    """Puts back this process's SIGINT handler when the block ends.

    `TorchTrainer.fit()` installs Ray Train's handler (abort the run's controller) and leaves it
    installed after the run ends: a Ctrl-C later (during the artifact's parity check, or while
    Ray shuts down at exit) then called `abort` on a dead actor, which started a second local
    Ray, printed a traceback and ended in a segfault. Signal handlers can only be set from the
    main thread; elsewhere there is nothing to restore."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    try:
        yield
    finally:
        if previous is not None:  # None: a handler not set from Python, nothing to put back
            signal.signal(signal.SIGINT, previous)


def _quiet_data_context() -> None:
    # Ray Data's per-operator progress bars flood logs from every worker; our loop prints one
    # line per interval instead.
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False


def _uncompressed_bytes(metadata: pq.FileMetaData) -> int:
    """Uncompressed size of a Parquet file's columns, from its row groups' metadata."""
    return sum(metadata.row_group(i).total_byte_size for i in range(metadata.num_row_groups))


def encoded_mb(folder: Path) -> float:
    """Uncompressed size of the Parquet files under `folder` in MB, from their metadata."""
    total = sum(_uncompressed_bytes(pq.ParquetFile(f).metadata) for f in folder.rglob("*.parquet"))
    return total / 2**20


# A materialised split up to this size is read by the driver itself; a larger one by Ray
# Data's read tasks, so the driver's resident memory does not count the split's object-store
# pages (it would after writing them).
DRIVER_READ_MAX_MB = 64.0


def _driver_read_blocks(folder: Path, block_mb: float) -> list[ray.ObjectRef]:
    """The split's rows as Arrow tables of at most about `block_mb` MB each, put into the
    object store one at a time (the driver holds one block, not the split).

    Written here rather than `read_parquet(...).materialize()` for small splits: Ray Data's
    read starts its tasks in worker processes, which took 6 to 9 s for ml100k's 2 MB train
    split on a 2-core machine on every run, while reading the files here takes well under a
    second."""
    refs: list[ray.ObjectRef] = []
    for file in sorted(folder.rglob("*.parquet")):
        parquet = pq.ParquetFile(file)
        metadata = parquet.metadata
        if metadata.num_rows == 0:
            continue
        raw = max(_uncompressed_bytes(metadata), 1)
        rows_per_block = max(1, int(block_mb * 2**20 * metadata.num_rows / raw))
        for batch in parquet.iter_batches(batch_size=rows_per_block):
            refs.append(ray.put(pa.Table.from_batches([batch])))
    if not refs:
        raise ValueError(f"the train split under {folder} has no rows; prepare the data again")
    return refs


def train_dataset(folder: Path, cfg: ExperimentConfig) -> ray.data.Dataset:
    """The train split as a Ray dataset: materialised once in the object store when it is
    small enough (`data.materialize_max_mb`), else streamed from Parquet every epoch.

    Either way blocks hold at most about `data.ingest_block_mb` and their order is drawn
    from `train.seed`, anew for each epoch (Ray Data reseeds with the dataset's execution
    index). A materialised split reaches the workers in the same order in every run with
    that seed (Ray Train's split hands each block to the worker with the fewest rows so far,
    in arrival order). A streamed split's file order is seeded, but its blocks arrive as
    their reads finish, which varies from run to run. Rows are shuffled further within each
    worker's local shuffle buffer (seeded by the loop)."""
    seed = cfg.train.seed
    size_mb = encoded_mb(folder)
    block_bytes = int(cfg.data.ingest_block_mb * 2**20)
    if size_mb > cfg.data.materialize_max_mb:
        logger.info("train split: %.0f MB encoded, streamed from Parquet every epoch", size_mb)
        dataset = ray.data.read_parquet(
            str(folder), shuffle=FileShuffleConfig(seed=seed, reseed_after_execution=True)
        )
        dataset.context.target_max_block_size = block_bytes
        return dataset
    logger.info("train split: %.0f MB encoded, read once into the object store", size_mb)
    if size_mb <= DRIVER_READ_MAX_MB:
        materialized = ray.data.from_arrow_refs(
            _driver_read_blocks(folder, cfg.data.ingest_block_mb)
        )
    else:
        dataset = ray.data.read_parquet(str(folder))
        dataset.context.target_max_block_size = block_bytes
        # the read keeps the sorted file order, so the block list does not depend on which
        # read task finished first; the option is put back for the epochs
        options = dataset.context.execution_options
        options.preserve_order = True
        try:
            materialized = dataset.materialize()
        finally:
            options.preserve_order = False
    return materialized.randomize_block_order(
        seed=RandomSeedConfig(seed=seed, reseed_after_execution=True)
    )


def ingest_options(cfg: ExperimentConfig) -> ExecutionOptions:
    """Ray Train's default ingest options (the current DataContext's limits, order and
    progress settings) with the read-ahead capped at `data.ingest_buffer_mb` per worker (see
    DataConfig).

    Built here rather than by `DataConfig.default_ingest_options()`: in Ray 2.60 that passes
    the deprecated `exclude_resources` (always zero) and prints a RayDeprecationWarning on
    every training run.
    """
    current = ray.data.DataContext.get_current().execution_options
    budget = cfg.data.ingest_buffer_mb * cfg.ray.num_workers * 2**20
    return ExecutionOptions(
        resource_limits=current.resource_limits.copy(object_store_memory=budget),
        preserve_order=current.preserve_order,
        verbose_progress=current.verbose_progress,
    )


def _user_error(error: BaseException) -> BaseException | None:
    """The project's own error (a bad setting or bad data, raised in a worker) inside Ray
    Train's WorkerGroupError, to be reported as one line like any other; None when the run
    failed for another reason."""
    for failure in getattr(error, "worker_failures", {}).values():
        for candidate in (failure, getattr(failure, "cause", None)):
            if isinstance(candidate, USER_ERRORS):
                return candidate
    return None


def ray_storage_path(run_dir: Path) -> Path:
    """Ray Train's storage folder for the runs under run_dir's parent (checkpoints of run X
    are in `<storage>/X/`)."""
    return run_dir.resolve().parent / RAY_STORAGE_DIR


def run_trainer(cfg: ExperimentConfig, paths: RunPaths) -> None:
    """Runs distributed training; rank 0 writes the final report into the run folder."""
    ensure_ray(cfg.ray.address, cfg.ray.num_workers, cfg.ray.cpus_per_worker)
    _quiet_data_context()
    # Only train goes through Ray Data (each worker gets its shard); every worker streams
    # valid from the run folder in row order, as distributed evaluation needs.
    datasets = {"train": train_dataset(Path(paths.encoded_dir) / "train", cfg)}
    env = {
        "OMP_NUM_THREADS": str(cfg.ray.threads_per_worker),
        "MKL_NUM_THREADS": str(cfg.ray.threads_per_worker),
    }
    trainer = TorchTrainer(
        train_loop_entry,
        train_loop_config={"experiment": cfg.model_dump(mode="json"), "paths": paths.model_dump()},
        torch_config=TorchConfig(backend="gloo", timeout_s=cfg.ray.collective_timeout_s),
        scaling_config=ScalingConfig(
            num_workers=cfg.ray.num_workers,
            use_gpu=False,
            resources_per_worker={"CPU": cfg.ray.cpus_per_worker},
        ),
        datasets=datasets,
        dataset_config=DataConfig(
            datasets_to_split=["train"], execution_options=ingest_options(cfg)
        ),
        run_config=RunConfig(
            name=Path(paths.run_dir).name,
            storage_path=str(ray_storage_path(Path(paths.run_dir))),
            failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            worker_runtime_env={"env_vars": env},
        ),
    )
    try:
        with _sigint_handler_restored():
            result = trainer.fit()
    except (KeyboardInterrupt, SystemExit) as e:
        # Ray Train's own Ctrl-C handler aborts the run, then raises SystemExit (or, on the
        # third Ctrl-C, exits at once); before fit() registers it, Python's KeyboardInterrupt.
        name = Path(paths.run_dir).name
        raise Interrupted(
            f"training run {name} stopped by the user (Ctrl-C); its checkpoints stay in "
            f"{ray_storage_path(Path(paths.run_dir)) / name}; for `recsys train`, the same "
            f"command with --set output.run_name={name} resumes it"
        ) from e
    if result.error is not None:
        raise _user_error(result.error) or result.error
