"""The exceptions of the request path, one per gRPC status the server answers with.

Servicer code raises these; one interceptor (`serving.interceptors`) maps them to status codes
(STYLE.md §9): RequestError -> INVALID_ARGUMENT, NotFound -> NOT_FOUND, NotReady -> UNAVAILABLE,
Overloaded -> RESOURCE_EXHAUSTED, DeadlineExceeded -> DEADLINE_EXCEEDED; anything else is a bug
and becomes INTERNAL with the request id. Every message follows
`<where>: <what> (got <value>, expected <constraint>)[; <fix>]`.
"""

from __future__ import annotations

# Longest user-sent name (feature, model) echoed back in an error: a client may send a name of
# any length, and echoed whole it would overflow the status trailers (16 KiB).
MAX_ECHO_CHARS = 64


def shorten(text: str, max_chars: int = MAX_ECHO_CHARS) -> str:
    """`text` cut to `max_chars` characters (plus "…" when cut), for echoing user input."""
    return text if len(text) <= max_chars else text[:max_chars] + "…"


# Fields of the request itself (not features), named as "field '...'" in messages.
REQUEST_FIELDS = frozenset(
    {"input", "rows", "model", "candidate_item_ids", "context", "candidate_features"}
)


class ServingError(Exception):
    """Base of the errors a request can end with (each maps to one gRPC status)."""


class RequestError(ServingError, ValueError):
    """The request is invalid: a feature is unknown, mistyped, missing or of the wrong length.

    Args:
        field: the feature (or request field) at fault, e.g. `genres` or `candidate_item_ids`;
            None when the request as a whole is at fault.
        row: the row (or candidate) index at fault, when one row is.
        message: what is wrong, following the message template.
    """

    def __init__(self, field: str | None, row: int | None, message: str) -> None:
        super().__init__(field, row, message)
        self.field = field
        self.row = row
        self.message = message

    def __str__(self) -> str:
        if self.field is None:
            return f"request: {self.message}"
        what = "field" if self.field in REQUEST_FIELDS else "feature"
        row = f" row {self.row}" if self.row is not None else ""
        return f"request: {what} '{self.field}'{row} {self.message}"


class NotFound(ServingError, LookupError):
    """The requested model or version is not in the repository (or not loaded)."""


class NotReady(ServingError):
    """The model manager has not finished loading the model yet; retry later."""


class Overloaded(ServingError):
    """The queue is full, or the queue cannot meet the request's deadline."""


class DeadlineExceeded(ServingError):
    """The request's deadline expired while it waited in the queue."""
