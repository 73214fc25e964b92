"""The grpc.aio scoring server: Scoring service, health, reflection, metrics, graceful stop.

`create_server(cfg, models)` builds the server around a ModelManager: the `recsys.v1.Scoring`
servicer, the standard `grpc.health.v1.Health` service (overall status "" and one per model
name, NOT_SERVING until the manager has loaded and warmed the model, then SERVING), server
reflection, the interceptor (request ids, auth, status mapping, metrics) and the Prometheus
side port. `serve(server)` starts it and, on SIGTERM or SIGINT, turns health NOT_SERVING, keeps
answering for `drain_s` (load balancers move traffic away first), ends health Watch streams,
stops accepting calls, lets in-flight calls finish for `grace_s`, and returns; a second signal
stops at once. `main()` is `python -m serving.server`, the same as `recsys serve`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import ssl
import sys
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from recsys.errors import ConfigError
from serving._pb.recsys.v1 import scoring_pb2 as pb
from serving._pb.recsys.v1 import scoring_pb2_grpc as pb_grpc
from serving.config import ServerConfig
from serving.convert import feature_infos
from serving.errors import RequestError
from serving.interceptors import ServingInterceptor
from serving.model_manager import ModelManager

logger = logging.getLogger(__name__)

# how long `shutdown` waits for calls whose responses are sent but whose tasks still run, and
# the name of the coroutine grpc.aio runs per call (grpcio 1.85)
DRAIN_TASKS_S = 5.0
STOP_NOW_TASKS_S = 1.0  # after a second signal: the calls failed by the batchers
GRPC_CALL_COROUTINE = "_schedule_rpc_coro"
SCORING_SERVICE = pb.DESCRIPTOR.services_by_name["Scoring"].full_name


class ScoringServicer(pb_grpc.ScoringServicer):
    """`recsys.v1.Scoring`: looks the model up, converts, batches, answers. Errors are raised
    as serving exceptions and mapped to statuses by the interceptor."""

    def __init__(self, models: ModelManager) -> None:
        self._models = models

    async def Score(
        self, request: pb.ScoreRequest, context: grpc.aio.ServicerContext
    ) -> pb.ScoreResponse:
        if not request.model:
            raise RequestError("model", None, "is empty (expected a model name)")
        loaded = self._models.get(request.model, request.version)
        scores = await loaded.score(request, context.time_remaining())
        num_rows = len(next(iter(scores.values()))) if scores else 0
        response = pb.ScoreResponse(model=loaded.name, version=loaded.version, num_rows=num_rows)
        for task, probabilities in scores.items():
            response.scores[task].probabilities.extend(probabilities.tolist())
        return response

    async def GetModelInfo(
        self, request: pb.ModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInfo:
        if not request.model:
            raise RequestError("model", None, "is empty (expected a model name)")
        loaded = self._models.get(request.model, request.version)
        dataset = loaded.artifact.schema.dataset
        return pb.ModelInfo(
            model=loaded.name,
            version=loaded.version,
            tasks=list(loaded.tasks),
            features=feature_infos(loaded.artifact.schema),
            metrics_json=json.dumps(loaded.artifact.metrics, sort_keys=True),
            created_at=str(loaded.artifact.manifest.get("created_at", "")),
            loaded_versions=self._models.loaded_versions(loaded.name),
            user_id_feature=dataset.user.id_column if dataset.user else "",
            item_id_feature=dataset.item.id_column if dataset.item else "",
            table_dtype=loaded.table_dtype,
        )


class Health(HealthServicer):
    """grpc's async health servicer with `List`, and Watch streams that end at shutdown.

    grpcio's async servicer has no List (its base class raises NotImplementedError), though
    reflection advertises it. Its Watch streams never end on their own, so `server.stop(grace)`
    would wait out the whole grace period for every open Watch (one per client channel that
    uses client-side health checking); `end_watches` closes them once NOT_SERVING was sent.
    """

    def __init__(self) -> None:
        super().__init__()
        self._watches: set[asyncio.Task[None]] = set()

    async def List(
        self, request: health_pb2.HealthListRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.HealthListResponse:
        response = health_pb2.HealthListResponse()
        for service, status in list(self._server_status.items()):
            response.statuses[service].status = status
        return response

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> None:
        # the library's Watch runs as its own task so that `end_watches` can stop it without
        # cancelling the call: the stream then ends with OK after a last NOT_SERVING
        watch = asyncio.ensure_future(super().Watch(request, context))
        self._watches.add(watch)
        watch.add_done_callback(self._watches.discard)
        try:
            await watch
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if not self._gracefully_shutting_down or (current and current.cancelling()):
                raise  # the client went away, or the server stops at once
            last = health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.NOT_SERVING)
            with contextlib.suppress(Exception):  # the client may be gone; the stream ends
                await context.write(last)

    async def end_watches(self) -> None:
        """Ends every open Watch stream (after `enter_graceful_shutdown`)."""
        watches = list(self._watches)
        for watch in watches:
            watch.cancel()
        await asyncio.gather(*watches, return_exceptions=True)


@dataclass
class _Runtime:
    """What `serve` and `shutdown` need besides the grpc server itself."""

    cfg: ServerConfig
    models: ModelManager
    health: Health
    interceptor: ServingInterceptor


_RUNTIMES: weakref.WeakKeyDictionary[grpc.aio.Server, _Runtime] = weakref.WeakKeyDictionary()


async def create_server(cfg: ServerConfig, models: ModelManager) -> tuple[grpc.aio.Server, int]:
    """Builds and binds the server and starts the model manager's loading; call in the loop
    that will run the server, then `await server.start()` (or `serve(server)`).

    Returns:
        The server (not started) and the bound port (the chosen one when `cfg.port` is 0).

    Raises:
        ConfigError: the model repository is not a folder, or the port could not be bound.
    """
    models.check_repository()
    token = cfg.auth_token.get_secret_value() if cfg.auth_token else None
    # the concurrency limit is the interceptor's, not grpc's `maximum_concurrent_rpcs`: that
    # one counts health checks and open Watch streams too, so a busy server would fail its
    # probes and a few idle watchers would refuse every scoring call
    interceptor = ServingInterceptor(models.metrics, token, cfg.max_concurrent_rpcs)
    server = grpc.aio.server(
        interceptors=[interceptor],
        options=[
            ("grpc.max_receive_message_length", cfg.max_receive_message_bytes),
            ("grpc.so_reuseport", 0),  # a taken port must fail, not be shared silently
        ],
    )
    pb_grpc.add_ScoringServicer_to_server(ScoringServicer(models), server)
    health = Health()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        [
            SCORING_SERVICE,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ],
        server,
    )

    async def follow(statuses: Mapping[str, bool]) -> None:
        for name, serving in statuses.items():
            status = health_pb2.HealthCheckResponse.SERVING
            if not serving:
                status = health_pb2.HealthCheckResponse.NOT_SERVING
            await health.set(name, status)

    await follow(models.statuses)
    models.add_listener(follow)

    address = f"{cfg.host}:{cfg.port}"
    try:
        if cfg.use_tls:
            assert cfg.tls_cert_file is not None and cfg.tls_key_file is not None
            _check_tls_pair(cfg.tls_cert_file, cfg.tls_key_file)
            credentials = grpc.ssl_server_credentials(
                [(cfg.tls_key_file.read_bytes(), cfg.tls_cert_file.read_bytes())]
            )
            port = server.add_secure_port(address, credentials)
        else:
            port = server.add_insecure_port(address)
    except RuntimeError as e:
        raise ConfigError(f"serve: could not bind {address} ({e}); is the port taken?") from e
    if port == 0:
        raise ConfigError(f"serve: could not bind {address} (got port 0); is the port taken?")
    if token and not cfg.use_tls and cfg.host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning(
            "serve: a bearer token is required but %s serves plaintext; the token travels in "
            "the clear (configure tls_cert_file/tls_key_file)",
            address,
        )
    if cfg.metrics_port is not None:
        try:
            models.metrics.start_http(cfg.host, cfg.metrics_port)
        except OSError as e:
            raise ConfigError(
                f"serve: could not bind the metrics port {cfg.host}:{cfg.metrics_port} "
                f"({e.strerror}); is the port taken? pass another --metrics-port (0 picks a "
                "free one)"
            ) from e
    _RUNTIMES[server] = _Runtime(cfg, models, health, interceptor)
    await models.start()
    logger.info("serve: bound %s:%d (model repository %s)", cfg.host, port, cfg.model_repo)
    return server, port


def _check_tls_pair(cert: Path, key: Path) -> None:
    """Raises ConfigError unless `cert` and `key` are a readable PEM chain and its unencrypted
    private key. grpc reports a bad pair only as a failure to bind the port."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        # an encrypted key gets an empty password (grpc cannot use one) instead of a prompt
        context.load_cert_chain(cert, key, password=lambda: b"")
    except OSError as e:  # ssl.SSLError is an OSError
        reason = e.strerror or getattr(e, "reason", None) or str(e)
        raise ConfigError(
            f"serve: TLS: --tls-cert {cert} and --tls-key {key} are not a PEM certificate "
            f"chain and its unencrypted private key ({reason})"
        ) from e


async def shutdown(
    server: grpc.aio.Server, grace_s: float | None = None, drain_s: float | None = None
) -> None:
    """Health NOT_SERVING, keep answering for `drain_s`, end health Watch streams, stop
    accepting calls, let in-flight calls finish, release models.

    Args:
        server: a server made by `create_server`.
        grace_s: how long in-flight calls may still run (default: the config's `grace_s`).
        drain_s: how long new calls are still answered once health says NOT_SERVING, so that
            calls already on their way (and clients not yet told) are not refused (default:
            the config's `drain_s`).
    """
    runtime = _RUNTIMES[server]
    grace = runtime.cfg.grace_s if grace_s is None else grace_s
    drain = runtime.cfg.drain_s if drain_s is None else drain_s
    await runtime.health.enter_graceful_shutdown()
    if drain > 0:
        logger.info("serve: health NOT_SERVING; still answering calls for %.1fs", drain)
        await asyncio.sleep(drain)
    await runtime.health.end_watches()
    logger.info("serve: shutting down (in-flight calls get %.1fs)", grace)
    await server.stop(grace)
    unfinished = await _finish_call_tasks(runtime.interceptor, DRAIN_TASKS_S)
    if unfinished:
        logger.warning("serve: %d call(s) still finishing after the grace period", unfinished)
    await runtime.models.close()
    runtime.models.metrics.stop_http()
    logger.info("serve: stopped")


async def _stop_now(server: grpc.aio.Server) -> None:
    """The second signal's stop: queued calls fail at once with UNAVAILABLE (running batches
    finish), then the server stops with no grace. The calls are ended by the batchers rather
    than by `server.stop(0)`: grpc's cancelling a call still in its handler logs a
    CancelledError traceback per call."""
    runtime = _RUNTIMES[server]
    await runtime.health.enter_graceful_shutdown()
    await runtime.health.end_watches()
    await runtime.models.close()
    await _finish_call_tasks(runtime.interceptor, STOP_NOW_TASKS_S)
    await server.stop(0)
    runtime.models.metrics.stop_http()
    logger.info("serve: stopped")


async def _finish_call_tasks(interceptor: ServingInterceptor, timeout_s: float) -> int:
    """Waits for the Python tasks of calls the grpc core already considers done.

    grpc.aio's `stop(grace)` returns once the core has no call in flight, which is as soon as
    the last response is sent; the tasks grpc runs per call may still be finishing and would be
    cancelled, with a logged traceback, when the event loop closes (grpc/grpc#37239). These
    are the tasks the interceptor saw and grpc's per-call tasks (found by their coroutine's
    name, which is grpc-internal, hence both).

    Returns:
        How many were still unfinished after `timeout_s`.
    """
    current = asyncio.current_task()
    pending = interceptor.unfinished_calls() | {
        task
        for task in asyncio.all_tasks()
        if task is not current
        and not task.done()
        and getattr(task.get_coro(), "__name__", "") == GRPC_CALL_COROUTINE
    }
    if pending:
        _, pending = await asyncio.wait(pending, timeout=timeout_s)
    return len(pending)


async def serve(server: grpc.aio.Server, on_started: Callable[[], None] | None = None) -> int:
    """Starts the server and runs it until SIGTERM or SIGINT, then shuts down gracefully; a
    second signal during the shutdown stops at once (queued calls fail with UNAVAILABLE).

    Args:
        server: a server made by `create_server`.
        on_started: called once the server accepts calls (the CLI prints the address there).

    Returns:
        The exit code: 0 after a graceful stop, 128 + the signal number after a second signal.
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    if on_started is not None:
        on_started()  # after the handlers: a SIGTERM sent on the announcement drains, not kills
    await stop.wait()
    logger.info("serve: signal received")
    stopping = asyncio.ensure_future(shutdown(server))
    second: list[signal.Signals] = []

    def stop_now(sig: signal.Signals) -> None:
        if not second:
            second.append(sig)
            logger.warning("serve: second signal (%s): stopping now", sig.name)
            stopping.cancel()

    for sig in signals:
        loop.add_signal_handler(sig, stop_now, sig)
    try:
        await stopping
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if not second or (current and current.cancelling()):
            raise
        await _stop_now(server)
        return 128 + int(second[0])
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
    return 0


def main() -> int:
    """`python -m serving.server ARGS`: the same as `recsys serve ARGS`."""
    from serving.cli import serve as serve_command

    return serve_command(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
