"""`voxport serve`: the FastAPI app over a bundle, its error mapping, body limit and metrics.

Every failure is a status with a message ({"detail": ..., "kind": ...}); none stops the server:
400/422 bad input, 404 unknown voice, 410 quarantined (damaged) voice, 413 too large, 415 not
audio, 503 + Retry-After at capacity or while shutting down, 504 past the request timeout;
400 unknown Host, 403 cross-origin, 401 without a valid API key
(runtime/serve/access.py). Liveness at /health, readiness at /ready.
One INFO log line per request (method, path, status, duration, request id); details are DEBUG.
On SIGTERM/SIGINT the service stops admitting (503, /ready 503), lets admitted work finish within
the request timeout, then exits. OpenAPI docs at /docs and /redoc,
served from local assets (the fastapi-offline package), never a CDN; schema at /openapi.json.
"""

from __future__ import annotations

import importlib.resources
import logging
import math
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from voxport.errors import (
    AudioError,
    ClientGone,
    ConfigError,
    InvalidVoiceId,
    LibraryFull,
    Overloaded,
    ReplicaUnavailable,
    RequestError,
    RequestTimeout,
    ShuttingDown,
    UploadError,
    VoiceNotFound,
    VoiceQuarantined,
    VoxportError,
)
from voxport.runtime.serve.access import (
    SCOPE_KEY,
    ApiKeyAuth,
    ApiKeys,
    HostOriginCheck,
    RequestId,
    check_exposure,
    install_request_id_logging,
    is_open,
    load_api_keys,
    request_context,
)
from voxport.runtime.serve.routes import router
from voxport.runtime.serve.service import Service
from voxport.runtime.serve.settings import ServeSettings

log = logging.getLogger(__name__)

# Room for the multipart envelope and form fields around an upload of max_upload_bytes.
_BODY_SLACK = 256 * 1024
_DRAIN_CAP = 64 * 1024 * 1024


def _error(status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": message, "kind": kind}, status_code=status, headers=headers)


def _status(exc: Exception) -> tuple[int, str]:
    """HTTP status and error kind of an exception raised while serving a request."""
    table: list[tuple[type, int, str]] = [
        (ShuttingDown, 503, "shutting_down"), (ReplicaUnavailable, 503, "replica_unavailable"),
        (Overloaded, 503, "overloaded"), (RequestTimeout, 504, "timeout"),
        (ClientGone, 499, "cancelled"),  # nginx's "client closed request": nobody reads it, metrics count it
        (VoiceQuarantined, 410, "voice_quarantined"), (VoiceNotFound, 404, "voice_not_found"),
        (InvalidVoiceId, 422, "invalid_voice_id"), (LibraryFull, 413, "library_full"), (AudioError, 422, "audio"),
    ]
    if isinstance(exc, UploadError):
        return exc.status, {413: "too_large", 415: "unsupported_audio"}.get(exc.status, "audio")
    if isinstance(exc, RequestError):
        return exc.status, "bad_request"
    for kind, status, name in table:
        if isinstance(exc, kind):
            return status, name
    if isinstance(exc, ConfigError):
        return 422, "bad_request"
    return 500, "internal"


class BodyLimit:
    """413 for a request body over `max_bytes`: from Content-Length at once, else while reading."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await self._reject(scope, receive, send, drain=True)
            return
        seen, over, complete = 0, False, False

        async def limited() -> Message:
            nonlocal seen, over, complete
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                complete = not message.get("more_body", False)
                if seen > self.max_bytes:
                    over = True
                    raise UploadError(413, "request body too large")
            return message

        async def guarded_send(message: Message) -> None:
            if not over:  # once over, whatever the app answers is replaced by the 413
                await send(message)

        try:
            await self.app(scope, limited, guarded_send)
        except UploadError:
            if not over:
                raise
        if over:
            await self._reject(scope, receive, send, drain=not complete)

    async def _reject(self, scope: Scope, receive: Receive, send: Send, drain: bool) -> None:
        # Read and drop the rest of a moderately large body first: a client still sending when
        # the server closes gets a connection reset instead of the 413. Beyond the cap, reset it is.
        budget = _DRAIN_CAP
        while drain and budget > 0:
            message = await receive()
            budget -= len(message.get("body", b""))
            if message["type"] != "http.request" or not message.get("more_body", False):
                break
        text = f"request body larger than {self.max_bytes} bytes"
        await _error(413, "too_large", text, {"Connection": "close"})(scope, receive, send)


class RequestMetrics:
    """Latency per route and status, to the last byte of the response (streams included), and the
    request's one INFO log line (inside RequestId: the line starts with the request id)."""

    def __init__(self, app: ASGIApp, service: Service) -> None:
        self.app, self.service = app, service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), 500

        async def timed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, timed_send)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", "unmatched")
            seconds = time.perf_counter() - start
            self.service.telemetry.requests.labels(endpoint, str(status)).observe(seconds)
            log.info("%s %s %d %.3fs", scope["method"], scope["path"], status, seconds)


def _docs(app: FastAPI) -> None:
    """/docs (Swagger UI) and /redoc from the assets fastapi-offline ships: they work offline."""
    static = importlib.resources.files("fastapi_offline") / "static"
    app.mount("/docs/static", StaticFiles(directory=str(static)), name="docs-static")

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(
            openapi_url=f"{root}/openapi.json", title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{root}/docs/static/swagger-ui-bundle.js",
            swagger_css_url=f"{root}/docs/static/swagger-ui.css", swagger_favicon_url=f"{root}/docs/static/favicon.png",
            swagger_ui_parameters={"validatorUrl": None})  # the online validator badge would call out

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_redoc_html(openapi_url=f"{root}/openapi.json", title=f"{app.title} - ReDoc",
                              redoc_js_url=f"{root}/docs/static/redoc.standalone.js",
                              redoc_favicon_url=f"{root}/docs/static/favicon.png", with_google_fonts=False)


def _bearer_in_openapi(app: FastAPI) -> None:
    """Declare the Bearer scheme, so the docs' Authorize button sends the key (open paths need none)."""
    default = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = default()
            schema.setdefault("components", {})["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
            schema["security"] = [{"bearer": []}]
            for path, operations in schema.get("paths", {}).items():
                for operation in operations.values() if is_open(path) else ():
                    operation["security"] = []
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _not_ready(service: Service, accepting: bool) -> str | None:
    """Why the service cannot take work now, or None when it can."""
    if not accepting or service.engine.draining:
        return "starting or shutting down"
    if not service.engine.alive:
        return "inference workers are down"
    return None


def _access_middleware(app: FastAPI, settings: ServeSettings, service: Service, keys: ApiKeys) -> None:
    # Added innermost first: RequestId ends up outermost, so every answer, refusals included, has an id.
    drain_cap = settings.limits.max_upload_bytes + _BODY_SLACK
    app.add_middleware(BodyLimit, max_bytes=drain_cap)
    app.add_middleware(ApiKeyAuth, keys=keys, telemetry=service.telemetry, drain_cap=drain_cap)
    if settings.allowed_origins:  # CORS only for the origins allowed; none by default
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.allowed_origins),
                           allow_methods=["GET", "POST", "DELETE"],
                           allow_headers=["Authorization", "Content-Type", "X-Request-ID"],
                           expose_headers=["X-Request-ID", "Retry-After", "X-Voxport-Weights", "X-Voxport-Warning",
                                           "X-Voxport-Voice", "X-Voxport-Embedding-Sha256",
                                           "X-Voxport-Sample-Rate", "X-Voxport-Duration-S"])
    app.add_middleware(HostOriginCheck, settings=settings, telemetry=service.telemetry, drain_cap=drain_cap)
    app.add_middleware(RequestMetrics, service=service)
    app.add_middleware(RequestId)


def create_app(settings: ServeSettings, service: Service | None = None, keys: ApiKeys | None = None) -> FastAPI:
    """The app; models and the voice library load here, before any socket is opened.

    `keys`: the accepted API keys; None reads them as `voxport serve` does (VOXPORT_API_KEYS,
    serve.api_keys_file).
    """
    keys = load_api_keys(settings) if keys is None else keys
    service = service or Service(settings)
    install_request_id_logging()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.accepting = True
        yield
        # uvicorn has waited for open responses; work whose client left may still run: wait for it too.
        begin_shutdown(app)
        if not await service.engine.drain(settings.request_timeout_s):
            log.warning("shutdown: %d admitted request(s) still running after %g s; stopping them",
                        service.engine.inflight, settings.request_timeout_s)
        service.close()

    app = FastAPI(title="voxport voice cloning", version="1", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description=(
        "Voice cloning over a voxport bundle. Every synthesis answers in the voice asked for (uploaded "
        "reference, stored voice_id or embedding) or with an error; there is no default voice. "
        "Responses name the weights (X-Voxport-Weights): a seeded synthesizer's output is not speech."))
    app.state.service, app.state.accepting = service, False
    app.include_router(router)
    _docs(app)
    if keys:
        _bearer_in_openapi(app)

    @app.get("/ready", tags=["service"], responses={503: {"description": "not ready: starting, shutting down "
                                                               "or workers down"}})
    async def ready(request: Request) -> JSONResponse:
        """200 when the bundle is loaded and the inference workers can take work; 503 otherwise."""
        reason = _not_ready(service, request.app.state.accepting)
        if reason:
            return _error(503, "not_ready", reason, {"Retry-After": "1"})
        return JSONResponse({"status": "ready"})

    @app.exception_handler(VoxportError)
    async def voxport_error(request: Request, exc: VoxportError) -> JSONResponse:
        status, kind = _status(exc)
        service.telemetry.errors.labels(kind).inc()
        if status >= 500 and status not in (503, 504):
            log.error("%s %s failed: %s", request.method, request.url.path, exc, exc_info=exc)
        headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, Overloaded) else None
        return _error(status, kind, str(exc), headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        service.telemetry.errors.labels("validation").inc()
        errors: list[dict[str, Any]] = [
            {k: v for k, v in e.items() if k in ("loc", "msg", "type")} for e in exc.errors()]
        message = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors)
        return JSONResponse({"detail": message, "kind": "validation", "errors": errors}, status_code=422)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        # Runs outside the middleware (Starlette's outermost layer): the request id comes from the scope.
        request_id = request.scope.get(SCOPE_KEY)
        service.telemetry.errors.labels("internal").inc()
        with request_context(request_id):
            log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return _error(500, "internal", f"internal error: {type(exc).__name__}",
                      {"X-Request-ID": request_id} if request_id else None)

    _access_middleware(app, settings, service, keys)
    return app


def begin_shutdown(app: FastAPI) -> None:
    """Stop admitting work: /ready and new inference requests answer 503 from here on."""
    service: Service = app.state.service
    if not service.engine.draining:
        log.info("shutting down: admitting no new work; %d admitted request(s) finishing", service.engine.inflight)
    app.state.accepting = False
    service.engine.stop_admitting()


def _server(app: FastAPI, settings: ServeSettings) -> Any:
    """uvicorn, draining on SIGTERM/SIGINT: admission stops at the signal (not after uvicorn's wait),
    open requests get up to the request timeout, then the lifespan drains the engine and closes."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            begin_shutdown(app)
            super().handle_exit(sig, frame)

    # access_log off: RequestMetrics logs each request once, with its duration and id.
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level="info", access_log=False,
                            timeout_graceful_shutdown=int(math.ceil(settings.request_timeout_s)) + 5,
                            log_config=_log_config())
    return Server(config)


def _log_config() -> dict[str, Any]:
    """uvicorn's logging, with the request id on access lines (their format ignores the message)."""
    import copy

    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["formatters"]["access"]["fmt"] += " request=%(request_id)s"
    return config


def serve(cfg: Any) -> None:
    """Entry point of `voxport serve` (Hydra config with a `serve` node)."""
    settings = ServeSettings.from_cfg(cfg.serve, cfg.target)
    keys = load_api_keys(settings)
    check_exposure(settings, keys)  # before any model loads: a refusal is quick
    install_request_id_logging()
    if settings.engine == "ray":  # the same app (create_app) in a Ray Serve ingress deployment
        from voxport.runtime.serve.ray.launcher import run

        run(settings, keys)
        return
    app = create_app(settings, keys=keys)
    log.info("voxport serve: http://%s:%d (docs at /docs), bundle %s, voices %s, %s", settings.host, settings.port,
             settings.bundle_dir, settings.voices_dir, f"{len(keys)} API key(s)" if keys else "no API keys")
    _server(app, settings).run()
