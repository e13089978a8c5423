"""Operations of `voxport serve` (issue 12): Retry-After, quarantine of damaged voices, process metrics,
one log line per request, graceful shutdown, and the Dockerfiles (checked statically: no Docker here).

Servers are test_serve's LiveServer (uvicorn on 127.0.0.1); the shutdown test runs `voxport serve` as a
subprocess on loopback and signals only that process.
"""

import asyncio
import logging
import re
import shlex
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from test_serve import TIMEOUT, LiveServer, _add, _free_port, _settings, cloner, speech  # noqa: F401 (fixtures)

from voxport.errors import ShuttingDown, VoiceQuarantined
from voxport.runtime.serve.access import ApiKeys
from voxport.runtime.serve.app import begin_shutdown, create_app
from voxport.runtime.serve.library import VoiceLibrary
from voxport.runtime.serve.service import Service

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------- Retry-After


def test_retry_after_is_admitted_work_times_median_service_time_over_workers(bundle: Path, cloner,  # noqa: F811
                                                                             tmp_path: Path) -> None:
    service = Service(_settings(bundle, tmp_path, workers=2, queue_size=4), cloner=cloner)
    try:
        engine = service.engine
        assert engine.retry_after() == 1  # nothing measured, nothing admitted
        engine._service_times.extend([1.0, 2.0, 100.0])  # median 2 s: one slow outlier does not count
        engine._inflight = 6  # 2 running + 4 queued
        assert engine.retry_after() == 6  # 6 x 2 s / 2 workers
        engine._inflight = 0
    finally:
        service.close()


def test_service_time_excludes_the_queue_wait(bundle: Path, cloner, tmp_path: Path) -> None:  # noqa: F811
    service = Service(_settings(bundle, tmp_path, workers=1, queue_size=4), cloner=cloner)

    async def three() -> None:  # one worker: the second and third wait 0.3 and 0.6 s in the queue
        await asyncio.gather(*(service.engine.run(lambda stop: time.sleep(0.3)) for _ in range(3)))

    try:
        asyncio.run(three())
        times = list(service.engine._service_times)
        assert len(times) == 3 and all(0.25 < t < 0.5 for t in times), times
    finally:
        service.close()


# ---------------------------------------------------------------------------------- quarantine


def test_a_damaged_voice_is_quarantined_at_startup_and_answered_410(bundle: Path, cloner,  # noqa: F811
                                                                    speech: dict[str, bytes],  # noqa: F811
                                                                    tmp_path: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    voices = tmp_path / "voices"
    with LiveServer(_settings(bundle, voices), cloner) as live:
        good, bad = _add(live, speech["a16"])["id"], _add(live, speech["b16"])["id"]
    stored = voices / "voices" / bad / "embedding.npy"
    data = bytearray(stored.read_bytes())
    data[-4:] = b"\x00\x00\xc0\x7f"  # one float flipped: same size, another sha256
    stored.write_bytes(bytes(data))
    with caplog.at_level(logging.ERROR), LiveServer(_settings(bundle, voices), cloner) as live:  # a restart
        assert f"quarantined voice {bad}" in caplog.text
        health = live.client.get("/health").json()
        assert [q["id"] for q in health["quarantined"]] == [bad] and "sha256" in health["quarantined"][0]["reason"]
        assert health["library"]["voices"] == 1
        for r in (live.client.get(f"/api/v1/voices/{bad}"),
                  live.client.post("/api/v1/clone-voice", data={"text": "hi", "voice_id": bad,
                                                                "max_decoder_steps": "2"})):
            assert r.status_code == 410 and r.json()["kind"] == "voice_quarantined", r.text
        assert live.client.post("/api/v1/clone-voice", data={"text": "hi", "voice_id": good,
                                                              "max_decoder_steps": "2"}).status_code == 200
        assert [v["id"] for v in live.client.get("/api/v1/voices").json()["voices"]] == [good]
    evidence = voices / "quarantine" / bad
    assert (evidence / "embedding.npy").read_bytes() == bytes(data) and (evidence / "reason.json").is_file()


def test_missing_and_undecodable_files_are_quarantined_too(tmp_path: Path) -> None:
    from voxport.runtime.serve.uploads import encode_wav

    library = VoiceLibrary(tmp_path, max_voices=10, max_bytes=10_000_000)
    wav = encode_wav(np.zeros(1600, np.float32), 16000)
    ids = [library.add(wav, np.full(8, i + 1, np.float32), duration_s=0.1, sample_rate=16000,
                       encoder_sha256="e")[0].id for i in range(3)]
    library.close()
    (tmp_path / "voices" / ids[0] / "reference.wav").unlink()
    ref = tmp_path / "voices" / ids[1] / "reference.wav"
    ref.write_bytes(b"X" * ref.stat().st_size)  # same size, not audio
    library = VoiceLibrary(tmp_path, max_voices=10, max_bytes=10_000_000)
    try:
        reasons = {q["id"]: q["reason"] for q in library.quarantined()}
        assert "missing reference.wav" in reasons[ids[0]] and "does not decode" in reasons[ids[1]]
        assert [v.id for v in library.list()] == [ids[2]]
        with pytest.raises(VoiceQuarantined):
            library.embedding(ids[0])
    finally:
        library.close()


# ---------------------------------------------------------------------------------- metrics, logs


def test_metrics_include_process_rss_cpu_and_fds(bundle: Path, cloner, tmp_path: Path) -> None:  # noqa: F811
    service = Service(_settings(bundle, tmp_path), cloner=cloner)
    with TestClient(create_app(service.settings, service, keys=ApiKeys()), base_url="http://127.0.0.1") as client:
        text = client.get("/metrics").text
    for name in ("process_resident_memory_bytes", "process_cpu_seconds_total", "process_open_fds"):
        assert re.search(rf"^{name} [0-9.e+]+$", text, re.M), name


def test_one_info_line_per_request_fragments_at_debug(server_voice, caplog: pytest.LogCaptureFixture) -> None:
    live, voice = server_voice
    text = "One. Two. Three. Four. Five. Six."  # six fragments, none reaching the stop token
    with caplog.at_level(logging.INFO):
        r = live.client.post("/api/v1/clone-voice", data={"text": text, "voice_id": voice, "max_decoder_steps": "2"},
                             headers={"X-Request-ID": "ops-1"})
    assert r.status_code == 200
    lines = [rec.getMessage() for rec in caplog.records if rec.levelno >= logging.INFO and "ops-1" in rec.getMessage()]
    assert len(lines) == 1 and re.fullmatch(r"\[request ops-1\] POST /api/v1/clone-voice 200 \d+\.\d{3}s",
                                            lines[0]), lines


@pytest.fixture(scope="module")
def server_voice(bundle: Path, cloner, speech, tmp_path_factory):  # noqa: F811
    with LiveServer(_settings(bundle, tmp_path_factory.mktemp("voices")), cloner) as live:
        yield live, _add(live, speech["a16"])["id"]


# ---------------------------------------------------------------------------------- shutdown


def test_shutdown_stops_admitting_and_ready_says_so(bundle: Path, cloner, tmp_path: Path) -> None:  # noqa: F811
    service = Service(_settings(bundle, tmp_path), cloner=cloner)
    app = create_app(service.settings, service, keys=ApiKeys())
    with TestClient(app, base_url="http://127.0.0.1") as client:
        assert client.get("/ready").status_code == 200
        begin_shutdown(app)
        r = client.get("/ready")
        assert r.status_code == 503 and "shutting down" in r.json()["detail"]
        body = {"text": "hi", "embedding": [0.1] * service.embedding_dim}
        r = client.post("/api/v1/synthesize-with-embedding", json=body)
        assert r.status_code == 503 and r.json()["kind"] == "shutting_down" and int(r.headers["retry-after"]) >= 1
        with pytest.raises(ShuttingDown):
            asyncio.run(service.engine.run(lambda stop: None))


@pytest.mark.slow
def test_sigterm_lets_the_request_in_flight_finish(bundle: Path, cloner, speech: dict[str, bytes],  # noqa: F811
                                                   tmp_path: Path) -> None:
    voices = tmp_path / "voices"
    with LiveServer(_settings(bundle, voices), cloner) as live:
        voice = _add(live, speech["a16"])["id"]
    port = _free_port()
    cmd = [sys.executable, "-m", "voxport.cli", "serve", f"serve.bundle_dir={bundle}", f"serve.voices_dir={voices}",
           f"serve.port={port}", "serve.workers=1", "serve.request_timeout_s=60",
           f"hydra.run.dir={tmp_path / 'hydra'}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "voxport serve did not start in 120 s"
            try:
                if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        text = " ".join(["Hello there."] * 12)  # a few seconds of work on one worker

        def slow() -> httpx.Response:
            return httpx.post(f"{url}/api/v1/clone-voice", timeout=TIMEOUT,
                              data={"text": text, "voice_id": voice, "max_decoder_steps": "40"})

        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(slow)
            time.sleep(1.0)  # admitted and running
            proc.send_signal(signal.SIGTERM)
            r = pending.result(timeout=90)
        assert r.status_code == 200 and r.content[:4] == b"RIFF"
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once shut down
        output = proc.stdout.read().decode()
        assert "shutting down: admitting no new work" in output, output[-3000:]
        assert re.search(r"POST /api/v1/clone-voice 200 \d+\.\d+s", output), output[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


# ---------------------------------------------------------------------------------- Dockerfiles


def _instructions(path: Path) -> list[tuple[str, str]]:
    """A Dockerfile as (INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


KNOWN = {"FROM", "RUN", "COPY", "ADD", "ENV", "WORKDIR", "USER", "EXPOSE", "HEALTHCHECK", "CMD", "ENTRYPOINT",
         "VOLUME", "STOPSIGNAL", "ARG", "LABEL"}


def _readme_install() -> list[str]:
    """The commands of the README's install line (the first code line of "Start here")."""
    readme = (ROOT / "README.md").read_text()
    line = re.search(r"```bash\n(apt-get update && apt-get install[^\n]*)\n", readme).group(1)
    return [c.strip() for c in line.split("&&")]


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.gpu"])
def test_dockerfiles_parse_and_run_as_non_root_with_a_healthcheck(name: str) -> None:
    steps = _instructions(ROOT / name)
    words = [w for w, _ in steps]
    assert set(words) <= KNOWN, set(words) - KNOWN
    assert words[0] == "FROM" and "EXPOSE" in words and "HEALTHCHECK" in words
    user = [a for w, a in steps if w == "USER"]
    assert user and user[-1] not in ("root", "0") and words.index("USER") < words.index("ENTRYPOINT")
    health = dict(steps)["HEALTHCHECK"]
    assert "/ready" in health and "8000" in health and dict(steps)["EXPOSE"] == "8000"
    for _, args in steps:  # exec forms are JSON
        if args.startswith("["):
            assert shlex.split(args)


def test_dockerfile_installs_as_the_readme_says_and_serves_publicly_with_keys() -> None:
    steps = _instructions(ROOT / "Dockerfile")
    runs = " && ".join(a for w, a in steps if w == "RUN")
    commands = [c.strip() for c in runs.split("&&")]
    readme = _readme_install()
    for command in readme:  # every README step, e.g. `.venv/bin/pip install -e .`, in the same order
        assert any(c.startswith(command) for c in commands), command
    order = [next(i for i, c in enumerate(commands) if c.startswith(r)) for r in readme]
    assert order == sorted(order)
    entry = dict(steps)["ENTRYPOINT"]
    assert "serve.host=0.0.0.0" in entry and "allow_unauthenticated_public" not in (ROOT / "Dockerfile").read_text()
    gpu = (ROOT / "Dockerfile.gpu").read_text()
    assert "nvidia/cuda" in gpu and ".venv/bin/pip install -e '.[gpu]'" in gpu
    start = (ROOT / "docker" / "gpu-entrypoint.sh").read_text()
    assert "voxport build target=tensorrt" in start and "voxport build" not in dict(_instructions(
        ROOT / "Dockerfile.gpu")).get("RUN", "")
    readme_text = (ROOT / "README.md").read_text()
    assert "docker build" in readme_text and "VOXPORT_API_KEYS" in readme_text and "--stop-timeout" in readme_text
