"""ServerConfig: every knob of the scoring server, typed, frozen and strict (STYLE.md §5).

Built by `recsys serve` from its flags (or by tests directly) and read by the model manager,
the micro-batcher, the interceptors and `serving.server.create_server`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

MIB = 1 << 20


class ServerConfig(BaseModel):
    """Configuration of one scoring server process.

    Args:
        model_repo: the model repository, `MODEL_REPO/<name>/<version>/`.
        host: interface to bind; loopback by default (expose deliberately).
        port: gRPC port; 0 picks a free port (the bound port is reported).
        metrics_port: Prometheus metrics port on `host`; None disables it, 0 picks a free port.
        max_batch_rows: the micro-batcher closes a batch at this many rows.
        max_wait_ms: how long a batch waits for more requests once it has its first one.
        max_queue_rows: rows allowed to wait per model version; beyond it RESOURCE_EXHAUSTED.
        max_rows_per_request: larger requests are INVALID_ARGUMENT; must fit in the queue.
        max_receive_message_bytes: gRPC refuses larger messages with RESOURCE_EXHAUSTED.
        max_concurrent_rpcs: Scoring calls beyond this many in flight are refused with
            RESOURCE_EXHAUSTED (health checks and reflection are not counted); None =
            unbounded.
        poll_interval_s: how often the model repository is scanned for new versions.
        drain_s: on SIGTERM, how long new calls are still answered after health turns
            NOT_SERVING (so load balancers move traffic away before calls are refused).
        grace_s: then, how long in-flight calls may take before they are cancelled.
        tls_cert_file: PEM certificate chain; with `tls_key_file` the port serves TLS only.
        tls_key_file: PEM private key of the certificate.
        auth_token: when set, every call except health checks needs
            `authorization: Bearer <token>` metadata (UNAUTHENTICATED otherwise).
        warmup_rows: rows of the forward pass run on each model version before it serves.
        num_scoring_threads: threads running model forwards (batches in flight at once).
        max_versions_per_model: newest valid versions kept loaded per model (pinnable).
        quantize: how embedding tables are served: `none` (fp32 as exported), `int8` or
            `int4` (fbgemm row-wise quantized tables, kept quantized in memory).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    model_repo: Path
    host: str = "127.0.0.1"
    port: int = Field(default=50051, ge=0, le=65535)
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    max_batch_rows: int = Field(default=256, ge=1)
    max_wait_ms: float = Field(default=2.0, ge=0.0)
    max_queue_rows: int = Field(default=8192, ge=1)
    max_rows_per_request: int = Field(default=4096, ge=1)
    max_receive_message_bytes: int = Field(default=4 * MIB, ge=1024)
    max_concurrent_rpcs: int | None = Field(default=None, ge=1)
    poll_interval_s: float = Field(default=5.0, gt=0.0)
    drain_s: float = Field(default=1.0, ge=0.0)
    grace_s: float = Field(default=10.0, ge=0.0)
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    auth_token: SecretStr | None = None
    warmup_rows: int = Field(default=8, ge=1)
    num_scoring_threads: int = Field(default=1, ge=1)
    max_versions_per_model: int = Field(default=2, ge=1)
    quantize: Literal["none", "int8", "int4"] = "none"

    @model_validator(mode="after")
    def _consistent(self) -> ServerConfig:
        if self.max_rows_per_request > self.max_queue_rows:
            raise ValueError(
                f"max_rows_per_request={self.max_rows_per_request} exceeds max_queue_rows="
                f"{self.max_queue_rows} (expected <=); such a request could never be queued"
            )
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file must be given together (got only one)")
        if self.auth_token is not None and not self.auth_token.get_secret_value().strip():
            raise ValueError("auth_token is empty (expected a non-empty token or none)")
        if self.metrics_port and self.metrics_port == self.port:
            raise ValueError(
                f"metrics_port={self.metrics_port} equals port (expected a different port)"
            )
        return self

    @property
    def use_tls(self) -> bool:
        return self.tls_cert_file is not None
