"""Prometheus metrics of the scoring server, in a registry of their own.

Each server (and test) gets its own `CollectorRegistry`, so several servers in one process never
collide in prometheus_client's global registry. `start_http` exposes it on the side port.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import start_http_server

from recsys.features.schema import VALUE_OUTCOMES

logger = logging.getLogger(__name__)

_LATENCY_BUCKETS_S = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
_BATCH_BUCKETS = tuple(float(2**k) for k in range(13))  # 1 .. 4096 rows


class ServerMetrics:
    """The server's metrics.

    Attributes:
        requests: RPCs by method and final status code (`recsys_requests_total`).
        latency: RPC latency by method, seconds (`recsys_request_latency_seconds`).
        batch_rows: rows per forward pass of the micro-batcher (`recsys_batch_rows`).
        queue_rows: rows waiting per model version (`recsys_queue_rows`).
        model_version: newest loaded version per model (`recsys_model_version`).
        load_failures: versions that failed to load or verify (`recsys_model_load_failures_total`).
        feature_values: categorical values scored, by model, feature and outcome (known,
            out_of_vocabulary, missing) (`recsys_feature_values_total`).
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "recsys_requests",
            "RPCs by method and status code",
            ["method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "recsys_request_latency_seconds",
            "RPC latency in seconds, by method",
            ["method"],
            buckets=_LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.batch_rows = Histogram(
            "recsys_batch_rows",
            "Rows per forward pass formed by the micro-batcher",
            buckets=_BATCH_BUCKETS,
            registry=self.registry,
        )
        self.queue_rows = Gauge(
            "recsys_queue_rows",
            "Rows waiting in the micro-batcher queue",
            ["model", "version"],
            registry=self.registry,
        )
        self.model_version = Gauge(
            "recsys_model_version",
            "Newest loaded version of each model",
            ["model"],
            registry=self.registry,
        )
        self.load_failures = Counter(
            "recsys_model_load_failures",
            "Model versions that failed to load or verify",
            ["model"],
            registry=self.registry,
        )
        self.feature_values = Counter(
            "recsys_feature_values",
            "Categorical values scored, by model, feature and outcome: known to the vocabulary, "
            "out_of_vocabulary (scored as the OOV id) or missing",
            ["model", "feature", "outcome"],
            registry=self.registry,
        )
        self._value_children: dict[tuple[str, str], tuple[Counter, ...]] = {}
        self._http: WSGIServer | None = None
        self._thread: threading.Thread | None = None
        self.http_port: int | None = None

    def record_values(self, model: str, counts: Mapping[str, Sequence[int]]) -> None:
        """Adds one request's `FeatureSchema.value_outcomes` counts to `feature_values`."""
        for feature, per_outcome in counts.items():
            children = self._value_children.get((model, feature))
            if children is None:  # labels() per call would cost a lock and a lookup per outcome
                # labels() creates each outcome's series at 0, so every series exists from the
                # first batch (a series that appears late reads as a gap on a dashboard)
                children = tuple(
                    self.feature_values.labels(model, feature, outcome)
                    for outcome in VALUE_OUTCOMES
                )
                self._value_children[model, feature] = children
            for child, count in zip(children, per_outcome, strict=True):
                if count:
                    child.inc(int(count))

    def render(self) -> str:
        """The metrics in Prometheus text format (what the side port serves)."""
        return generate_latest(self.registry).decode()

    def start_http(self, host: str, port: int) -> int:
        """Serves the metrics over HTTP on `host:port` in a daemon thread; returns the port."""
        self._http, self._thread = start_http_server(port, addr=host, registry=self.registry)
        self.http_port = int(self._http.server_port)
        logger.info("metrics on http://%s:%d/metrics", host, self.http_port)
        return self.http_port

    def stop_http(self) -> None:
        """Stops the metrics HTTP server, if started."""
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
            self.http_port = None
