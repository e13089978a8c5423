"""Who may use the service: API keys, the Host and Origin checks, request ids and the bind decision.

The checks wrap the app in this order (outermost first), so that every answer, refusals included,
carries an X-Request-ID:

    RequestId -> metrics -> HostOriginCheck (400 / 403) -> CORS (only for allowed origins) -> ApiKeyAuth (401)

The Host check stops DNS rebinding (a web page whose name resolves to 127.0.0.1 would otherwise be
same-origin with the service); the Origin check stops any web page from POSTing forms to it. Keys are
kept only as SHA-256 digests and compared in constant time; no key is ever logged.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import logging
import os
import re
import uuid
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

from starlette.datastructures import Headers, MutableHeaders
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from voxport.errors import ConfigError, UnsafeBind
from voxport.runtime.serve.settings import ServeSettings
from voxport.runtime.serve.telemetry import Telemetry

log = logging.getLogger(__name__)

KEYS_ENV = "VOXPORT_API_KEYS"
MIN_KEY_CHARS = 16  # a short key can be guessed; keys are meant to be random tokens
# Open without a key: probes of load balancers and orchestrators (no voice data in either), and the
# docs (the API's shape is public in the source; Swagger UI's Authorize button then sends the key).
OPEN_PATHS = frozenset({"/health", "/ready", "/docs", "/redoc", "/openapi.json"})
OPEN_PREFIXES = ("/docs/static/",)
# Request ids end up in headers and log lines: short, and none of space, `%`, quotes or newlines.
_REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_KEY_RE = re.compile(r"[!-~]+")  # visible ASCII: what fits a header token
_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("voxport_request_id", default=None)
SCOPE_KEY = "voxport.request_id"


# ----------------------------------------------------------------------------------- API keys


def _digest(key: str) -> bytes:
    # Comparing fixed-length digests keeps compare_digest from leaking a key's length.
    return hashlib.sha256(key.encode("utf-8")).digest()


class ApiKeys:
    """The accepted keys, as digests only (the keys themselves are not kept, so never printed)."""

    def __init__(self, keys: Iterable[str] = ()) -> None:
        self._digests = tuple(_digest(k) for k in keys)

    def __bool__(self) -> bool:
        return bool(self._digests)

    def __len__(self) -> int:
        return len(self._digests)

    def __repr__(self) -> str:
        return f"ApiKeys({len(self)} keys)"

    def accepts(self, candidate: str) -> bool:
        digest, ok = _digest(candidate), False
        for ref in self._digests:  # no early exit: the time does not say which key matched
            ok |= hmac.compare_digest(digest, ref)
        return ok


def _checked(keys: list[tuple[str, str]]) -> list[str]:
    """The keys, each checked; an error names where the bad key came from, never the key."""
    for where, key in keys:
        if not _KEY_RE.fullmatch(key):
            raise ConfigError(f"API key from {where}: only visible ASCII characters (no spaces) are allowed")
        if len(key) < MIN_KEY_CHARS:
            raise ConfigError(f"API key from {where} is shorter than {MIN_KEY_CHARS} characters")
    return [key for _, key in keys]


def _file_keys(path: Path) -> list[tuple[str, str]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"serve.api_keys_file: cannot read {path}: {exc.__class__.__name__}") from None
    keys = [(f"{path} line {n}", line.strip()) for n, line in enumerate(lines, 1)
            if line.strip() and not line.strip().startswith("#")]
    if not keys:  # an empty key file is a mistake, not a request to run without keys
        raise ConfigError(f"serve.api_keys_file: {path} holds no keys")
    return keys


def load_api_keys(settings: ServeSettings, environ: Mapping[str, str] | None = None) -> ApiKeys:
    """Keys from VOXPORT_API_KEYS (comma-separated) and serve.api_keys_file (one per line), together."""
    environ = os.environ if environ is None else environ
    keys = [(KEYS_ENV, k.strip()) for k in environ.get(KEYS_ENV, "").split(",") if k.strip()]
    if settings.api_keys_file:
        keys += _file_keys(Path(settings.api_keys_file).expanduser())
    return ApiKeys(_checked(keys))


def check_exposure(settings: ServeSettings, keys: ApiKeys) -> None:
    """Refuse to serve a non-loopback address without keys, unless serve.allow_unauthenticated_public."""
    if not settings.loopback and not settings.trusted_hosts:
        log.warning("serving on %s with default serve.trusted_hosts: only Host headers naming %s are accepted",
                    settings.host, ", ".join(settings.hosts))
    if settings.loopback or keys:
        return
    if not settings.allow_unauthenticated_public:
        raise UnsafeBind(f"refusing to serve on {settings.host} without API keys: set {KEYS_ENV} or "
                         "serve.api_keys_file, or serve.allow_unauthenticated_public=true to serve anyone")
    log.warning("serving on %s without API keys (serve.allow_unauthenticated_public): anyone who can reach it "
                "can use it and read the stored voices", settings.host)


# -------------------------------------------------------------------------------- request ids


def current_request_id() -> str | None:
    return _request_id.get()


@contextmanager
def request_context(request_id: str | None) -> Iterator[None]:
    token = _request_id.set(request_id)
    try:
        yield
    finally:
        _request_id.reset(token)


_installed = False


def install_request_id_logging() -> None:
    """Every log record gets `request_id` ("-" outside a request); inside one, its message starts with it.

    A record factory rather than a handler filter: it covers every logger and every handler, including
    those uvicorn and Hydra configure later. Worker threads see the id too (the engine runs jobs in a
    copy of the request's context).
    """
    global _installed
    if _installed:
        return
    base = logging.getLogRecordFactory()

    def factory(*args, **kwargs) -> logging.LogRecord:
        record = base(*args, **kwargs)
        request_id = _request_id.get()
        record.request_id = request_id or "-"
        if request_id:
            record.msg = f"[request {request_id}] {record.msg}"
        return record

    logging.setLogRecordFactory(factory)
    _installed = True


class RequestId:
    """Takes a valid X-Request-ID from the client or makes one; echoes it on every response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = Headers(scope=scope).get("x-request-id")
        request_id = given if given and _REQUEST_ID_RE.fullmatch(given) else uuid.uuid4().hex
        scope[SCOPE_KEY] = request_id  # for the 500 handler, which runs outside this middleware

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)["X-Request-ID"] = request_id
            await send(message)

        with request_context(request_id):
            await self.app(scope, receive, send_with_id)


# ---------------------------------------------------------------------------------- the checks


async def _refuse(scope: Scope, receive: Receive, send: Send, status: int, kind: str, message: str,
                  drain_cap: int, headers: dict[str, str] | None = None) -> None:
    # Read and drop a body first (up to the body limit): a client still sending when we answer
    # would get a connection reset instead of the refusal.
    budget = drain_cap
    while budget > 0:
        incoming = await receive()
        budget -= len(incoming.get("body", b""))
        if incoming["type"] != "http.request" or not incoming.get("more_body", False):
            break
    response = JSONResponse({"detail": message, "kind": kind}, status_code=status,
                            headers={**(headers or {}), "Connection": "close"})
    await response(scope, receive, send)


def _hostname(value: str) -> str:
    """`Host` header or configured name -> the lower-case name without port or IPv6 brackets."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def _origin(value: str) -> str:
    return value.strip().lower().rstrip("/")


class HostOriginCheck:
    """400 for a Host not in serve.trusted_hosts; 403 for a cross-origin request not in serve.allowed_origins."""

    def __init__(self, app: ASGIApp, settings: ServeSettings, telemetry: Telemetry, drain_cap: int) -> None:
        self.app, self.telemetry, self.drain_cap = app, telemetry, drain_cap
        self.hosts = {_hostname(h) for h in settings.hosts}
        self.origins = {_origin(o) for o in settings.allowed_origins}

    def host_ok(self, host: str | None) -> bool:
        if not host:
            return False
        name = _hostname(host)
        return "*" in self.hosts or name in self.hosts or any(
            h.startswith("*.") and name.endswith(h[1:]) for h in self.hosts)

    def origin_ok(self, origin: str, host: str) -> bool:
        # Same-origin is fine (the docs page's "Try it out"): the Host it names has passed the check.
        return _origin(origin) in self.origins or urlsplit(_origin(origin)).netloc == host.strip().lower()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        host, origin = headers.get("host"), headers.get("origin")
        if not self.host_ok(host):
            self.telemetry.errors.labels("untrusted_host").inc()
            log.warning("refused a request for an untrusted Host header (serve.trusted_hosts)")
            await _refuse(scope, receive, send, 400, "untrusted_host",
                          "this Host is not served here (serve.trusted_hosts)", self.drain_cap)
            return
        if origin is not None and not self.origin_ok(origin, host or ""):
            self.telemetry.errors.labels("cross_origin").inc()
            log.warning("refused a cross-origin request (serve.allowed_origins)")
            await _refuse(scope, receive, send, 403, "cross_origin",
                          "cross-origin requests are refused (serve.allowed_origins)", self.drain_cap)
            return
        await self.app(scope, receive, send)


def is_open(path: str) -> bool:
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)


class ApiKeyAuth:
    """401 + WWW-Authenticate: Bearer without a valid `Authorization: Bearer <key>` (when keys are set)."""

    def __init__(self, app: ASGIApp, keys: ApiKeys, telemetry: Telemetry, drain_cap: int) -> None:
        self.app, self.keys, self.telemetry, self.drain_cap = app, keys, telemetry, drain_cap

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keys or is_open(scope["path"]):
            await self.app(scope, receive, send)
            return
        scheme, _, token = Headers(scope=scope).get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and self.keys.accepts(token.strip()):
            await self.app(scope, receive, send)
            return
        given = bool(token.strip())
        self.telemetry.errors.labels("unauthorized").inc()
        log.warning("refused %s %s: %s", scope["method"], scope["path"],
                    "invalid API key" if given else "no API key")  # never the key itself
        challenge = 'Bearer error="invalid_token"' if given else "Bearer"
        await _refuse(scope, receive, send, 401, "unauthorized", "a valid API key is required: "
                      "Authorization: Bearer <key>", self.drain_cap, {"WWW-Authenticate": challenge})
