"""Access control and operations of `voxport serve` (runtime/serve/access.py): API keys, the bind
decision, Host and Origin checks, request ids, /ready and offline docs.

Servers are test_serve's LiveServer (uvicorn on 127.0.0.1); a Host or Origin header is only a header:
every request goes to loopback. No socket is ever bound to a public address.
"""

import asyncio
import logging
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import compose_config
from fastapi.testclient import TestClient
from test_serve import LiveServer, _add, _settings, cloner, speech  # noqa: F401 (fixtures)

from voxport.errors import ConfigError, UnsafeBind
from voxport.runtime.serve import app as app_module
from voxport.runtime.serve.access import (
    ApiKeys,
    check_exposure,
    install_request_id_logging,
    load_api_keys,
    request_context,
)
from voxport.runtime.serve.app import create_app
from voxport.runtime.serve.service import Service

KEY = "k-0123456789abcdef-good"
OTHER_KEY = "k-0123456789abcdef-also"
WRONG_KEY = "k-0123456789abcdef-wrong"
APP_ORIGIN = "https://app.example"
HEX_ID = re.compile(r"[0-9a-f]{32}")


@pytest.fixture(scope="module")
def open_server(bundle: Path, cloner, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:  # noqa: F811
    """No keys, default hosts and origins: the loopback default."""
    with LiveServer(_settings(bundle, tmp_path_factory.mktemp("voices")), cloner) as live:
        yield live


@pytest.fixture(scope="module")
def guarded(bundle: Path, cloner, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:  # noqa: F811
    """Keys from a key file, one browser origin allowed."""
    keys = tmp_path_factory.mktemp("keys") / "api_keys"
    keys.write_text(f"# service keys\n{KEY}\n\n{OTHER_KEY}\n")
    settings = _settings(bundle, tmp_path_factory.mktemp("voices"), api_keys_file=str(keys),
                         allowed_origins=[APP_ORIGIN])
    with LiveServer(settings, cloner) as live:
        yield live


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# ----------------------------------------------------------------------------- the bind decision


def test_public_bind_without_keys_is_refused_in_one_line_naming_the_flag(tmp_path: Path) -> None:
    public = _settings(tmp_path, tmp_path, host="0.0.0.0")
    with pytest.raises(UnsafeBind) as refused:
        check_exposure(public, ApiKeys())
    message = str(refused.value)
    assert "serve.allow_unauthenticated_public" in message and "\n" not in message
    check_exposure(public, ApiKeys([KEY]))  # keys: fine
    check_exposure(_settings(tmp_path, tmp_path, host="0.0.0.0", allow_unauthenticated_public=True), ApiKeys())
    for host in ("127.0.0.1", "::1", "localhost"):
        check_exposure(_settings(tmp_path, tmp_path, host=host), ApiKeys())
    with pytest.raises(UnsafeBind):  # a host name is not known to be loopback
        check_exposure(_settings(tmp_path, tmp_path, host="voices.internal"), ApiKeys())


def test_voxport_serve_refuses_before_loading_or_binding(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import uvicorn

    def forbidden(*args, **kwargs):
        raise AssertionError("must not get this far")

    monkeypatch.delenv("VOXPORT_API_KEYS", raising=False)
    monkeypatch.setattr(app_module, "create_app", forbidden)
    monkeypatch.setattr(uvicorn, "run", forbidden)
    cfg = compose_config("serve.host=0.0.0.0", f"serve.bundle_dir={tmp_path}", f"serve.voices_dir={tmp_path}")
    with pytest.raises(UnsafeBind, match="serve.allow_unauthenticated_public"):
        app_module.serve(cfg)


# ---------------------------------------------------------------------------------- API keys


def test_keys_come_from_the_environment_and_the_key_file(tmp_path: Path) -> None:
    settings = _settings(tmp_path, tmp_path)
    keys = load_api_keys(settings, {"VOXPORT_API_KEYS": f" {KEY} ,, {OTHER_KEY}"})
    assert len(keys) == 2 and keys.accepts(KEY) and keys.accepts(OTHER_KEY) and not keys.accepts(WRONG_KEY)
    assert KEY not in repr(keys) and not keys.accepts("") and not load_api_keys(settings, {})
    path = tmp_path / "keys"
    path.write_text(f"# comment\n{OTHER_KEY}\n")
    both = load_api_keys(_settings(tmp_path, tmp_path, api_keys_file=str(path)), {"VOXPORT_API_KEYS": KEY})
    assert len(both) == 2 and both.accepts(KEY) and both.accepts(OTHER_KEY)


def test_bad_keys_and_key_files_are_named_without_the_key(tmp_path: Path) -> None:
    short = "tooshort"
    with pytest.raises(ConfigError, match="VOXPORT_API_KEYS is shorter") as bad:
        load_api_keys(_settings(tmp_path, tmp_path), {"VOXPORT_API_KEYS": short})
    assert short not in str(bad.value)
    path = tmp_path / "keys"
    path.write_text(f"{KEY}\nsecret words with blanks\n")
    with pytest.raises(ConfigError, match="line 2") as bad:
        load_api_keys(_settings(tmp_path, tmp_path, api_keys_file=str(path)), {})
    assert "secret" not in str(bad.value)
    path.write_text("# no keys yet\n\n")
    with pytest.raises(ConfigError, match="holds no keys"):
        load_api_keys(_settings(tmp_path, tmp_path, api_keys_file=str(path)), {})
    with pytest.raises(ConfigError, match="cannot read"):
        load_api_keys(_settings(tmp_path, tmp_path, api_keys_file=str(tmp_path / "missing")), {})


def test_keys_guard_everything_but_probes_and_docs(guarded: LiveServer, caplog: pytest.LogCaptureFixture) -> None:
    client = guarded.client
    for path in ("/health", "/ready", "/docs", "/redoc", "/openapi.json", "/docs/static/swagger-ui.css"):
        assert client.get(path).status_code == 200, path
    for path in ("/api/v1/voices", "/metrics"):
        r = client.get(path)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", path
        assert r.json()["kind"] == "unauthorized"
    with caplog.at_level(logging.INFO):
        wrong = client.get("/api/v1/voices", headers={**_bearer(WRONG_KEY), "X-Request-ID": "wrong-key-1"})
        basic = client.get("/api/v1/voices", headers={"Authorization": f"Basic {KEY}"})
        assert client.get("/api/v1/voices", headers=_bearer(KEY)).status_code == 200
        assert client.get("/api/v1/voices", headers=_bearer(OTHER_KEY)).status_code == 200
    assert wrong.status_code == 401 and wrong.headers["www-authenticate"].startswith("Bearer")
    assert basic.status_code == 401
    assert KEY not in caplog.text and WRONG_KEY not in caplog.text  # never logged, not even on failure
    assert any("[request wrong-key-1]" in r.getMessage() and "invalid API key" in r.getMessage()
               for r in caplog.records)
    # A refused upload is refused before any work, and the library stays empty.
    r = client.post("/api/v1/voices", files={"reference": ("ref.wav", b"RIFF" + bytes(5000), "audio/wav")})
    assert r.status_code == 401 and guarded.service.library.stats()[0] == 0
    schema = client.get("/openapi.json").json()
    assert schema["components"]["securitySchemes"]["bearer"] == {"type": "http", "scheme": "bearer"}
    assert schema["paths"]["/health"]["get"]["security"] == []


# ----------------------------------------------------------------------------- Host and Origin


def test_dns_rebinding_host_cannot_read_a_stored_voice(open_server: LiveServer, speech: dict[str, bytes]) -> None:  # noqa: F811
    voice = _add(open_server, speech["a16"])
    path = f"/api/v1/voices/{voice['id']}/reference.wav"
    assert open_server.client.get(path).content[:4] == b"RIFF"
    r = open_server.client.get(path, headers={"Host": "rebind.evil.example"})
    assert r.status_code == 400 and r.json()["kind"] == "untrusted_host" and b"RIFF" not in r.content
    port = open_server.url.rsplit(":", 1)[1]
    for host in (f"localhost:{port}", "127.0.0.1", "LOCALHOST"):
        assert open_server.client.get("/health", headers={"Host": host}).status_code == 200, host
    for host in ("rebind.evil.example:80", "127.0.0.1.evil.example", ""):
        assert open_server.client.get("/health", headers={"Host": host}).status_code == 400, host


def test_cross_origin_post_cannot_create_a_voice(open_server: LiveServer, speech: dict[str, bytes]) -> None:  # noqa: F811
    before = open_server.service.library.stats()
    r = open_server.client.post("/api/v1/voices", headers={"Origin": "https://evil.example"},
                                files={"reference": ("ref.wav", speech["a16"], "audio/wav")})
    assert r.status_code == 403 and r.json()["kind"] == "cross_origin"
    assert open_server.service.library.stats() == before
    for origin in ("null", "http://127.0.0.1.evil.example"):
        assert open_server.client.get("/api/v1/voices", headers={"Origin": origin}).status_code == 403
    same = open_server.client.get("/api/v1/voices", headers={"Origin": open_server.url})  # the docs' Try it out
    assert same.status_code == 200
    assert not any(h.startswith("access-control-") for h in same.headers)  # CORS is off by default


def test_allowed_origins_get_cors_and_others_403(guarded: LiveServer) -> None:
    client = guarded.client
    preflight = client.options("/api/v1/voices", headers={
        "Origin": APP_ORIGIN, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization"})
    assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == APP_ORIGIN
    r = client.get("/api/v1/voices", headers={"Origin": APP_ORIGIN, **_bearer(KEY)})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == APP_ORIGIN
    assert "x-request-id" in r.headers["access-control-expose-headers"].lower()
    evil = client.get("/api/v1/voices", headers={"Origin": "https://evil.example", **_bearer(KEY)})
    assert evil.status_code == 403 and "access-control-allow-origin" not in evil.headers


def test_a_wildcard_origin_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="allowed_origins"):
        _settings(tmp_path, tmp_path, allowed_origins=["*"])


# -------------------------------------------------------------------------------- request ids


def test_request_ids_are_echoed_or_made_on_every_response(open_server: LiveServer) -> None:
    client = open_server.client
    assert client.get("/health", headers={"X-Request-ID": "lb-42.a:b_c"}).headers["x-request-id"] == "lb-42.a:b_c"
    for bad in ("x" * 65, "has space", "per%cent", "quote\"d"):
        made = client.get("/health", headers={"X-Request-ID": bad}).headers["x-request-id"]
        assert HEX_ID.fullmatch(made), bad
    answers = [client.get("/health"), client.get("/api/v1/voices/" + "0" * 32),
               client.get("/health", headers={"Host": "evil.example"}),
               client.get("/health", headers={"Origin": "https://evil.example"})]
    assert [r.status_code for r in answers] == [200, 404, 400, 403]
    ids = [r.headers["x-request-id"] for r in answers]
    assert all(HEX_ID.fullmatch(i) for i in ids) and len(set(ids)) == len(ids)


def test_log_lines_of_a_request_carry_its_id_also_from_workers(open_server: LiveServer,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    install_request_id_logging()
    worker_log = logging.getLogger("voxport.test.worker")

    def job(stop) -> str:
        worker_log.warning("inside the worker")
        return "done"

    async def run() -> str:
        return await open_server.service.engine.run(job)

    with caplog.at_level(logging.INFO), request_context("req-7"):
        assert asyncio.run(run()) == "done"
    assert "[request req-7] inside the worker" in caplog.text
    assert app_module._log_config()["formatters"]["access"]["fmt"].endswith("request=%(request_id)s")
    worker_log.warning("outside a request")
    assert caplog.records[-1].getMessage() == "outside a request" and caplog.records[-1].request_id == "-"


# ------------------------------------------------------------------------------ /ready and docs


def test_ready_only_while_started_with_workers_up(bundle: Path, cloner, tmp_path: Path) -> None:  # noqa: F811
    service = Service(_settings(bundle, tmp_path), cloner=cloner)
    app = create_app(service.settings, service, keys=ApiKeys())
    client = TestClient(app, base_url="http://127.0.0.1")
    r = client.get("/ready")  # no lifespan startup yet: starting
    assert r.status_code == 503 and r.json()["kind"] == "not_ready"
    with TestClient(app, base_url="http://127.0.0.1") as started:
        assert started.get("/ready").status_code == 200 and started.get("/health").status_code == 200
        service.engine.close()
        down = started.get("/ready")
        assert down.status_code == 503 and "workers" in down.json()["detail"]
    assert client.get("/ready").status_code == 503  # shut down


def test_docs_load_nothing_from_outside(open_server: LiveServer) -> None:
    for page in ("/docs", "/redoc"):
        html = open_server.client.get(page).text
        urls = re.findall(r"""(?:src|href|url)\s*[=:]\s*['"]([^'"]+)['"]""", html)
        assert urls and not any(u.startswith(("http:", "https:", "//")) for u in urls), (page, urls)
        assert "cdn" not in html and "fonts.googleapis" not in html
        for url in urls:
            r = open_server.client.get(url)
            assert r.status_code == 200 and r.content, url
    assert open_server.client.get("/openapi.json").json()["openapi"].startswith("3.")

