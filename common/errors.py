"""One exception hierarchy for PUM; the HTTP edge maps it to status codes, the client back.

    PumError
    ├── InvalidInput        400  the request is malformed or out of range (say what to change)
    │   ├── PayloadTooLarge 413  a body over the configured size limit
    │   └── RangeNotSatisfiable 416  a download resumed past the end
    ├── RequestTimeout      408  a client stopped sending mid-body
    ├── Unauthorized        401  missing or unknown bearer token
    ├── Forbidden           403  a valid token without the right role or job
    ├── NotFound            404  no such job, lease or file
    ├── Conflict            409  the request is valid but the state does not allow it
    │   └── LeaseExpired    410  the lease ran out or its copy was handed to another worker
    └── InsufficientStorage 507  the server's disk cannot hold what the request needs (bytes named)

`BY_STATUS` is the one status ↔ exception table: the server answers `err.status`, and the client
raises `BY_STATUS[status]` for an error reply.
"""

from __future__ import annotations


class PumError(Exception):
    """Base class; `status` is the HTTP status code the edge returns, `summary` its meaning."""

    status = 500
    summary = "server error"


class InvalidInput(PumError, ValueError):
    status = 400
    summary = "invalid input"


class PayloadTooLarge(InvalidInput):
    status = 413
    summary = "the upload is larger than the model's delta"


class RangeNotSatisfiable(InvalidInput):
    status = 416
    summary = "a Range outside the copy"


class RequestTimeout(PumError):
    status = 408
    summary = "the upload stalled"


class Unauthorized(PumError):
    status = 401
    summary = "missing or unknown token"


class Forbidden(PumError):
    status = 403
    summary = "a token without the right role"


class NotFound(PumError):
    status = 404
    summary = "no such job, lease or file"


class Conflict(PumError):
    status = 409
    summary = "the state does not allow it"


class LeaseExpired(Conflict):
    status = 410
    summary = "the lease expired or ended"


class InsufficientStorage(PumError):
    status = 507
    summary = "the server's disk is too full"


def _subclasses(cls: type[PumError]) -> list[type[PumError]]:
    found = []
    for sub in cls.__subclasses__():
        found += [sub, *_subclasses(sub)]
    return found


# Every class of the tree by its status (one class per status; a test checks it).
BY_STATUS: dict[int, type[PumError]] = {cls.status: cls for cls in _subclasses(PumError)}


def error_for_status(status: int) -> type[PumError]:
    """The exception class of an HTTP status (PumError for a status outside the tree)."""
    return BY_STATUS.get(status, PumError)
