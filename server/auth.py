"""Bearer-token authentication: one admin token (from the settings), worker tokens per job (hashed)."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from pum.common.errors import Forbidden, Unauthorized

from .service import JobService
from .tokens import hash_token

bearer = HTTPBearer(auto_error=False, description="admin token, or a worker token issued by the admin")


async def get_service(request: Request) -> JobService:
    return request.app.state.service


Service = Annotated[JobService, Depends(get_service)]
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]


def is_admin(service: JobService, token: str | None) -> bool:
    expected = service.settings.admin_token
    if expected is None:
        return service.settings.dev_mode
    return token is not None and hmac.compare_digest(token.encode(), expected.get_secret_value().encode())


def require_admin(service: Service, credentials: Credentials) -> None:
    """Runs in a worker thread: it may read the store."""
    token = credentials.credentials if credentials else None
    if is_admin(service, token):
        return
    if token is None:
        raise Unauthorized("missing bearer token: send 'Authorization: Bearer <admin token>'")
    if service.store.token_job(hash_token(token)):
        raise Forbidden("this endpoint needs the admin token; a worker token was given")
    raise Unauthorized("unknown token: send the admin token")


async def require_worker(credentials: Credentials) -> str:
    """The raw worker token; the service resolves it to its job (no I/O here, so no thread hop)."""
    if credentials is None:
        raise Unauthorized("missing bearer token: send 'Authorization: Bearer <worker token>'")
    return credentials.credentials


AdminOnly = Depends(require_admin)
WorkerToken = Annotated[str, Depends(require_worker)]
