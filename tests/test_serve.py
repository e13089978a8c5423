"""The HTTP service (runtime/serve/): a real uvicorn server on loopback, a real HTTP client.

Servers run in threads over one shared VoiceCloner (the `bundle` fixture: seeded synthesizer,
20 decoder steps by default); the restart test runs `voxport serve` as a subprocess.
"""

import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf
import uvicorn

from voxport.benchmarks.load import run_load
from voxport.errors import LibraryFull
from voxport.evaluate.corpus import Corpus
from voxport.pipeline.records import read_bundle
from voxport.runtime.backends.onnxruntime import SessionSettings
from voxport.runtime.serve.app import create_app
from voxport.runtime.serve.library import VoiceLibrary
from voxport.runtime.serve.service import Service
from voxport.runtime.serve.settings import Limits, ServeSettings
from voxport.runtime.streaming import StreamConfig

TIMEOUT = httpx.Timeout(60.0, connect=5.0)
ID_RE = re.compile(r"[0-9a-f]{32}")


class LiveServer:
    """uvicorn on 127.0.0.1 with an OS-chosen port, in a thread."""

    def __init__(self, settings: ServeSettings, cloner) -> None:
        self.service = Service(settings, cloner=cloner)
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        config = uvicorn.Config(create_app(settings, self.service), log_level="warning")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True)

    def __enter__(self) -> "LiveServer":
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            assert time.monotonic() < deadline and self._thread.is_alive(), "server did not start"
            time.sleep(0.05)
        self.client = httpx.Client(base_url=self.url, timeout=TIMEOUT)
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.close()
        self._server.should_exit = True
        self._thread.join(timeout=30)
        self._sock.close()


def _settings(bundle: Path, voices: Path, **overrides) -> ServeSettings:
    limits = Limits(max_upload_bytes=400_000, max_clip_seconds=8.0, max_text_chars=200, max_batch_texts=4,
                    max_decoder_steps=40, max_voices=50, max_library_bytes=50_000_000)
    base = dict(bundle_dir=bundle, voices_dir=voices, workers=2, queue_size=8, request_timeout_s=60.0,
                limits=limits, stream=StreamConfig(chunk_frames=8, postnet_lookahead=16, vocoder_context=12))
    return ServeSettings(**{**base, **overrides})


def _wav(x: np.ndarray, sr: int, subtype: str = "PCM_16") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, sr, subtype=subtype, format="WAV")
    return buf.getvalue()


def _read_wav(data: bytes) -> tuple[np.ndarray, int]:
    return sf.read(io.BytesIO(data), dtype="float32")


@pytest.fixture(scope="module")
def cloner(bundle: Path):
    from voxport.runtime.cloner import VoiceCloner

    c = VoiceCloner(bundle, threads=1)
    yield c
    c.close()


@pytest.fixture(scope="module")
def speech(corpus: Corpus) -> dict[str, bytes]:
    """Real speech: two speakers at 16 kHz, one also at 22.05 kHz, plus bad inputs made from it."""
    items = [i for i in corpus.items() if 3.0 <= i.duration_s <= 7.0]
    a = items[0]
    b = next(i for i in items if i.speaker != a.speaker)
    wav_a = corpus.audio(a, 16000)
    return {
        "a16": _wav(wav_a, 16000), "a22": _wav(corpus.audio(a, 22050), 22050),
        "b16": _wav(corpus.audio(b, 16000), 16000),
        "short": _wav(wav_a[:8000], 16000),  # 0.5 s: too little voiced speech
        "silent": _wav(np.zeros(48000, np.float32), 16000),
        "long": _wav(np.tile(wav_a, 3)[: 16000 * 9], 16000),  # 9 s > max_clip_seconds (8)
        "huge": _wav(np.tile(wav_a, 5)[: 16000 * 14], 16000),  # 448 kB > max_upload_bytes
        "nan": _wav(np.where(np.arange(32000) % 100 == 0, np.nan, 0.1).astype(np.float32), 16000, "FLOAT"),
    }


@pytest.fixture(scope="module")
def server(bundle: Path, cloner, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with LiveServer(_settings(bundle, tmp_path_factory.mktemp("voices")), cloner) as live:
        yield live


def _add(live: LiveServer, data: bytes, **form) -> dict:
    r = live.client.post("/api/v1/voices", files={"reference": ("ref.wav", data, "audio/wav")}, data=form)
    assert r.status_code == 201, r.text
    return r.json()


def _clone(live: LiveServer, text: str = "Hello world", reference: bytes | None = None, **form) -> httpx.Response:
    files = {"reference": ("ref.wav", reference, "audio/wav")} if reference is not None else None
    return live.client.post("/api/v1/clone-voice", data={"text": text, **form}, files=files)


def _library(live: LiveServer) -> tuple[list, list]:
    listing = live.client.get("/api/v1/voices").json()["voices"]
    files = sorted(str(p.relative_to(live.service.library.root)) for p in live.service.library.root.rglob("*")
                   if p.is_file() and p.suffix != ".sqlite3-journal")
    return listing, files


def test_health_names_what_serves_each_graph(server: LiveServer, bundle: Path) -> None:
    r = server.client.get("/health")
    assert r.status_code == 200
    health = r.json()
    assert health["weights"] == {"speaker_encoder": "real", "synthesizer": "seeded", "vocoder": "real"}
    assert "synthesizer=seeded" in r.headers["x-voxport-weights"]
    assert any("not speech" in w for w in health["warnings"])
    shas = {r.sha256 for r in read_bundle(bundle)}
    graphs = [(c, g, v) for c, entry in health["components"].items() for g, v in entry["graphs"].items()]
    assert sorted((c, g) for c, g, _ in graphs) == sorted([
        ("speaker_encoder", "speaker_encoder"), ("synthesizer", "encoder"), ("synthesizer", "decoder_step"),
        ("synthesizer", "postnet"), ("vocoder", "vocoder")])
    for component, _, graph in graphs:
        assert graph["backend"] in ("onnxruntime", "torch", "tensorrt") and graph["precision"] == "fp32"
        assert graph["reason"] and graph["providers"] and graph["weights"] == health["weights"][component]
        assert (bundle / graph["file"]).is_file() and len(graph["sha256"]) == 64
        assert graph["sha256"] in shas
        if graph["format"] == "onnx":  # the build's recorded settings, serve.threads (1) pinned over them
            record = next(r for r in read_bundle(bundle) if r.file == graph["file"])
            recorded = SessionSettings.from_dict((record.speed or {}).get("session"))
            assert graph["session"] == recorded.with_overrides(intra_op_threads=1).to_dict()
    spec = server.client.get("/openapi.json").json()
    for path in ("/health", "/api/v1/extract-embedding", "/api/v1/clone-voice", "/api/v1/synthesize-with-embedding",
                 "/api/v1/batch-synthesize", "/api/v1/voices", "/metrics"):
        assert path in spec["paths"]
    assert server.client.get("/docs").status_code == 200


def test_voice_library_crud(server: LiveServer, speech: dict[str, bytes]) -> None:
    voice = _add(server, speech["a16"], name="allison", ref_text="the reference words")
    assert ID_RE.fullmatch(voice["id"]) and voice["ref_text"] == "the reference words" and voice["evicted"] == []
    assert voice["id"] in [v["id"] for v in server.client.get("/api/v1/voices").json()["voices"]]
    detail = server.client.get(f"/api/v1/voices/{voice['id']}").json()
    assert len(detail["embedding"]) == 256 and abs(np.linalg.norm(detail["embedding"]) - 1) < 1e-5
    ref, sr = _read_wav(server.client.get(f"/api/v1/voices/{voice['id']}/reference.wav").content)
    assert sr == 16000 and ref.ndim == 1 and abs(len(ref) / sr - voice["duration_s"]) < 1e-3
    assert server.client.delete(f"/api/v1/voices/{voice['id']}").status_code == 200
    assert server.client.get(f"/api/v1/voices/{voice['id']}").status_code == 404
    assert server.client.delete(f"/api/v1/voices/{voice['id']}").status_code == 404


def test_extract_embedding_resamples_and_matches_the_library(server: LiveServer, speech: dict[str, bytes]) -> None:
    def extract(**kwargs) -> dict:
        files = {"reference": ("r.wav", kwargs.pop("data"), "audio/wav")} if "data" in kwargs else None
        r = server.client.post("/api/v1/extract-embedding", files=files, data=kwargs)
        assert r.status_code == 200, r.text
        return r.json()

    e16, e22 = extract(data=speech["a16"]), extract(data=speech["a22"])
    assert e16["dim"] == 256 and e16["weights"] == {"speaker_encoder": "real"}
    assert float(np.dot(e16["embedding"], e22["embedding"])) > 0.95  # 22.05 kHz upload resampled
    eb = extract(data=speech["b16"])
    assert float(np.dot(e16["embedding"], eb["embedding"])) < float(np.dot(e16["embedding"], e22["embedding"]))
    voice = _add(server, speech["a16"])
    stored = extract(voice_id=voice["id"])
    assert stored["sha256"] == voice["embedding_sha256"] == e16["sha256"]  # same bytes, same embedding


def test_synthesis_answers_in_the_voice_asked_for(server: LiveServer, speech: dict[str, bytes]) -> None:
    a, b = _add(server, speech["a16"]), _add(server, speech["b16"])
    steps = {"max_decoder_steps": "8"}
    by_id = _clone(server, voice_id=a["id"], **steps)
    assert by_id.status_code == 200 and by_id.headers["content-type"] == "audio/wav"
    assert by_id.headers["x-voxport-embedding-sha256"] == a["embedding_sha256"]
    assert by_id.headers["x-voxport-voice"] == f"voice:{a['id']}"
    assert "synthesizer=seeded" in by_id.headers["x-voxport-weights"]
    wav, sr = _read_wav(by_id.content)
    assert sr == 22050 and len(wav) == 8 * 2 * 256  # 8 decoder steps × r = 2 frames × hop
    by_upload = _clone(server, reference=speech["a16"], **steps)
    assert by_upload.headers["x-voxport-embedding-sha256"] == a["embedding_sha256"]
    assert by_upload.content == by_id.content
    other = _clone(server, voice_id=b["id"], **steps)
    assert other.headers["x-voxport-embedding-sha256"] == b["embedding_sha256"] and other.content != by_id.content
    embedding = server.client.get(f"/api/v1/voices/{a['id']}").json()["embedding"]
    direct = server.client.post("/api/v1/synthesize-with-embedding",
                                json={"text": "Hello world", "embedding": embedding, "max_decoder_steps": 8})
    assert direct.status_code == 200 and direct.content == by_id.content

    batch = server.client.post("/api/v1/batch-synthesize", data={"texts": ["Hello world", "one more", "last"],
                                                                 "voice_id": a["id"], **steps})
    assert batch.status_code == 200, batch.text
    body = batch.json()
    assert body["embedding_sha256"] == a["embedding_sha256"] and body["weights"]["synthesizer"] == "seeded"
    assert [item["text"] for item in body["items"]] == ["Hello world", "one more", "last"]
    import base64

    first, sr = _read_wav(base64.b64decode(body["items"][0]["wav_base64"]))
    assert sr == 22050 and len(first) == len(wav)


@pytest.mark.slow  # 2-3 s: the fast tier keeps its siblings
def test_synthesis_controls_and_their_ranges(server: LiveServer, speech: dict[str, bytes]) -> None:
    voice = _add(server, speech["b16"])["id"]
    plain, _ = _read_wav(_clone(server, voice_id=voice).content)
    assert len(plain) == 20 * 2 * 256  # the bundle's default: 20 decoder steps × r = 2 frames × hop
    fast, _ = _read_wav(_clone(server, voice_id=voice, speaking_rate="2.0").content)
    assert len(fast) == (39 // 2 + 1) * 256  # 40 frames read at 0, 2, 4, ... 38
    higher, _ = _read_wav(_clone(server, voice_id=voice, pitch_semitones="4").content)
    assert len(higher) == len(plain) and not np.allclose(higher, plain, atol=1e-3)
    styled, _ = _read_wav(_clone(server, voice_id=voice, style_idx="-1", max_decoder_steps="8").content)
    plain = plain[: len(styled)]
    assert not np.allclose(styled, plain, atol=1e-3)
    few, _ = _read_wav(_clone(server, voice_id=voice, max_decoder_steps="5", stop_threshold="0.9").content)
    assert len(few) == 5 * 2 * 256
    for field, value in [("style_idx", "10"), ("style_idx", "-2"), ("speaking_rate", "0.2"),
                         ("speaking_rate", "nan"), ("pitch_semitones", "13"), ("stop_threshold", "0"),
                         ("stop_threshold", "1.5"), ("max_decoder_steps", "0"), ("max_decoder_steps", "41"),
                         ("seed", "-1")]:
        r = _clone(server, voice_id=voice, **{field: value})
        assert r.status_code == 422, (field, value, r.text)
        assert field in r.json()["detail"]


@pytest.mark.slow  # 2-3 s: the fast tier keeps its siblings
def test_a_service_warms_up_the_lengths_a_first_stream_starts_with(bundle: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Before the first request the vocoder has run each length a stream's first chunks and a whole
    utterance's chunks have (engines prepare per-shape work on a first call); `warm_up=false` runs none."""
    import itertools

    from voxport.runtime.cloner import VoiceCloner
    from voxport.runtime.serve.engine import Controls

    lengths: list[int] = []
    real = VoiceCloner.vocode_batch

    def counted(self, mels):
        lengths.extend(int(m.shape[1]) for m in mels)
        return real(self, mels)

    monkeypatch.setattr(VoiceCloner, "vocode_batch", counted)
    service = Service(_settings(bundle, tmp_path / "voices"))  # it owns its cloner: it warms it up
    try:
        warmed = set(lengths)
        cfg = service.settings
        whole = {cfg.vocoder_chunk_frames + cfg.stream.vocoder_context,  # a whole utterance's first chunk
                 cfg.vocoder_chunk_frames + 2 * cfg.stream.vocoder_context}  # and its middle ones
        assert whole <= warmed
        lengths.clear()
        voice = np.full(service.embedding_dim, service.embedding_dim ** -0.5, np.float32)
        chunks = service.engine.stream("Hello world, and hello again.", voice,
                                       Controls(max_decoder_steps=60, stop_threshold=1.0), lambda: False)
        assert len(list(itertools.islice(chunks, 2))) == 2
        chunks.close()
        assert len(lengths) == 2 and set(lengths) <= warmed, (lengths, warmed)
    finally:
        service.close()
    lengths.clear()
    Service(_settings(bundle, tmp_path / "voices2", warm_up=False)).close()
    assert lengths == []


def test_streaming_sends_chunks_that_make_up_the_audio(server: LiveServer, speech: dict[str, bytes]) -> None:
    voice = _add(server, speech["a16"])
    one_shot, _ = _read_wav(_clone(server, voice_id=voice["id"]).content)
    pieces = []
    with server.client.stream("POST", "/api/v1/clone-voice",
                              data={"text": "Hello world", "voice_id": voice["id"], "stream": "true"}) as r:
        assert r.status_code == 200 and r.headers["x-voxport-embedding-sha256"] == voice["embedding_sha256"]
        assert r.headers.get("transfer-encoding") == "chunked"
        pieces = [p for p in r.iter_raw() if p]
    assert len(pieces) >= 3  # 40 frames in chunks of 8: the audio arrives in parts
    body = b"".join(pieces)
    assert body[:4] == b"RIFF" and body[8:12] == b"WAVE" and body[36:40] == b"data"
    streamed = np.frombuffer(body[44:], "<i2").astype(np.float32) / 32767
    assert len(streamed) == len(one_shot)
    snr = 10 * np.log10(np.sum(one_shot**2) / max(np.sum((one_shot - streamed) ** 2), 1e-12))
    assert snr > 30.0
    embedding = server.client.get(f"/api/v1/voices/{voice['id']}").json()["embedding"]
    with server.client.stream("POST", "/api/v1/synthesize-with-embedding",
                              json={"text": "Hello world", "embedding": embedding, "stream": True,
                                    "max_decoder_steps": 6}) as r:
        assert r.status_code == 200 and len(b"".join(r.iter_raw())) == 44 + 6 * 2 * 256 * 2


def _chunked_multipart(data: bytes) -> Iterator[bytes]:
    """A multipart upload sent with chunked transfer encoding (no Content-Length to check)."""
    yield b'--xyzzy\r\nContent-Disposition: form-data; name="reference"; filename="r.wav"\r\n\r\n'
    for i in range(0, len(data), 65536):
        yield data[i:i + 65536]
    yield b"\r\n--xyzzy--\r\n"


def test_bad_inputs_get_4xx_and_leave_the_library_alone(server: LiveServer, speech: dict[str, bytes]) -> None:
    voice = _add(server, speech["a16"])["id"]
    before = _library(server)
    emb = server.client.get(f"/api/v1/voices/{voice}").json()["embedding"]
    c = server.client

    def upload(name: str, data: bytes, path: str = "/api/v1/voices", **form) -> httpx.Response:
        return c.post(path, files={"reference": (name, data, "application/octet-stream")}, data=form)

    cases = [
        (upload("empty.wav", b""), 422, "empty"),
        (upload("silent.wav", speech["silent"]), 422, "silent"),
        (upload("short.wav", speech["short"]), 422, "voiced speech"),
        (upload("long.wav", speech["long"]), 422, "long"),
        (upload("noise.bin", os.urandom(5000)), 415, "decode"),
        (upload("notes.txt", b"this is not audio at all\n" * 20), 415, "decode"),
        (upload("nan.wav", speech["nan"]), 422, "NaN"),
        (upload("huge.wav", speech["huge"]), 413, "large"),
        (upload("big.bin", b"\0" * 700_000), 413, "larger"),  # over the body limit: refused unread
        (upload("huge.wav", speech["huge"], path="/api/v1/clone-voice", text="hi"), 413, "large"),
        (upload("short.wav", speech["short"], path="/api/v1/clone-voice", text="hi"), 422, "voiced speech"),
        (upload("short.wav", speech["short"], path="/api/v1/extract-embedding"), 422, "voiced speech"),
        (upload("a.wav", speech["a16"], path="/api/v1/clone-voice", text="hi", voice_id=voice), 422, "not both"),
        (_clone(server), 422, "no default voice"),
        (_clone(server, text="", voice_id=voice), 422, "text"),
        (_clone(server, text="   ", voice_id=voice), 422, "empty"),
        (_clone(server, text="x" * 201, voice_id=voice), 422, "at most 200"),
        (_clone(server, text="!!! ???", voice_id=voice), 422, "speakable"),
        (_clone(server, voice_id="0" * 32), 404, "no voice"),
        (_clone(server, voice_id="../../etc/passwd"), 422, "invalid voice id"),
        (_clone(server, voice_id=voice.upper()), 422, "invalid voice id"),
        (c.get("/api/v1/voices/..%2F..%2Fetc%2Fpasswd"), 422, "invalid voice id"),
        (c.delete("/api/v1/voices/..%2F" + voice), 422, "invalid voice id"),
        (c.get("/api/v1/voices/" + "f" * 32), 404, "no voice"),
        (c.post("/api/v1/extract-embedding", data={"voice_id": "a" * 32}), 404, "no voice"),
        (c.post("/api/v1/synthesize-with-embedding", json={"text": "hi", "embedding": emb[:255]}), 422, "256"),
        (c.post("/api/v1/synthesize-with-embedding", json={"text": "hi", "embedding": [0.0] * 256}), 422, "zeros"),
        (c.post("/api/v1/synthesize-with-embedding", content=json.dumps({"text": "hi", "embedding": [float("nan")]
                + emb[1:]}), headers={"content-type": "application/json"}), 422, "finite"),
        (c.post("/api/v1/synthesize-with-embedding", content=json.dumps({"text": "hi", "embedding": [float("inf")]
                + emb[1:]}), headers={"content-type": "application/json"}), 422, "finite"),
        (c.post("/api/v1/synthesize-with-embedding", json={"text": "hi", "embedding": emb, "styleidx": 3}), 422,
         "extra"),
        (c.post("/api/v1/batch-synthesize", data={"texts": ["a"] * 5, "voice_id": voice}), 422, "at most 4"),
        (c.post("/api/v1/voices", content=_chunked_multipart(speech["a16"] * 4),
                headers={"content-type": "multipart/form-data; boundary=xyzzy"}), 413, "larger"),
    ]
    for i, (r, status, words) in enumerate(cases):
        assert r.status_code == status, (i, r.status_code, r.text)
        assert words.lower() in r.json()["detail"].lower(), (i, r.json())
    assert _library(server) == before  # nothing added, evicted or touched by the failures
    assert c.get("/health").json()["status"] == "ok"
    assert _clone(server, voice_id=voice).status_code == 200  # and the server still serves


def test_full_queue_gets_503_with_retry_after(bundle: Path, cloner, speech: dict[str, bytes], tmp_path: Path) -> None:
    with LiveServer(_settings(bundle, tmp_path / "voices", workers=1, queue_size=0), cloner) as live:
        voice = _add(live, speech["b16"])["id"]

        def request(_: int) -> httpx.Response:  # two fragments × 12 steps: long enough to overlap
            return _clone(live, text="One, two.", voice_id=voice, max_decoder_steps="12")

        with ThreadPoolExecutor(4) as pool:
            responses = list(pool.map(request, range(4)))
        statuses = sorted(r.status_code for r in responses)
        assert 200 in statuses and 503 in statuses and set(statuses) <= {200, 503}, statuses
        for r in responses:
            if r.status_code == 503:
                assert int(r.headers["retry-after"]) >= 1 and "capacity" in r.json()["detail"]
        assert _clone(live, voice_id=voice, max_decoder_steps="2").status_code == 200  # free again: served
        # benchmarks/load.py at capacity (one client for one slot): no 5xx.
        below = run_load(live.url, clients=1, requests=3, duration_s=60, voice_id=voice, max_decoder_steps=3)
        assert below.status == {"200": 3} and below.errors == {} and below.latency_s["p95"] > 0
        metrics = live.client.get("/metrics").text
        assert re.search(r"voxport_rejected_total [1-9]", metrics)


def test_request_timeout_gets_504_and_the_server_recovers(bundle: Path, cloner, speech: dict[str, bytes],
                                                          tmp_path: Path) -> None:
    with LiveServer(_settings(bundle, tmp_path / "voices", request_timeout_s=0.05), cloner) as live:
        r = _clone(live, reference=speech["a16"])
        assert r.status_code == 504 and "longer than" in r.json()["detail"]
        deadline = time.monotonic() + 30
        while live.service.engine.inflight and time.monotonic() < deadline:  # the worker stops soon after
            time.sleep(0.05)
        assert live.service.engine.inflight == 0


def test_metrics_cover_latency_stages_rtf_queue_and_errors(server: LiveServer, speech: dict[str, bytes]) -> None:
    voice = _add(server, speech["b16"])["id"]
    assert _clone(server, voice_id=voice).status_code == 200
    assert _clone(server, voice_id=voice, style_idx="99").status_code == 422
    text = server.client.get("/metrics").text
    for pattern in (r'voxport_request_seconds_count\{endpoint="/api/v1/clone-voice",status="200"\} [1-9]',
                    r'voxport_stage_seconds_count\{stage="synthesize"\} [1-9]',
                    r'voxport_stage_seconds_count\{stage="vocode"\} [1-9]',
                    r'voxport_rtf_count\{endpoint="clone-voice"\} [1-9]', r"voxport_queue_depth 0",
                    r'voxport_errors_total\{kind="validation"\} [1-9]', r"voxport_vocoder_batch_size_count [1-9]"):
        assert re.search(pattern, text), pattern


def test_library_evicts_least_recently_used_and_reconciles(tmp_path: Path) -> None:
    emb, ref = np.ones(256, np.float32) / 16, _wav(np.zeros(28, np.float32), 16000)  # a real 100-byte WAV
    lib = VoiceLibrary(tmp_path, max_voices=2, max_bytes=10_000)
    v1, _ = lib.add(ref, emb, duration_s=1, sample_rate=16000, encoder_sha256="x")
    v2, _ = lib.add(ref, emb * 2, duration_s=1, sample_rate=16000, encoder_sha256="x")
    time.sleep(0.01)
    lib.touch(v1.id)  # v2 is now the least recently used
    v3, evicted = lib.add(ref, emb, duration_s=1, sample_rate=16000, encoder_sha256="x")
    assert evicted == [v2.id] and {v.id for v in lib.list()} == {v1.id, v3.id}
    assert not (tmp_path / "voices" / v2.id).exists()
    with pytest.raises(LibraryFull):
        lib.add(b"d" * 20_000, emb, duration_s=1, sample_rate=16000, encoder_sha256="x")
    assert {v.id for v in lib.list()} == {v1.id, v3.id}  # a refused voice evicts nothing
    (tmp_path / "voices" / ("e" * 32)).mkdir()  # as if a crash hit between rename and commit
    lib.close()
    reopened = VoiceLibrary(tmp_path, max_voices=2, max_bytes=10_000)
    assert {v.id for v in reopened.list()} == {v1.id, v3.id} and not (tmp_path / "voices" / ("e" * 32)).exists()
    np.testing.assert_array_equal(reopened.embedding(v1.id), emb)
    assert sorted(p.name for p in (tmp_path / "tmp").iterdir()) == []
    reopened.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_restart_keeps_every_voice(bundle: Path, cloner, speech: dict[str, bytes], tmp_path: Path) -> None:
    voices = tmp_path / "voices"
    with LiveServer(_settings(bundle, voices), cloner) as live:
        stored = [_add(live, speech["a16"], name="a", ref_text="hello"), _add(live, speech["b16"], name="b")]
        listing = live.client.get("/api/v1/voices").json()["voices"]
        embeddings = {v["id"]: live.client.get(f"/api/v1/voices/{v['id']}").json()["embedding"] for v in stored}
    # A new process: `voxport serve` itself, on loopback, over the same voice library.
    port = _free_port()
    cmd = [sys.executable, "-m", "voxport.cli", "serve", f"serve.bundle_dir={bundle}", f"serve.voices_dir={voices}",
           f"serve.port={port}", "serve.workers=1", f"hydra.run.dir={tmp_path / 'hydra'}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "voxport serve did not start in 120 s"
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        with httpx.Client(base_url=url, timeout=TIMEOUT) as client:
            assert client.get("/api/v1/voices").json()["voices"] == listing
            for voice_id, embedding in embeddings.items():
                assert client.get(f"/api/v1/voices/{voice_id}").json()["embedding"] == embedding
            r = client.post("/api/v1/clone-voice", data={"text": "hi", "voice_id": stored[0]["id"],
                                                         "max_decoder_steps": "3"})
            assert r.status_code == 200
            assert r.headers["x-voxport-embedding-sha256"] == stored[0]["embedding_sha256"]
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
