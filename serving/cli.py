"""Serving-side subcommands of `recsys`: serve, score, verify-artifact.

Each function takes the arguments after the subcommand name and returns an exit code. Library
errors (ConfigError, SchemaError, DataError, ArtifactError) become one `error: ...` line on
stderr and exit code 2, never a traceback; `verify-artifact` exits 1 when the served scores
disagree with the eager ones. Logging is configured here and nowhere else in serving/.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from recsys.errors import ArtifactError, ConfigError, DataError, SchemaError
from recsys.logs import quiet_libraries
from serving.interceptors import RequestIdFilter

USER_ERRORS = (ConfigError, SchemaError, DataError, ArtifactError)
PARITY_ATOL = 1e-5
_USER_STATUSES = ("INVALID_ARGUMENT", "NOT_FOUND", "UNAUTHENTICATED")


def _configure_logging(level: int) -> None:
    """One stderr handler carrying the request id; the project's loggers at `level`, libraries
    from WARNING (fbgemm_gpu logs its library loads at INFO on the root logger when TorchRec is
    imported, which `serve` does after this runs)."""
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s")
    )
    logging.basicConfig(handlers=[handler], force=True)
    quiet_libraries(level)


def _run(fn: Callable[[], int], level: int = logging.INFO) -> int:
    _configure_logging(level)
    try:
        return fn()
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _read_token(path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        return path.read_text().strip()
    except OSError as e:
        raise ConfigError(f"auth: cannot read the token file {path} ({e.strerror})") from e


# --- serve -------------------------------------------------------------------------------------
def serve(argv: list[str]) -> int:
    """`recsys serve --model-repo DIR [--port P] [--host H] [--metrics-port P] ...`"""
    parser = argparse.ArgumentParser(
        prog="recsys serve", description="Serve the models of a repository over gRPC."
    )
    parser.add_argument("--model-repo", type=Path, required=True, help="MODEL_REPO folder")
    parser.add_argument("--host", default=None, help="interface to bind (default 127.0.0.1)")
    parser.add_argument(
        "--port", type=int, default=None, help="gRPC port (default 50051; 0 = any free port)"
    )
    parser.add_argument(
        "--metrics-port", type=int, default=None, help="Prometheus port (default: off)"
    )
    parser.add_argument(
        "--max-batch-rows", type=int, default=None, help="rows per forward pass (256)"
    )
    parser.add_argument("--max-wait-ms", type=float, default=None, help="wait for more rows (2 ms)")
    parser.add_argument(
        "--max-queue-rows", type=int, default=None, help="queued rows per version (8192)"
    )
    parser.add_argument(
        "--max-rows-per-request", type=int, default=None, help="rows per request (4096)"
    )
    parser.add_argument(
        "--max-receive-message-bytes", type=int, default=None, help="request size (4 MiB)"
    )
    parser.add_argument(
        "--max-concurrent-rpcs", type=int, default=None, help="RPCs in flight (unbounded)"
    )
    parser.add_argument(
        "--poll-interval-s", type=float, default=None, help="repository scans (5 s)"
    )
    parser.add_argument(
        "--drain-s",
        type=float,
        default=None,
        help="on SIGTERM, calls still answered this long after health says NOT_SERVING (1 s)",
    )
    parser.add_argument(
        "--grace-s", type=float, default=None, help="then, time in-flight calls get (10 s)"
    )
    parser.add_argument("--num-scoring-threads", type=int, default=None, help="forward threads (1)")
    parser.add_argument(
        "--max-versions-per-model", type=int, default=None, help="versions kept (2)"
    )
    parser.add_argument("--warmup-rows", type=int, default=None, help="warm-up rows (8)")
    parser.add_argument("--tls-cert", type=Path, default=None, help="PEM certificate chain")
    parser.add_argument("--tls-key", type=Path, default=None, help="PEM private key")
    parser.add_argument(
        "--auth-token-file",
        type=Path,
        default=None,
        help="file holding the bearer token clients must send (not on the command line)",
    )
    parser.add_argument(
        "--quantize",
        default=None,
        help="embedding tables as served: none (fp32, default), int8 or int4 (row-wise quantized)",
    )
    args = parser.parse_args(argv)

    def go() -> int:
        cfg = _server_config(
            model_repo=args.model_repo,
            host=args.host,
            port=args.port,
            metrics_port=args.metrics_port,
            max_batch_rows=args.max_batch_rows,
            max_wait_ms=args.max_wait_ms,
            max_queue_rows=args.max_queue_rows,
            max_rows_per_request=args.max_rows_per_request,
            max_receive_message_bytes=args.max_receive_message_bytes,
            max_concurrent_rpcs=args.max_concurrent_rpcs,
            poll_interval_s=args.poll_interval_s,
            grace_s=args.grace_s,
            drain_s=args.drain_s,
            num_scoring_threads=args.num_scoring_threads,
            max_versions_per_model=args.max_versions_per_model,
            warmup_rows=args.warmup_rows,
            tls_cert_file=args.tls_cert,
            tls_key_file=args.tls_key,
            auth_token=_read_token(args.auth_token_file),
            quantize=args.quantize,
        )
        if not cfg.model_repo.is_dir():  # fail before the slow imports (torch)
            raise ConfigError(
                f"serve: model repository {cfg.model_repo} is not a folder (expected "
                "MODEL_REPO/<name>/<version>/); create it or fix --model-repo"
            )
        return asyncio.run(_serve(cfg))

    return _run(go)


def _server_config(**values: Any) -> Any:
    from serving.config import ServerConfig

    try:
        return ServerConfig.model_validate({k: v for k, v in values.items() if v is not None})
    except ValidationError as e:
        from recsys.data.schema import format_validation_error

        raise ConfigError(f"serve: {format_validation_error(e, ServerConfig)}") from e


async def _serve(cfg: Any) -> int:
    from serving.model_manager import ModelManager
    from serving.server import create_server, serve

    models = ModelManager.from_config(cfg)
    server, port = await create_server(cfg, models)

    def announce() -> None:
        line = f"serving on {cfg.host}:{port}"
        if models.metrics.http_port is not None:
            line += f" metrics on {cfg.host}:{models.metrics.http_port}"
        print(line, flush=True)

    return await serve(server, on_started=announce)


# --- score -------------------------------------------------------------------------------------
def _at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer (got {text!r})") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low} (got {value})")
        return value

    return parse


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds (got {text!r})") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected seconds > 0 (got {text})")
    return value


def score(argv: list[str]) -> int:
    """`recsys score --server ADDR --model NAME --input rows.jsonl [--ranking]`"""
    parser = argparse.ArgumentParser(
        prog="recsys score",
        description=(
            "Score JSON lines through a server. Generic rows: one {feature: value} object per "
            'line, one output line per row. --ranking: one {"context": {...}, "item_ids": '
            "[...]} object per line, one output line per ranking request."
        ),
    )
    parser.add_argument("--server", required=True, help="host:port of the server")
    parser.add_argument("--model", required=True, help="model name in the repository")
    parser.add_argument("--input", type=Path, required=True, help="JSON-lines file, - = stdin")
    parser.add_argument("--ranking", action="store_true", help="lines are ranking requests")
    parser.add_argument(
        "--version", type=_at_least(0), default=0, help="pin a version (0 = newest)"
    )
    parser.add_argument(
        "--batch-rows", type=_at_least(1), default=256, help="rows per request (256)"
    )
    parser.add_argument(
        "--timeout-s", type=_positive_seconds, default=30.0, help="deadline per call (30 s)"
    )
    parser.add_argument(
        "--connect-timeout-s",
        type=_positive_seconds,
        default=10.0,
        help="how long to wait for the server to accept the connection (10 s)",
    )
    parser.add_argument(
        "--auth-token-file",
        type=Path,
        default=None,
        help="file holding the bearer token the server expects (not on the command line)",
    )
    parser.add_argument("--tls-root", type=Path, default=None, help="PEM roots; enables TLS")
    args = parser.parse_args(argv)

    def go() -> int:
        import grpc

        from serving.client import ScoringClient

        roots = args.tls_root.read_bytes() if args.tls_root else None
        token = _read_token(args.auth_token_file)
        lines = list(_json_lines(args.input))
        with ScoringClient(args.server, token, roots, timeout_s=args.timeout_s) as client:
            # The calls wait for a connection until their deadline; without this a wrong
            # --server (or a server not up yet) read as a bare DEADLINE_EXCEEDED after 30 s.
            try:
                grpc.channel_ready_future(client.channel).result(timeout=args.connect_timeout_s)
            except grpc.FutureTimeoutError:
                tls = " with TLS" if roots else " without TLS"
                print(
                    f"error: score: no server accepted a connection{tls} at {args.server} within "
                    f"{args.connect_timeout_s:g} s (is `recsys serve` running there? check "
                    "--server, and --tls-root for a TLS server)",
                    file=sys.stderr,
                )
                return 1
            try:
                if args.ranking:
                    for where, line in lines:
                        _print_ranking(client, args.model, args.version, where, line)
                else:
                    _print_rows(client, args.model, args.version, args.batch_rows, lines)
            except grpc.RpcError as e:
                code = e.code().name
                print(f"error: score: server answered {code}: {e.details()}", file=sys.stderr)
                return 2 if code in _USER_STATUSES else 1
        return 0

    return _run(go, logging.WARNING)


def _json_lines(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    try:
        text = sys.stdin.read() if str(path) == "-" else path.read_text()
    except OSError as e:
        raise DataError(f"score: cannot read {path} ({e.strerror})") from e
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        where = f"{path}:{number}"
        try:
            value = json.loads(raw)
        except json.JSONDecodeError as e:
            raise DataError(f"score: {where} is not valid JSON ({e.msg})") from e
        if not isinstance(value, dict):
            raise DataError(
                f"score: {where} holds a {type(value).__name__} (expected a JSON object)"
            )
        yield where, value


def _print_rows(
    client: Any, model: str, version: int, batch_rows: int, lines: list[tuple[str, dict[str, Any]]]
) -> None:
    for start in range(0, len(lines), batch_rows):
        chunk = [row for _, row in lines[start : start + batch_rows]]
        names = list(dict.fromkeys(name for row in chunk for name in row))
        columns = {name: [row.get(name) for row in chunk] for name in names}
        try:
            result = client.score_rows(model, columns, version)
        except ValueError as e:
            raise DataError(f"score: rows {start + 1}..{start + len(chunk)}: {e}") from e
        for i in range(len(chunk)):
            scores = {task: float(p[i]) for task, p in result.scores.items()}
            print(json.dumps({"model": result.model, "version": result.version, "scores": scores}))


def _print_ranking(client: Any, model: str, version: int, where: str, line: dict[str, Any]) -> None:
    unknown = sorted(set(line) - {"context", "item_ids", "candidate_features"})
    if unknown or "item_ids" not in line:
        raise DataError(
            f"score: {where} has keys {sorted(line)} (expected 'context', 'item_ids' and "
            "optionally 'candidate_features')"
        )
    if not isinstance(line["item_ids"], list) or not line["item_ids"]:
        raise DataError(
            f"score: {where}: item_ids is {json.dumps(line['item_ids'])} (expected a non-empty "
            "list of candidate item ids)"
        )
    try:
        result = client.rank(
            model,
            line.get("context", {}),
            line["item_ids"],
            version,
            candidate_features=line.get("candidate_features"),
        )
    except ValueError as e:
        raise DataError(f"score: {where}: {e}") from e
    scores = {task: [float(x) for x in p] for task, p in result.scores.items()}
    print(
        json.dumps(
            {
                "model": result.model,
                "version": result.version,
                "item_ids": line["item_ids"],
                "scores": scores,
            }
        )
    )


# --- verify-artifact ---------------------------------------------------------------------------
def verify_artifact(argv: list[str]) -> int:
    """`recsys verify-artifact --artifact DIR [--input PARQUET] [--rows 512]`"""
    parser = argparse.ArgumentParser(
        prog="recsys verify-artifact",
        description=(
            "Serving-parity gate: serve the artifact in-process, score a fixed sample of rows "
            "through gRPC, and compare with the eager scores of the training path."
        ),
    )
    parser.add_argument(
        "--artifact", type=Path, required=True, help="MODEL_REPO/<name>[/<version>]"
    )
    parser.add_argument(
        "--input",
        type=Path,
        default=None,
        help="Parquet rows to score (default: the valid split the model was trained with)",
    )
    parser.add_argument("--rows", type=int, default=512, help="rows of the sample (512)")
    args = parser.parse_args(argv)

    def go() -> int:
        import numpy as np

        from recsys.artifact import load_artifact, resolve_version_dir

        if args.rows < 1:
            raise ConfigError(f"verify-artifact: --rows {args.rows} (expected >= 1)")
        version_dir = resolve_version_dir(args.artifact).resolve()
        artifact = load_artifact(version_dir)
        sample = _sample_rows(args.input, artifact.metrics, args.rows)
        expected = _eager_scores(artifact, sample)
        served = asyncio.run(_served_scores(version_dir, artifact, sample))
        worst = (0.0, "", 0)
        for task, probs in expected.items():
            if task not in served or served[task].shape != probs.shape:
                print(
                    f"error: verify-artifact: the server returned tasks "
                    f"{ {t: v.shape for t, v in served.items()} } (expected "
                    f"{ {t: v.shape for t, v in expected.items()} })",
                    file=sys.stderr,
                )
                return 1
            diff = np.abs(served[task].astype(np.float64) - probs.astype(np.float64))
            if diff.size and float(diff.max()) >= worst[0]:
                worst = (float(diff.max()), task, int(diff.argmax()))
        max_diff, task, row = worst
        if not max_diff <= PARITY_ATOL:  # also catches NaN
            print(
                f"error: verify-artifact: {version_dir}: served scores differ from the eager "
                f"training-path scores (max |diff| {max_diff:.3e} on task '{task}' row {row}, "
                f"expected <= {PARITY_ATOL:.0e})",
                file=sys.stderr,
            )
            return 1
        print(
            f"verify-artifact: {version_dir} ok: {sample.num_rows} rows scored through gRPC "
            f"match the eager scores (max |diff| {max_diff:.3e} <= {PARITY_ATOL:.0e})"
        )
        return 0

    return _run(go, logging.WARNING)


def _sample_rows(path: Path | None, metrics: dict[str, Any], num_rows: int) -> Any:
    """The first `num_rows` rows of `path`, or of the valid split the model was trained on."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if path is None:
        data_path = metrics.get("data", {}).get("path")
        if not data_path:
            raise DataError(
                "verify-artifact: the artifact's metrics.json names no data path (expected "
                "data.path); pass --input PARQUET"
            )
        root = Path(data_path)
        files = [root / "valid.parquet"] if (root / "valid.parquet").exists() else []
        files = files or sorted((root / "valid").glob("*.parquet"))
        if not files:
            raise DataError(
                f"verify-artifact: no valid split under {root} (expected valid.parquet or "
                "valid/*.parquet); pass --input PARQUET"
            )
    else:
        if not path.exists():
            raise DataError(f"verify-artifact: --input {path} does not exist")
        files = [path]
    tables: list[pa.Table] = []
    remaining = num_rows
    for file in files:
        for batch in pq.ParquetFile(file).iter_batches(batch_size=min(remaining, 65_536)):
            tables.append(pa.Table.from_batches([batch]).slice(0, remaining))
            remaining -= tables[-1].num_rows
            if remaining <= 0:
                break
        if remaining <= 0:
            break
    if not tables or sum(t.num_rows for t in tables) == 0:
        raise DataError(f"verify-artifact: {files[0]} has no rows")
    return pa.concat_tables(tables)


def _eager_scores(artifact: Any, table: Any) -> dict[str, Any]:
    """The training path: raw rows -> FeatureSchema.encode -> Batch -> model, in one batch."""
    import torch

    from recsys.features.batch import batch_from_encoded, features_from_encoded

    schema = artifact.schema
    labelled = all(label.name in table.column_names for label in schema.dataset.labels)
    encoded = schema.encode(table, require_labels=labelled, where="verify-artifact sample")
    features = (
        batch_from_encoded(schema, encoded).features
        if labelled
        else features_from_encoded(schema, encoded)
    )
    with torch.inference_mode():
        probs = artifact.model.probabilities(artifact.model(features))
    return {task: p.numpy() for task, p in probs.items()}


async def _served_scores(version_dir: Path, artifact: Any, table: Any) -> dict[str, Any]:
    """Serves only this artifact from a temporary repository and scores `table` via gRPC."""
    import grpc
    import numpy as np

    from serving.client import AsyncScoringClient
    from serving.config import ServerConfig
    from serving.model_manager import ModelManager
    from serving.server import create_server, shutdown

    name = version_dir.parent.name
    version = int(version_dir.name) if version_dir.name.isdigit() else 1
    inputs = table.select(artifact.schema.dataset.input_columns())
    with tempfile.TemporaryDirectory(prefix="verify-artifact-") as tmp:
        (Path(tmp) / name).mkdir()
        (Path(tmp) / name / str(version)).symlink_to(version_dir, target_is_directory=True)
        cfg = ServerConfig(
            model_repo=Path(tmp), port=0, poll_interval_s=3600.0, max_rows_per_request=512
        )
        models = ModelManager.from_config(cfg)
        server, port = await create_server(cfg, models)
        await server.start()
        try:
            if not await models.wait_ready(timeout_s=300.0):
                raise ArtifactError(
                    f"verify-artifact: the server did not load {version_dir} (see the log)"
                )
            chunks: dict[str, list[np.ndarray]] = {}
            async with AsyncScoringClient(f"{cfg.host}:{port}", timeout_s=120.0) as client:
                for start in range(0, inputs.num_rows, cfg.max_rows_per_request):
                    chunk = inputs.slice(start, cfg.max_rows_per_request)
                    try:
                        result = await client.score_rows(name, chunk, version=version)
                    except grpc.aio.AioRpcError as e:
                        raise ArtifactError(
                            f"verify-artifact: the server refused the sample rows "
                            f"{start}..{start + chunk.num_rows - 1} ({e.code().name}: "
                            f"{e.details()})"
                        ) from e
                    for task, probs in result.scores.items():
                        chunks.setdefault(task, []).append(probs)
        finally:
            await shutdown(server, grace_s=1.0, drain_s=0.0)
    return {task: np.concatenate(parts) for task, parts in chunks.items()}
