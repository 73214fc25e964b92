"""The train split reaches the workers through Ray Data: read once into the object store when
it is small (`data.materialize_max_mb`), streamed from Parquet every epoch otherwise; both give
every row once per pass, in an order drawn from `train.seed` anew every epoch. Also the
embedded Ray's Ray Train settings and state-API address."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from ray.train import DataConfig

from recsys.errors import ConfigError
from training import ray_runner
from training.config import load_config
from training.ray_runner import encoded_mb, ingest_options, train_dataset

ROWS_PER_FILE = 5000


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield
    if started:
        ray.shutdown()


@pytest.fixture()
def train_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "train"
    folder.mkdir()
    for part in range(3):
        ids = pa.array(range(part * ROWS_PER_FILE, (part + 1) * ROWS_PER_FILE), pa.int64())
        pq.write_table(pa.table({"row": ids, "x": ids}), folder / f"part-{part}.parquet")
    return folder


def test_encoded_size_is_the_uncompressed_column_bytes(train_folder: Path) -> None:
    # 15,000 rows x 2 int64 columns = 240 kB of values (plus a little per-page overhead)
    assert 240_000 / 2**20 <= encoded_mb(train_folder) < 1.3 * 240_000 / 2**20


def _rows(dataset: ray.data.Dataset) -> list[int]:
    batches = dataset.iter_batches(batch_format="pyarrow")
    return sorted(row for batch in batches for row in batch["row"].to_pylist())


@pytest.mark.parametrize("driver_read_max_mb", [64.0, 0.0], ids=["driver-read", "ray-data-read"])
def test_a_small_split_is_read_once_and_replayed_every_epoch(
    local_ray: None, train_folder: Path, monkeypatch: pytest.MonkeyPatch, driver_read_max_mb: float
) -> None:
    # a split up to DRIVER_READ_MAX_MB is read by the driver, a larger one by Ray Data
    monkeypatch.setattr(ray_runner, "DRIVER_READ_MAX_MB", driver_read_max_mb)
    dataset = train_dataset(train_folder, load_config(None, ["data.materialize_max_mb=1024"]))
    shutil.rmtree(train_folder)  # read once: the Parquet files are no longer needed
    for _ in range(2):  # two epochs: every row exactly once in each
        assert _rows(dataset) == list(range(3 * ROWS_PER_FILE))


def test_a_split_over_the_limit_streams_from_parquet(local_ray: None, train_folder: Path) -> None:
    dataset = train_dataset(train_folder, load_config(None, ["data.materialize_max_mb=0"]))
    assert _rows(dataset) == list(range(3 * ROWS_PER_FILE))
    shutil.rmtree(train_folder)  # streamed: the next epoch reads the files again
    with pytest.raises(Exception, match=r"part-|No such file|not found|FileNotFound"):
        _rows(dataset)


@pytest.mark.parametrize(
    ("materialize_max_mb", "driver_read_max_mb"),
    [(0, 64.0), (1024, 64.0), (1024, 0.0)],
    ids=["streamed", "materialised-driver-read", "materialised-ray-data-read"],
)
def test_blocks_are_cut_at_ingest_block_mb(
    local_ray: None,
    train_folder: Path,
    monkeypatch: pytest.MonkeyPatch,
    materialize_max_mb: int,
    driver_read_max_mb: float,
) -> None:
    # each file holds 80 kB of values; at a 20 kB limit it is cut into several blocks, at the
    # default (4 MB) a file stays one block
    monkeypatch.setattr(ray_runner, "DRIVER_READ_MAX_MB", driver_read_max_mb)
    sizes = {}
    for limit in (0.02, 4.0):
        cfg = load_config(
            None,
            [f"data.materialize_max_mb={materialize_max_mb}", f"data.ingest_block_mb={limit}"],
        )
        blocks = train_dataset(train_folder, cfg).iter_batches(
            batch_size=None, batch_format="pyarrow"
        )
        sizes[limit] = [block.nbytes for block in blocks]
    assert len(sizes[4.0]) <= 3 and sum(sizes[4.0]) == 3 * ROWS_PER_FILE * 16
    assert len(sizes[0.02]) > 3 * 3 and sum(sizes[0.02]) == sum(sizes[4.0])
    assert max(sizes[0.02]) <= 1.5 * 0.02 * 2**20


def test_the_read_ahead_is_capped_per_worker() -> None:
    cfg = load_config(None, ["data.ingest_buffer_mb=8", "ray.num_workers=2"])
    with warnings.catch_warnings():
        # Ray's own default options pass this deprecated option and warn on every run
        warnings.filterwarnings("error", message=".*exclude_resources")
        options = ingest_options(cfg)
    assert options.resource_limits.object_store_memory == 2 * 8 * 2**20
    defaults = DataConfig.default_ingest_options()  # the rest as Ray Train would set it
    assert options.resource_limits.cpu == defaults.resource_limits.cpu
    assert options.preserve_order == defaults.preserve_order
    assert options.verbose_progress == defaults.verbose_progress


def _epoch_orders(folder: Path, seed: int, epochs: int = 2) -> list[list[int]]:
    """The row order of each epoch of a fresh materialised train dataset for `seed`."""
    cfg = load_config(
        None, ["data.materialize_max_mb=1024", "data.ingest_block_mb=0.02", f"train.seed={seed}"]
    )
    dataset = train_dataset(folder, cfg)
    return [
        [
            row
            for batch in dataset.iter_batches(batch_format="pyarrow")
            for row in batch["row"].to_pylist()
        ]
        for _ in range(epochs)
    ]


@pytest.mark.parametrize("driver_read_max_mb", [64.0, 0.0], ids=["driver-read", "ray-data-read"])
def test_the_seed_fixes_every_epochs_block_order(
    local_ray: None, train_folder: Path, monkeypatch: pytest.MonkeyPatch, driver_read_max_mb: float
) -> None:
    monkeypatch.setattr(ray_runner, "DRIVER_READ_MAX_MB", driver_read_max_mb)
    first, again, other = (_epoch_orders(train_folder, seed) for seed in (0, 0, 1))
    rows = list(range(3 * ROWS_PER_FILE))
    assert all(sorted(epoch) == rows for epoch in first)
    assert first == again  # the same seed: the same order, epoch by epoch
    assert first[0] != first[1]  # a new order every epoch
    assert first != other  # another seed, other orders


def _fake_ray(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, object]]:
    calls: list[dict[str, object]] = []
    monkeypatch.setattr(ray_runner.ray, "is_initialized", lambda: False)

    def init(**kwargs: object) -> None:
        # with the state-API override the Ray processes it starts would inherit
        calls.append({**kwargs, "env": os.environ.get("RAY_API_SERVER_ADDRESS")})

    monkeypatch.setattr(ray_runner.ray, "init", init)
    for name in (
        "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER",
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S",
        "RAY_API_SERVER_ADDRESS",
    ):
        monkeypatch.setenv(name, "")  # so that the test's end restores the variable
        monkeypatch.delenv(name)
    return calls


def test_the_embedded_ray_has_no_preemption_watcher_and_polls_its_workers_often(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = _fake_ray(monkeypatch)
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "3")  # the user's own setting stays
    ray_runner.ensure_ray(None, num_workers=2, cpus_per_worker=0.5)
    assert calls and "address" not in calls[0]
    assert os.environ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "0"
    assert os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "3"


def test_the_embedded_rays_processes_are_told_its_own_dashboard_for_the_state_api(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = _fake_ray(monkeypatch)
    ray_runner.ensure_ray(None, num_workers=2, cpus_per_worker=0.5)
    port = calls[0]["dashboard_port"]
    assert isinstance(port, int) and port > 0
    assert calls[0]["dashboard_host"] == "127.0.0.1"
    assert calls[0]["env"] == f"http://127.0.0.1:{port}"
    assert "RAY_API_SERVER_ADDRESS" not in os.environ  # this process's environment is kept


def test_a_state_api_address_set_for_another_cluster_is_kept_here_not_in_ray(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = _fake_ray(monkeypatch)
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://10.0.0.1:8265")
    ray_runner.ensure_ray(None, num_workers=2, cpus_per_worker=0.5)
    assert calls[0]["env"] == f"http://127.0.0.1:{calls[0]['dashboard_port']}"
    assert os.environ["RAY_API_SERVER_ADDRESS"] == "http://10.0.0.1:8265"


# Starts an embedded Ray through ensure_ray, asks the state API from inside a Ray task (as Ray
# Train's placement-group cleaner does, with no address) and prints the answer, then holds its
# Ray up until stdin closes.
_STATE_API_PROBE = """
import sys
import ray
from training.ray_runner import ensure_ray

ensure_ray(None, num_workers=2, cpus_per_worker=0.5)

@ray.remote
def probe():
    from ray.util.state import list_actors
    try:
        list_actors(timeout=20)
        return "state-api ok"
    except Exception as error:
        return f"state-api failed: {type(error).__name__}: {error}"

print(ray.get(probe.remote()), flush=True)
sys.stdin.read()
"""


@pytest.mark.slow
def test_the_state_api_works_inside_an_embedded_ray_beside_another() -> None:
    """Two `recsys train` runs on one machine start two embedded Rays. Ray's own address
    lookup then finds both and fails, which stopped Ray Train's placement-group cleaner with a
    "Found multiple active Ray instances" traceback."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    first = _start_probe(env)
    try:
        assert _probe_answer(first) == "state-api ok"
        second = _start_probe(env)
        try:
            assert _probe_answer(second) == "state-api ok"
        finally:
            _stop_probe(second)
    finally:
        _stop_probe(first)


def _start_probe(env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", _STATE_API_PROBE],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )


def _probe_answer(process: subprocess.Popen[str]) -> str:
    assert process.stdout is not None
    for line in process.stdout:
        if line.startswith("state-api"):
            return line.strip()
    raise AssertionError(f"the probe exited ({process.wait()}) without an answer")


def _stop_probe(process: subprocess.Popen[str]) -> None:
    assert process.stdin is not None
    process.stdin.close()
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def test_a_joined_cluster_keeps_ray_trains_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _fake_ray(monkeypatch)
    monkeypatch.setattr(ray_runner, "check_reachable", lambda address: None)
    ray_runner.ensure_ray("10.0.0.1:6379", num_workers=2, cpus_per_worker=0.5)
    assert calls[0]["address"] == "10.0.0.1:6379"
    assert "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER" not in os.environ
    assert "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S" not in os.environ


def test_an_address_that_accepts_connections_passes_the_check() -> None:
    with socket.socket() as head:
        head.bind(("127.0.0.1", 0))
        head.listen()
        port = head.getsockname()[1]
        ray_runner.check_reachable(f"127.0.0.1:{port}")
        ray_runner.check_reachable(f"ray://127.0.0.1:{port}")
    ray_runner.check_reachable("auto")  # left to Ray (`ray job submit` sets it)


def test_an_unreachable_address_fails_at_once_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{closed.getsockname()[1]}"
    calls = _fake_ray(monkeypatch)
    with pytest.raises(ConfigError, match=rf"nothing accepts connections at {address} \("):
        ray_runner.ensure_ray(address, num_workers=2, cpus_per_worker=0.5)
    assert calls == []  # Ray was not asked to connect


@pytest.mark.parametrize("address", ["10.0.0.1", "10.0.0.1:port", ":6379", "ray://head"])
def test_a_malformed_address_is_refused(address: str) -> None:
    with pytest.raises(ConfigError, match="is not host:port"):
        ray_runner.check_reachable(address)


def test_a_workers_own_error_is_reported_as_itself_not_as_ray_trains_wrapper() -> None:
    from ray.train.v2.api.exceptions import WorkerGroupError

    from recsys.errors import DataError
    from training.ray_runner import _user_error

    cause = DataError("train.valid_exclude_share=0.99 leaves no valid rows; lower it")
    assert _user_error(WorkerGroupError("failed", {0: cause, 1: cause})) is cause

    class Wrapped(Exception):  # Ray's RayTaskError keeps the worker's exception as `cause`
        pass

    wrapped = Wrapped("in a task")
    wrapped.cause = cause  # type: ignore[attr-defined]
    assert _user_error(WorkerGroupError("failed", {1: wrapped})) is cause
    assert _user_error(WorkerGroupError("failed", {0: RuntimeError("a bug")})) is None
    assert _user_error(RuntimeError("not from the workers")) is None


def test_the_dashboard_port_is_never_one_ray_gives_its_own_components(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An OS-picked dashboard port equal to the dashboard agent's default (52365) made
    ray.init refuse to start (it happened once in CI): such a port is drawn again."""
    picks = iter([52365, 8265, 6379, 41234])

    class Probe:
        def __enter__(self) -> Probe:
            return self

        def __exit__(self, *exc: object) -> None:
            return None

        def bind(self, address: tuple[str, int]) -> None:
            assert address == ("127.0.0.1", 0)

        def getsockname(self) -> tuple[str, int]:
            return ("127.0.0.1", next(picks))

    monkeypatch.setattr(ray_runner.socket, "socket", lambda *args: Probe())
    assert ray_runner._free_loopback_port() == 41234
