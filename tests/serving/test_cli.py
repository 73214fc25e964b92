"""The serving commands as users run them: `recsys serve` drains in-flight calls on SIGTERM and
exits 0, `recsys score` prints scores as JSON lines, `recsys verify-artifact` passes a good
artifact and fails (exit 1) when the served scores disagree with the eager ones; user errors are
one `error:` line with exit code 2."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recsys.features.schema import FeatureSchema
from serving import cli
from serving.client import ScoringClient
from tests.serving.conftest import (
    MODEL_NAME,
    WAIT_S,
    StartServer,
    eager_scores,
    explicit_rows,
    self_signed_cert,
    wait_until,
)

ADDRESS_RE = re.compile(r"serving on ([\d.]+):(\d+)(?: metrics on [\d.]+:(\d+))?")


def _recsys(*args: str | Path, cwd: Path, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "recsys.cli", *map(str, args)],
        cwd=cwd,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.fixture
def served_process(repo: Path, tmp_path: Path) -> Iterator[tuple[subprocess.Popen, str, int]]:
    """`python -m serving.server` on port 0; requests wait up to 3 s in the queue for company,
    so calls are reliably in flight when the test sends SIGTERM."""
    log = (tmp_path / "server.log").open("w")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "serving.server",
            "--model-repo",
            str(repo),
            "--port",
            "0",
            "--metrics-port",
            "0",
            "--max-wait-ms",
            "3000",
            "--max-batch-rows",
            "1024",
            "--grace-s",
            "60",
        ],
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
        cwd=tmp_path,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()  # blocks until the server printed its address
        match = ADDRESS_RE.search(line)
        assert match, (
            f"unexpected first line {line!r}; log: {(tmp_path / 'server.log').read_text()}"
        )
        yield process, f"{match.group(1)}:{match.group(2)}", int(match.group(3))
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(WAIT_S)
        log.close()


@pytest.mark.slow
def test_sigterm_drains_in_flight_calls_then_exits_0(
    served_process: tuple[subprocess.Popen, str, int],
    tiny_schema: FeatureSchema,
    tiny_table: pa.Table,
    tmp_path: Path,
) -> None:
    process, address, metrics_port = served_process
    raw = tiny_table.select(tiny_schema.dataset.input_columns()).slice(0, 6)
    with ScoringClient(address, timeout_s=WAIT_S) as client, ThreadPoolExecutor(3) as pool:
        wait_until(lambda: client.health() == "SERVING", "the server SERVING")
        in_flight = [
            pool.submit(client.score_rows, MODEL_NAME, raw.slice(2 * i, 2)) for i in range(3)
        ]

        def queued_rows() -> float:
            url = f"http://127.0.0.1:{metrics_port}/metrics"
            with urllib.request.urlopen(url, timeout=WAIT_S) as page:
                text = page.read().decode()
            match = re.search(r'recsys_queue_rows\{model="tiny",version="1"\} ([\d.]+)', text)
            return float(match.group(1)) if match else 0.0

        wait_until(lambda: queued_rows() == 6, "three calls waiting in the queue")
        process.send_signal(signal.SIGTERM)
        results = [f.result(WAIT_S) for f in in_flight]
    assert process.wait(WAIT_S) == 0
    expected = eager_scores(tiny_schema, 1, raw)
    for i, result in enumerate(results):
        np.testing.assert_allclose(
            result.scores["ctr"], expected[2 * i : 2 * i + 2], rtol=0, atol=1e-6
        )
    log = (tmp_path / "server.log").read_text()
    assert "signal received" in log and "serve: stopped" in log
    assert "Traceback" not in log


def _queued_rows(metrics_port: int) -> float:
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=WAIT_S) as page:
        text = page.read().decode()
    match = re.search(r'recsys_queue_rows\{model="tiny",version="1"\} ([\d.]+)', text)
    return float(match.group(1)) if match else 0.0


@pytest.mark.slow
def test_a_second_signal_stops_at_once_with_exit_128_plus_signal(
    served_process: tuple[subprocess.Popen, str, int],
    tiny_schema: FeatureSchema,
    tiny_table: pa.Table,
    tmp_path: Path,
) -> None:
    """The first SIGTERM drains (calls wait up to 3 s in the queue, the grace is 60 s); a
    second one used to kill the process silently (a second Ctrl-C printed a traceback)."""
    process, address, metrics_port = served_process
    raw = tiny_table.select(tiny_schema.dataset.input_columns()).slice(0, 2)
    with ScoringClient(address, timeout_s=WAIT_S) as client, ThreadPoolExecutor(1) as pool:
        wait_until(lambda: client.health() == "SERVING", "the server SERVING")
        in_flight = pool.submit(client.score_rows, MODEL_NAME, raw)
        wait_until(lambda: _queued_rows(metrics_port) == 2, "the call waiting in the queue")
        process.send_signal(signal.SIGTERM)
        log_file = tmp_path / "server.log"
        wait_until(lambda: "signal received" in log_file.read_text(), "the first signal")
        start = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert process.wait(WAIT_S) == 128 + signal.SIGTERM
        assert time.monotonic() - start < 10.0
        with pytest.raises(grpc.RpcError) as call:  # failed at once, not answered
            in_flight.result(WAIT_S)
        assert call.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
    log = log_file.read_text()
    assert "second signal (SIGTERM): stopping now" in log and "serve: stopped" in log
    assert "Traceback" not in log


def test_recsys_serve_logs_its_own_progress_without_library_info_lines(
    repo: Path, tmp_path: Path
) -> None:
    """`recsys serve` sets up logging before it imports TorchRec, whose fbgemm_gpu logs each
    library it loads at INFO on the root logger: only the project's loggers speak at INFO. A
    SIGTERM sent as soon as the address is printed stops it cleanly (exit 0)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "recsys.cli", "serve", "--model-repo", str(repo), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    try:
        assert process.stdout is not None
        assert ADDRESS_RE.search(process.stdout.readline())
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=WAIT_S)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(WAIT_S)
    assert process.returncode == 0, stderr
    assert "INFO serving" in stderr  # the server's own progress still shows
    assert "Successfully loaded" not in stderr
    assert "Traceback" not in stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--batch-rows", "0"], "argument --batch-rows: expected an integer >= 1 (got 0)"),
        (["--timeout-s", "0"], "argument --timeout-s: expected seconds > 0 (got 0)"),
        (["--connect-timeout-s", "-1"], "argument --connect-timeout-s: expected seconds > 0"),
        (["--version", "-1"], "argument --version: expected an integer >= 0 (got -1)"),
    ],
)
def test_score_refuses_out_of_range_options(tmp_path: Path, args: list[str], message: str) -> None:
    rows_file = tmp_path / "rows.jsonl"
    rows_file.write_text('{"user_id": "1"}\n')
    result = _recsys(
        "score",
        "--server",
        "127.0.0.1:1",
        "--model",
        MODEL_NAME,
        "--input",
        rows_file,
        *args,
        cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr
    assert f"recsys score: error: {message}" in result.stderr
    assert "Traceback" not in result.stderr


def test_score_names_the_address_when_no_server_answers(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{probe.getsockname()[1]}"
    rows_file = tmp_path / "rows.jsonl"
    rows_file.write_text('{"user_id": "1"}\n')
    result = _recsys(
        "score",
        "--server",
        address,
        "--model",
        MODEL_NAME,
        "--input",
        rows_file,
        "--connect-timeout-s",
        "1",
        cwd=tmp_path,
    )
    assert result.returncode == 1, result.stderr
    expected = (
        f"error: score: no server accepted a connection without TLS at {address} within 1 s "
        "(is `recsys serve` running there? check --server, and --tls-root for a TLS server)"
    )
    assert result.stderr.strip().splitlines() == [expected]


@pytest.mark.slow
def test_score_prints_json_lines_for_rows_and_ranking(
    repo: Path,
    start_server: StartServer,
    tiny_schema: FeatureSchema,
    tiny_table: pa.Table,
    tmp_path: Path,
) -> None:
    server = start_server(repo)
    server.wait_serving()
    raw = tiny_table.select(tiny_schema.dataset.input_columns()).slice(0, 3)
    rows_file = tmp_path / "rows.jsonl"
    rows_file.write_text("\n".join(json.dumps(row) for row in raw.to_pylist()) + "\n")
    result = _recsys(
        "score",
        "--server",
        server.address,
        "--model",
        MODEL_NAME,
        "--input",
        rows_file,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["version"] for line in lines] == [1, 1, 1]
    np.testing.assert_allclose(
        [line["scores"]["ctr"] for line in lines], eager_scores(tiny_schema, 1, raw), atol=1e-6
    )

    user, items = tiny_table["user_id"][0].as_py(), tiny_table["item_id"].to_pylist()[:4]
    ranking = json.dumps({"context": {"user_id": user}, "item_ids": items})
    result = _recsys(
        "score",
        "--server",
        server.address,
        "--model",
        MODEL_NAME,
        "--input",
        "-",
        "--ranking",
        cwd=tmp_path,
        stdin=ranking + "\n",
    )
    assert result.returncode == 0, result.stderr
    (line,) = [json.loads(line) for line in result.stdout.splitlines()]
    assert line["item_ids"] == items
    explicit = explicit_rows(tiny_table, user, items)
    np.testing.assert_allclose(
        line["scores"]["ctr"], eager_scores(tiny_schema, 1, explicit), atol=1e-6
    )

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({**raw.to_pylist()[0], "genre": ["Drama"]}) + "\n")
    result = _recsys(
        "score", "--server", server.address, "--model", MODEL_NAME, "--input", bad, cwd=tmp_path
    )
    assert result.returncode == 2
    (error,) = _error_lines(result.stderr)
    assert "INVALID_ARGUMENT" in error and "feature 'genre'" in error
    assert "Traceback" not in result.stderr

    no_items = json.dumps({"context": {"user_id": user}, "item_ids": []})
    result = _recsys(
        "score",
        "--server",
        server.address,
        "--model",
        MODEL_NAME,
        "--input",
        "-",
        "--ranking",
        cwd=tmp_path,
        stdin=no_items + "\n",
    )
    assert result.returncode == 2
    assert _error_lines(result.stderr) == [
        "error: score: -:1: item_ids is [] (expected a non-empty list of candidate item ids)"
    ]


def test_score_with_a_none_inside_a_bag_is_one_error_line(
    repo: Path,
    start_server: StartServer,
    tiny_schema: FeatureSchema,
    tiny_table: pa.Table,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    server = start_server(repo)
    server.wait_serving()
    row = tiny_table.select(tiny_schema.dataset.input_columns()).slice(0, 1).to_pylist()[0]
    rows_file = tmp_path / "rows.jsonl"
    rows_file.write_text(json.dumps({**row, "genres": ["Drama", None]}) + "\n")
    argv = ["--server", server.address, "--model", MODEL_NAME, "--input", str(rows_file)]
    assert cli.score(argv) == 2
    stderr = capsys.readouterr().err
    expected = (
        "error: score: rows 1..1: client: feature 'genres' row 0 has a bag holding a missing "
        "value (got ['Drama', None], expected strings or integers only); drop the None from the "
        "bag, or send None for the whole row to mark it missing"
    )
    assert _error_lines(stderr) == [expected]
    assert "Traceback" not in stderr


@pytest.fixture
def artifact_with_data(tmp_path: Path, tiny_schema: FeatureSchema, tiny_table: pa.Table) -> Path:
    """An artifact whose metrics.json names a data folder holding valid.parquet, as training
    writes it."""
    data = tmp_path / "data"
    data.mkdir()
    pq.write_table(tiny_table.slice(100, 80), data / "valid.parquet")
    from recsys.artifact import write_artifact
    from tests.serving.conftest import EMBEDDING, MODEL, build_tiny_model, side_tables

    return write_artifact(
        tmp_path / "model_repo",
        "autoint_tiny",
        build_tiny_model(tiny_schema, 5),
        MODEL,
        EMBEDDING,
        tiny_schema,
        {"data": {"dataset": "tiny", "path": str(data)}},
        side_tables(tiny_table),
    )


@pytest.mark.slow
def test_verify_artifact_passes_a_good_artifact(artifact_with_data: Path, tmp_path: Path) -> None:
    result = _recsys(
        "verify-artifact", "--artifact", artifact_with_data.parent, "--rows", "64", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert "64 rows scored through gRPC match the eager scores" in result.stdout
    max_diff = float(re.search(r"max \|diff\| ([\d.e+-]+)", result.stdout).group(1))
    assert max_diff <= 1e-5


def test_verify_artifact_fails_when_the_server_disagrees(
    artifact_with_data: Path,
    tiny_table: pa.Table,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The served path is perturbed by 1e-3 after the model (as a broken serving transform
    would); the eager path is left alone, so the gate must see the difference."""
    import serving.model_manager as model_manager

    original = model_manager.forward

    def off_by_a_little(*args: object) -> dict[str, np.ndarray]:
        return {task: p + 1e-3 for task, p in original(*args).items()}  # type: ignore[arg-type]

    monkeypatch.setattr(model_manager, "forward", off_by_a_little)
    monkeypatch.setattr(cli, "_configure_logging", lambda level: None)  # keep pytest's handlers
    sample = tmp_path / "sample.parquet"
    pq.write_table(tiny_table.slice(0, 20), sample)
    code = cli.verify_artifact(["--artifact", str(artifact_with_data), "--input", str(sample)])
    assert code == 1
    (error,) = _error_lines(capsys.readouterr().err)
    assert "served scores differ from the eager training-path scores" in error
    assert re.search(r"max \|diff\| 1\.000e-03 on task 'ctr'", error)
    monkeypatch.setattr(model_manager, "forward", original)
    assert cli.verify_artifact(["--artifact", str(artifact_with_data), "--input", str(sample)]) == 0


def test_verify_artifact_user_errors_exit_2(
    tmp_path: Path,
    artifact_with_data: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(cli, "_configure_logging", lambda level: None)  # keep pytest's handlers
    assert cli.verify_artifact(["--artifact", str(tmp_path / "nope")]) == 2
    (error,) = _error_lines(capsys.readouterr().err)
    assert "is neither an artifact version folder" in error
    missing = tmp_path / "x.parquet"
    assert (
        cli.verify_artifact(["--artifact", str(artifact_with_data), "--input", str(missing)]) == 2
    )
    assert _error_lines(capsys.readouterr().err) == [
        f"error: verify-artifact: --input {missing} does not exist"
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--max-rows-per-request", "10", "--max-queue-rows", "5"], "exceeds max_queue_rows=5"),
        (["--port", "70000"], "port: Input should be less than or equal to 65535"),
        (["--quantize", "int3"], "quantize"),
    ],
)
def test_serve_config_errors_are_one_line(
    repo: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    result = _recsys("serve", "--model-repo", repo, *args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    (error,) = _error_lines(result.stderr)
    assert message in error and "Traceback" not in result.stderr


@pytest.mark.parametrize("flag", ["--port", "--metrics-port"])
def test_serve_on_a_taken_port_is_one_line(repo: Path, tmp_path: Path, flag: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        other = "--metrics-port" if flag == "--port" else "--port"
        result = _recsys("serve", "--model-repo", repo, flag, port, other, "0", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    (error,) = _error_lines(result.stderr)
    assert f"could not bind {'the metrics port ' if flag == '--metrics-port' else ''}" in error
    assert f"127.0.0.1:{port}" in error and "is the port taken?" in error


@pytest.mark.parametrize("case", ["not pem", "another key", "missing key"])
def test_serve_with_a_bad_tls_pair_is_one_line(repo: Path, tmp_path: Path, case: str) -> None:
    cert, key = self_signed_cert(tmp_path, "a")
    if case == "not pem":
        cert.write_text("not a certificate\n")
    elif case == "another key":
        _, key = self_signed_cert(tmp_path, "b")
    else:
        key = tmp_path / "missing.key"
    result = _recsys(
        "serve",
        "--model-repo",
        repo,
        "--port",
        "0",
        "--tls-cert",
        cert,
        "--tls-key",
        key,
        cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    (error,) = _error_lines(result.stderr)
    assert error.startswith(f"error: serve: TLS: --tls-cert {cert} and --tls-key {key} are not")
    assert "could not bind" not in result.stderr  # not mistaken for a taken port


def test_serve_without_a_repository_is_one_line(tmp_path: Path) -> None:
    result = _recsys("serve", "--model-repo", tmp_path / "missing", "--port", "0", cwd=tmp_path)
    assert result.returncode == 2
    (error,) = _error_lines(result.stderr)
    assert "model repository" in error and "is not a folder" in error
