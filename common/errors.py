"""One exception hierarchy for PUM; the HTTP edge maps it to status codes.

    PumError
    ├── InvalidInput        400  the request is malformed or out of range (say what to change)
    │   ├── PayloadTooLarge 413  a body over the configured size limit
    │   └── RangeNotSatisfiable 416  a download resumed past the end
    ├── RequestTimeout      408  a client stopped sending mid-body
    ├── Unauthorized        401  missing or unknown bearer token
    ├── Forbidden           403  a valid token without the right role or job
    ├── NotFound            404  no such job, lease or file
    └── Conflict            409  the request is valid but the state does not allow it
        └── LeaseExpired    410  the lease ran out or its copy was handed to another worker
"""


class PumError(Exception):
    """Base class; `status` is the HTTP status code the edge returns."""

    status = 500


class InvalidInput(PumError, ValueError):
    status = 400


class PayloadTooLarge(InvalidInput):
    status = 413


class RangeNotSatisfiable(InvalidInput):
    status = 416


class RequestTimeout(PumError):
    status = 408


class Unauthorized(PumError):
    status = 401


class Forbidden(PumError):
    status = 403


class NotFound(PumError):
    status = 404


class Conflict(PumError):
    status = 409


class LeaseExpired(Conflict):
    status = 410
