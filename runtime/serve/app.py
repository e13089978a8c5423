"""`voxport serve`: the FastAPI app over a bundle, its error mapping, body limit and metrics.

Every failure is a status with a message ({"detail": ..., "kind": ...}); none stops the server:
400/422 bad input, 404 unknown voice, 413 too large, 415 not audio, 503 + Retry-After at
capacity, 504 past the request timeout. OpenAPI docs at /docs (schema at /openapi.json).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from voxport.errors import (
    AudioError,
    ConfigError,
    InvalidVoiceId,
    LibraryFull,
    Overloaded,
    RequestError,
    RequestTimeout,
    UploadError,
    VoiceNotFound,
    VoxportError,
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
        (Overloaded, 503, "overloaded"), (RequestTimeout, 504, "timeout"), (VoiceNotFound, 404, "voice_not_found"),
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
    """Latency per route and status, to the last byte of the response (streams included)."""

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
            self.service.telemetry.requests.labels(endpoint, str(status)).observe(time.perf_counter() - start)


def create_app(settings: ServeSettings, service: Service | None = None) -> FastAPI:
    """The app; models and the voice library load here, before any socket is opened."""
    service = service or Service(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        service.close()

    app = FastAPI(title="voxport voice cloning", version="1", lifespan=lifespan, description=(
        "Voice cloning over a voxport bundle. Every synthesis answers in the voice asked for (uploaded "
        "reference, stored voice_id or embedding) or with an error; there is no default voice. "
        "Responses name the weights (X-Voxport-Weights): a seeded synthesizer's output is not speech."))
    app.state.service = service
    app.include_router(router)

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
        service.telemetry.errors.labels("internal").inc()
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return _error(500, "internal", f"internal error: {type(exc).__name__}")

    app.add_middleware(BodyLimit, max_bytes=settings.limits.max_upload_bytes + _BODY_SLACK)
    app.add_middleware(RequestMetrics, service=service)
    return app


def serve(cfg: Any) -> None:
    """Entry point of `voxport serve` (Hydra config with a `serve` node)."""
    import uvicorn

    settings = ServeSettings.from_cfg(cfg.serve, cfg.target)
    if not settings.loopback:
        log.warning("serving on %s: reachable from other hosts; there is no authentication", settings.host)
    app = create_app(settings)
    log.info("voxport serve: http://%s:%d (docs at /docs), bundle %s, voices %s", settings.host, settings.port,
             settings.bundle_dir, settings.voices_dir)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info", timeout_graceful_shutdown=10)
