"""Python clients of the scoring server: `ScoringClient` (blocking) and `AsyncScoringClient`.

Both build columnar requests from Python lists, NumPy arrays or Arrow tables (the value kinds
follow the values' types, see `serving.columns.column_from_values`) and return the scores as
NumPy arrays per task, with the model version that produced them. They import neither torch nor
the server, so a client process stays light.

Example:
    with ScoringClient("127.0.0.1:50051") as client:
        result = client.rank("autoint_ml100k", {"user_id": "196"}, ["242", "302"])
        result.scores["ctr"]  # array of 2 probabilities
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

import grpc
import grpc.aio
import numpy as np
import pyarrow as pa
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serving._pb.recsys.v1 import scoring_pb2 as pb
from serving._pb.recsys.v1 import scoring_pb2_grpc as pb_grpc
from serving.columns import column_from_values

Rows: TypeAlias = Mapping[str, Sequence[Any] | np.ndarray | pa.Array | pa.ChunkedArray] | pa.Table


@dataclass(frozen=True)
class ScoreResult:
    """Scores of one request.

    Attributes:
        scores: task -> probabilities (float32), one per row or candidate, in request order.
        model: the model name.
        version: the model version that scored the request.
    """

    scores: dict[str, np.ndarray]
    model: str
    version: int


def rows_request(model: str, rows: Rows, version: int = 0) -> pb.ScoreRequest:
    """A generic-rows ScoreRequest from columns (feature -> one value per row) or a table."""
    columns = (
        {name: rows[name] for name in rows.column_names}
        if isinstance(rows, pa.Table)
        else dict(rows)
    )
    return pb.ScoreRequest(
        model=model,
        version=version,
        rows=pb.Rows(
            columns={name: column_from_values(name, values) for name, values in columns.items()}
        ),
    )


def ranking_request(
    model: str,
    context: Mapping[str, Any],
    item_ids: Sequence[Any] | np.ndarray | pa.Array,
    version: int = 0,
    candidate_features: Mapping[str, Any] | None = None,
) -> pb.ScoreRequest:
    """A ranking ScoreRequest: one context row (feature -> one value) and N candidate ids."""
    return pb.ScoreRequest(
        model=model,
        version=version,
        ranking=pb.RankingRequest(
            context={name: column_from_values(name, [value]) for name, value in context.items()},
            candidate_item_ids=column_from_values("candidate_item_ids", item_ids),
            candidate_features={
                name: column_from_values(name, values)
                for name, values in (candidate_features or {}).items()
            },
        ),
    )


def result_from(response: pb.ScoreResponse) -> ScoreResult:
    """The ScoreResult of a ScoreResponse."""
    return ScoreResult(
        scores={
            task: np.asarray(scores.probabilities, dtype=np.float32)
            for task, scores in response.scores.items()
        },
        model=response.model,
        version=int(response.version),
    )


def _channel_args(max_message_bytes: int | None) -> list[tuple[str, Any]]:
    if max_message_bytes is None:
        return []
    return [("grpc.max_receive_message_length", max_message_bytes)]


def _credentials(root_certificates: bytes | None) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(root_certificates=root_certificates)


class _Common:
    def __init__(self, token: str | None, timeout_s: float | None) -> None:
        self._metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {token}"),) if token else ()
        )
        self.timeout_s = timeout_s

    def _call_metadata(self, request_id: str | None) -> tuple[tuple[str, str], ...]:
        if request_id:
            return (*self._metadata, ("x-request-id", request_id))
        return self._metadata


class ScoringClient(_Common):
    """Blocking client of `recsys.v1.Scoring` (and the health service).

    Args:
        address: `host:port` of the server.
        token: bearer token, when the server requires one.
        root_certificates: PEM roots to trust; when given the channel uses TLS.
        timeout_s: default deadline of each call (None: no deadline).
        max_message_bytes: the largest response accepted (gRPC's default is 4 MiB).
    """

    def __init__(
        self,
        address: str,
        token: str | None = None,
        root_certificates: bytes | None = None,
        timeout_s: float | None = 30.0,
        max_message_bytes: int | None = None,
    ) -> None:
        super().__init__(token, timeout_s)
        options = _channel_args(max_message_bytes)
        self.channel = (
            grpc.secure_channel(address, _credentials(root_certificates), options=options)
            if root_certificates is not None
            else grpc.insecure_channel(address, options=options)
        )
        self._stub = pb_grpc.ScoringStub(self.channel)
        self._health = health_pb2_grpc.HealthStub(self.channel)

    def __enter__(self) -> ScoringClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def score(
        self,
        request: pb.ScoreRequest,
        timeout_s: float | None = None,
        request_id: str | None = None,
    ) -> ScoreResult:
        """Sends a ScoreRequest as is. Raises grpc.RpcError with the server's status."""
        response = self._stub.Score(
            request,
            timeout=timeout_s if timeout_s is not None else self.timeout_s,
            metadata=self._call_metadata(request_id),
            wait_for_ready=True,
        )
        return result_from(response)

    def score_rows(
        self,
        model: str,
        rows: Rows,
        version: int = 0,
        timeout_s: float | None = None,
        request_id: str | None = None,
    ) -> ScoreResult:
        """Scores generic rows: every input feature of the model, one value per row."""
        return self.score(rows_request(model, rows, version), timeout_s, request_id)

    def rank(
        self,
        model: str,
        context: Mapping[str, Any],
        item_ids: Sequence[Any] | np.ndarray | pa.Array,
        version: int = 0,
        candidate_features: Mapping[str, Any] | None = None,
        timeout_s: float | None = None,
        request_id: str | None = None,
    ) -> ScoreResult:
        """Scores N candidate items for one context; the server fills side features by id."""
        request = ranking_request(model, context, item_ids, version, candidate_features)
        return self.score(request, timeout_s, request_id)

    def model_info(self, model: str, version: int = 0) -> pb.ModelInfo:
        """Tasks, features, versions and export metrics of a loaded model."""
        return self._stub.GetModelInfo(
            pb.ModelInfoRequest(model=model, version=version),
            timeout=self.timeout_s,
            metadata=self._metadata,
            wait_for_ready=True,
        )

    def health(self, service: str = "") -> str:
        """The health status name (SERVING, NOT_SERVING, ...) of "" (overall) or a model."""
        response = self._health.Check(
            health_pb2.HealthCheckRequest(service=service), timeout=self.timeout_s
        )
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


class AsyncScoringClient(_Common):
    """asyncio client of `recsys.v1.Scoring`; same methods as ScoringClient, awaitable.

    Create it inside the event loop that uses it.
    """

    def __init__(
        self,
        address: str,
        token: str | None = None,
        root_certificates: bytes | None = None,
        timeout_s: float | None = 30.0,
        max_message_bytes: int | None = None,
    ) -> None:
        super().__init__(token, timeout_s)
        options = _channel_args(max_message_bytes)
        self.channel = (
            grpc.aio.secure_channel(address, _credentials(root_certificates), options=options)
            if root_certificates is not None
            else grpc.aio.insecure_channel(address, options=options)
        )
        self._stub = pb_grpc.ScoringStub(self.channel)
        self._health = health_pb2_grpc.HealthStub(self.channel)

    async def __aenter__(self) -> AsyncScoringClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    async def score(
        self,
        request: pb.ScoreRequest,
        timeout_s: float | None = None,
        request_id: str | None = None,
    ) -> ScoreResult:
        """Sends a ScoreRequest as is. Raises grpc.aio.AioRpcError with the server's status."""
        response = await self._stub.Score(
            request,
            timeout=timeout_s if timeout_s is not None else self.timeout_s,
            metadata=self._call_metadata(request_id),
            wait_for_ready=True,
        )
        return result_from(response)

    async def score_rows(
        self,
        model: str,
        rows: Rows,
        version: int = 0,
        timeout_s: float | None = None,
        request_id: str | None = None,
    ) -> ScoreResult:
        """Scores generic rows: every input feature of the model, one value per row."""
        return await self.score(rows_request(model, rows, version), timeout_s, request_id)

    async def rank(
        self,
        model: str,
        context: Mapping[str, Any],
        item_ids: Sequence[Any] | np.ndarray | pa.Array,
        version: int = 0,
        candidate_features: Mapping[str, Any] | None = None,
        timeout_s: float | None = None,
        request_id: str | None = None,
    ) -> ScoreResult:
        """Scores N candidate items for one context; the server fills side features by id."""
        request = ranking_request(model, context, item_ids, version, candidate_features)
        return await self.score(request, timeout_s, request_id)

    async def model_info(self, model: str, version: int = 0) -> pb.ModelInfo:
        """Tasks, features, versions and export metrics of a loaded model."""
        return await self._stub.GetModelInfo(
            pb.ModelInfoRequest(model=model, version=version),
            timeout=self.timeout_s,
            metadata=self._metadata,
            wait_for_ready=True,
        )

    async def health(self, service: str = "") -> str:
        """The health status name (SERVING, NOT_SERVING, ...) of "" (overall) or a model."""
        response = await self._health.Check(
            health_pb2.HealthCheckRequest(service=service), timeout=self.timeout_s
        )
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
