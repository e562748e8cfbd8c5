"""The HTTP edge: the FastAPI application, its error mapping, and the routes of both roles.

Handlers decode, call one service method, encode; every reply is a model of
`pum.common.schemas`. Errors are `pum.common.errors` exceptions, answered with their status and
an `ErrorBody`; a request the schema refuses is an `InvalidInput` (400) like any other bad input.
"""

from __future__ import annotations

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from pum.common.errors import BY_STATUS, InvalidInput, PumError
from pum.common.schemas import ErrorBody, Health

from .api_admin import router as admin_router
from .api_work import router as work_router
from . import ui
from .auth import AdminOnly, Service
from .config import ServerSettings
from .gate import RequestGate
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .service import JobService

ERROR_RESPONSES = {status: {"model": ErrorBody, "description": cls.summary} for status, cls in sorted(BY_STATUS.items())}


def describe_validation(err: RequestValidationError) -> str:
    """One clause per refused field: where it is and what is wrong (the value is not echoed)."""
    parts = []
    for e in err.errors():
        where = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
        parts.append(f"{where}: {e.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(parts[:10])


# The app's own routes, on a router built once at import like the others (routes declared on each app
# built their reply models again for every app: 13 ms a server, most of a test server's set-up).
router = APIRouter()


@router.get("/healthz", response_model=Health)
async def healthz() -> Health:
    """Liveness: the server answers."""
    return Health()


@router.get("/metrics", dependencies=[AdminOnly], include_in_schema=False)
def metrics(service: Service) -> Response:
    """Prometheus metrics (text format), admin-only: the bearer admin token, as for the admin API."""
    return Response(service.metrics.exposition(), media_type=METRICS_CONTENT_TYPE)


@router.get("/ui", include_in_schema=False)
async def status_page() -> Response:
    """The status page: static, no data in it; it asks for the admin token and reads the admin API."""
    body, headers = ui.page()
    return Response(body, media_type="text/html; charset=utf-8", headers=headers)


def create_app(settings: ServerSettings, service: JobService | None = None) -> FastAPI:
    """The FastAPI application over a state folder (or a given service, for tests)."""
    app = FastAPI(
        title="PUM server", version="0.1.0", description="Perturb–Unlearn–Merge federated unlearning",
        responses=ERROR_RESPONSES,
    )
    app.state.service = service or JobService.open(settings)
    app.add_middleware(RequestGate, max_json_body_bytes=settings.max_json_body_bytes,
                       body_timeout_s=settings.body_timeout_s)

    @app.exception_handler(PumError)
    async def pum_error(request: Request, err: PumError) -> JSONResponse:
        return JSONResponse(status_code=err.status, content=ErrorBody(detail=str(err)).model_dump())

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, err: RequestValidationError) -> JSONResponse:
        return JSONResponse(status_code=InvalidInput.status, content=ErrorBody(detail=describe_validation(err)).model_dump())

    app.include_router(router)
    app.include_router(admin_router)
    app.include_router(work_router)
    _document_400_not_422(app)
    return app


def _document_400_not_422(app: FastAPI) -> None:
    """FastAPI documents a 422 for every route with inputs; this server answers those with 400."""
    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = FastAPI.openapi(app)
            for operations in schema["paths"].values():
                for operation in operations.values():
                    operation["responses"].pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
        return app.openapi_schema

    app.openapi = openapi
