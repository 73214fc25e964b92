"""The server interceptor: request ids, auth, status mapping, metrics and request logs.

Every RPC passes through `ServingInterceptor` (STYLE.md §9, §10):
- a request id from the `x-request-id` metadata (or a fresh one) is put in a contextvar for the
  RPC's task and echoed in the trailing metadata;
- with a bearer token configured, calls other than health checks need
  `authorization: Bearer <token>` (UNAUTHENTICATED otherwise);
- the serving exceptions become statuses in this one place: RequestError -> INVALID_ARGUMENT
  (feature and row in the details and in `recsys-feature-bin`/`recsys-row` trailing metadata),
  NotFound -> NOT_FOUND, NotReady -> UNAVAILABLE, Overloaded -> RESOURCE_EXHAUSTED,
  DeadlineExceeded -> DEADLINE_EXCEEDED, anything else -> INTERNAL with the request id (the
  traceback goes to the log only);
- a unary call's request is parsed here, not by grpc, so a malformed message is
  INVALID_ARGUMENT (and counted) instead of UNKNOWN with a traceback;
- details and the feature trailer are capped in size (a client may send names of any length,
  and a status over the metadata limit would reach it as RESOURCE_EXHAUSTED);
- with a limit configured, Scoring calls beyond it are RESOURCE_EXHAUSTED (health checks and
  reflection are never refused for it);
- a call grpc cancels because its deadline passed is counted and logged as DEADLINE_EXCEEDED
  (what the client sees), not CANCELLED;
- unary calls are counted by method and status and timed; one DEBUG log line per call and one
  WARNING line per failure, each with the request id.
"""

from __future__ import annotations

import asyncio
import contextvars
import hmac
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import grpc.aio
from google.protobuf.message import DecodeError

from serving.errors import (
    DeadlineExceeded,
    NotFound,
    NotReady,
    Overloaded,
    RequestError,
    ServingError,
)
from serving.metrics import ServerMetrics

logger = logging.getLogger(__name__)

REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
REQUEST_ID_KEY = "x-request-id"
FEATURE_KEY = "recsys-feature-bin"  # binary metadata: feature names need not be ASCII
ROW_KEY = "recsys-row"
AUTH_EXEMPT_PREFIXES = ("/grpc.health.v1.Health/",)
LIMITED_PREFIXES = ("/recsys.v1.Scoring/",)  # the calls `max_concurrent_calls` counts
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
MAX_DETAILS_BYTES = 1024  # status details sent back (the log keeps the same capped text)
MAX_FEATURE_BYTES = 256  # the `recsys-feature-bin` trailer

_STATUS: tuple[tuple[type[ServingError], grpc.StatusCode], ...] = (
    (RequestError, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (NotReady, grpc.StatusCode.UNAVAILABLE),
    (Overloaded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
)


class RequestIdFilter(logging.Filter):
    """Adds `request_id` (the current RPC's, or '-') to log records, for log formats."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        return True


def status_for(error: BaseException) -> grpc.StatusCode:
    """The gRPC status of an exception raised while serving (INTERNAL if it is not ours)."""
    for error_type, code in _STATUS:
        if isinstance(error, error_type):
            return code
    return grpc.StatusCode.INTERNAL


def _request_id(metadata: Any) -> str:
    for key, value in metadata or ():
        if key == REQUEST_ID_KEY and isinstance(value, str) and _REQUEST_ID_RE.match(value):
            return value
    return uuid.uuid4().hex[:16]


class ServingInterceptor(grpc.aio.ServerInterceptor):
    """Request ids, optional bearer-token auth, status mapping, metrics and logs.

    Args:
        metrics: where RPC counts and latencies go, if anywhere.
        auth_token: when set, the bearer token every non-health call must carry.
        max_concurrent_calls: when set, Scoring calls beyond this many in flight are refused
            with RESOURCE_EXHAUSTED.
    """

    def __init__(
        self,
        metrics: ServerMetrics | None = None,
        auth_token: str | None = None,
        max_concurrent_calls: int | None = None,
    ):
        self._metrics = metrics
        self._expected_auth = f"Bearer {auth_token}".encode() if auth_token else None
        self._max_calls = max_concurrent_calls
        self._limited_in_flight = 0
        # the tasks of unary calls not yet finished (`shutdown` waits for them)
        self._rpc_tasks: set[asyncio.Task[Any]] = set()

    def unfinished_calls(self) -> set[asyncio.Task[Any]]:
        """The tasks of unary calls that have not finished yet (`shutdown` waits for them)."""
        return {task for task in self._rpc_tasks if not task.done()}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        if not self._authorized(method, handler_call_details.invocation_metadata):
            return _denying_handler(handler, method, self._metrics)
        if handler.unary_unary is None:
            return handler  # streaming calls (health Watch, reflection) pass through
        # grpc gets no deserializer and hands over the raw bytes: parsed by grpc, a malformed
        # message would end as UNKNOWN with a logged traceback, before the wrapper sees it
        return grpc.unary_unary_rpc_method_handler(
            self._wrap(method, handler.unary_unary, handler.request_deserializer),
            request_deserializer=None,
            response_serializer=handler.response_serializer,
        )

    def _authorized(self, method: str, metadata: Any) -> bool:
        if self._expected_auth is None or method.startswith(AUTH_EXEMPT_PREFIXES):
            return True
        for key, value in metadata or ():
            if key == "authorization":
                got = value.encode() if isinstance(value, str) else bytes(value)
                return hmac.compare_digest(got, self._expected_auth)
        return False

    def _wrap(
        self,
        method: str,
        behavior: Callable[..., Any],
        deserializer: Callable[[bytes], Any] | None,
    ) -> Callable[[bytes, grpc.aio.ServicerContext], Awaitable[Any]]:
        metrics = self._metrics
        rpc_tasks = self._rpc_tasks
        limited = self._max_calls is not None and method.startswith(LIMITED_PREFIXES)

        async def wrapped(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
            task = asyncio.current_task()
            if task is not None and task not in rpc_tasks:
                rpc_tasks.add(task)
                task.add_done_callback(rpc_tasks.discard)
            request_id = _request_id(context.invocation_metadata())
            token = REQUEST_ID.set(request_id)
            start = time.perf_counter()
            code = grpc.StatusCode.OK
            counted = False
            try:
                if limited:
                    self._admit()
                    counted = True
                request = _parse(deserializer, raw)
                response = behavior(request, context)
                if asyncio.iscoroutine(response):
                    response = await response
                code = _context_code(context) or grpc.StatusCode.OK
                context.set_trailing_metadata(((REQUEST_ID_KEY, request_id),))
                logger.debug(
                    "rpc %s ok request_id=%s ms=%.2f",
                    method,
                    request_id,
                    (time.perf_counter() - start) * 1e3,
                )
                return response
            except asyncio.CancelledError:
                remaining = context.time_remaining()
                if remaining is not None and remaining <= 0:
                    # grpc's own deadline timer cancelled the call (the client sees
                    # DEADLINE_EXCEEDED): an overload signal, not a client going away
                    code = grpc.StatusCode.DEADLINE_EXCEEDED
                    logger.warning(
                        "rpc %s failed request_id=%s status=DEADLINE_EXCEEDED ms=%.1f: the "
                        "deadline passed before the call was answered",
                        method,
                        request_id,
                        (time.perf_counter() - start) * 1e3,
                    )
                else:
                    code = grpc.StatusCode.CANCELLED
                    logger.debug("rpc %s cancelled request_id=%s", method, request_id)
                raise
            except grpc.aio.AbortError:
                # the servicer ended the call itself (e.g. health Check of an unknown service)
                code = _context_code(context) or grpc.StatusCode.UNKNOWN
                raise
            except Exception as e:
                code = status_for(e)
                if code == grpc.StatusCode.INTERNAL and isinstance(e, NotImplementedError):
                    code = grpc.StatusCode.UNIMPLEMENTED
                elapsed_ms = (time.perf_counter() - start) * 1e3
                trailing: list[tuple[str, str | bytes]] = [(REQUEST_ID_KEY, request_id)]
                if code == grpc.StatusCode.INTERNAL:
                    details = f"internal error (request_id={request_id}); see the server log"
                    logger.error(
                        "rpc %s failed request_id=%s status=%s ms=%.1f: %r",
                        method,
                        request_id,
                        code.name,
                        elapsed_ms,
                        e,
                        exc_info=e,
                    )
                elif code == grpc.StatusCode.UNIMPLEMENTED:
                    details = f"{method} is not implemented by this server"
                    logger.warning("rpc %s failed request_id=%s: %s", method, request_id, details)
                else:
                    details = _truncate_utf8(str(e), MAX_DETAILS_BYTES)
                    if isinstance(e, RequestError):
                        if e.field is not None:
                            field = _truncate_utf8(e.field, MAX_FEATURE_BYTES)
                            trailing.append((FEATURE_KEY, field.encode()))
                        if e.row is not None:
                            trailing.append((ROW_KEY, str(e.row)))
                    logger.warning(
                        "rpc %s failed request_id=%s status=%s ms=%.1f: %s",
                        method,
                        request_id,
                        code.name,
                        elapsed_ms,
                        details,
                    )
                await context.abort(code, details, trailing_metadata=tuple(trailing))
            finally:
                if counted:
                    self._limited_in_flight -= 1
                if metrics is not None:
                    metrics.requests.labels(method, code.name).inc()
                    metrics.latency.labels(method).observe(time.perf_counter() - start)
                REQUEST_ID.reset(token)

        return wrapped

    def _admit(self) -> None:
        """Counts a Scoring call in, or raises Overloaded at the limit (all on the event loop
        thread, so a plain counter is enough)."""
        assert self._max_calls is not None
        if self._limited_in_flight >= self._max_calls:
            raise Overloaded(
                f"server busy: {self._limited_in_flight} scoring calls in flight (the "
                f"server's --max-concurrent-rpcs is {self._max_calls}); retry with backoff"
            )
        self._limited_in_flight += 1


def _parse(deserializer: Callable[[bytes], Any] | None, raw: bytes) -> Any:
    """The request message of a call's bytes.

    Raises:
        RequestError: the bytes are not a valid message (corrupt wire format, invalid UTF-8 in
            a string field).
    """
    if deserializer is None:
        return raw
    try:
        return deserializer(raw)
    except DecodeError as e:
        raise RequestError(
            None,
            None,
            f"the message cannot be parsed (got {len(raw)} bytes: {e}); send the method's "
            "request message (proto/), with valid UTF-8 strings",
        ) from e


def _truncate_utf8(text: str, max_bytes: int) -> str:
    """`text` cut to at most `max_bytes` of UTF-8 (plus "…" when cut): status details and
    trailers over the peer's metadata limit (16 KiB by default, and grpc percent-encodes
    non-ASCII details, up to 3x) fail the whole call with RESOURCE_EXHAUSTED."""
    encoded = text.encode()
    if len(encoded) <= max_bytes:
        return text
    return encoded[:max_bytes].decode(errors="ignore") + "…"


def _context_code(context: grpc.aio.ServicerContext) -> grpc.StatusCode | None:
    code = context.code()
    if code is None or isinstance(code, grpc.StatusCode):
        return code
    # some grpc versions report the raw integer code
    return next((c for c in grpc.StatusCode if c.value[0] == code), grpc.StatusCode.UNKNOWN)


def _denying_handler(
    handler: grpc.RpcMethodHandler, method: str, metrics: ServerMetrics | None
) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that answers UNAUTHENTICATED."""

    async def deny(request: Any, context: grpc.aio.ServicerContext) -> Any:
        request_id = _request_id(context.invocation_metadata())
        logger.warning(
            "rpc %s failed request_id=%s status=UNAUTHENTICATED: missing or wrong bearer token",
            method,
            request_id,
        )
        if metrics is not None:
            metrics.requests.labels(method, grpc.StatusCode.UNAUTHENTICATED.name).inc()
        await context.abort(
            grpc.StatusCode.UNAUTHENTICATED,
            "auth: missing or wrong bearer token (expected metadata "
            "'authorization: Bearer <token>')",
            trailing_metadata=((REQUEST_ID_KEY, request_id),),
        )

    # `deny` never reads the request: left unparsed, a malformed one is UNAUTHENTICATED too
    kwargs = {"request_deserializer": None, "response_serializer": handler.response_serializer}
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(deny, **kwargs)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(deny, **kwargs)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(deny, **kwargs)
    return grpc.stream_stream_rpc_method_handler(deny, **kwargs)
