"""The service speaks the seed's API and OpenAI's speech call (runtime/serve/routes.py, formats.py).

The seed's documented requests are replayed as its clients send them (file field `audio`,
synthesize-with-embedding as a urlencoded form with `embedding=[0.123, ...]`), against a real
uvicorn server over the session's small bundle (test_serve.py's LiveServer and fixtures).
"""

import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf
from test_serve import LiveServer, _add, _read_wav, _settings, cloner, speech  # noqa: F401  (fixtures)

from voxport.errors import UnsupportedFormat
from voxport.runtime.serve import formats, uploads

STEPS = 8  # decoder steps of every synthesis here: enough audio to check, little time


@pytest.fixture(scope="module")
def live(bundle: Path, cloner, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:  # noqa: F811
    settings = _settings(bundle, tmp_path_factory.mktemp("voices"), default_max_decoder_steps=STEPS)
    with LiveServer(settings, cloner) as server:
        yield server


@pytest.fixture(scope="module")
def voice(live: LiveServer, speech: dict[str, bytes]) -> dict:  # noqa: F811
    return _add(live, speech["a16"])


def _file(data: bytes, name: str = "ref.wav") -> tuple[str, bytes, str]:
    return (name, data, "audio/wav")


def _check(r: httpx.Response, status: int, *words: str) -> None:
    assert r.status_code == status, (r.status_code, r.text)
    detail = r.json()["detail"]
    for word in words:
        assert word in detail, (word, detail)


# --------------------------------------------------------------------------- the seed's API


def test_seed_requests_as_documented(live: LiveServer, speech: dict[str, bytes], voice: dict) -> None:  # noqa: F811
    c = live.client
    # POST /api/v1/extract-embedding, multipart, `audio: <audio file>` -> JSON with the embedding
    seed = c.post("/api/v1/extract-embedding", files={"audio": _file(speech["a16"])})
    assert seed.status_code == 200, seed.text
    ours = c.post("/api/v1/extract-embedding", files={"reference": _file(speech["a16"])}).json()
    assert seed.json()["dim"] == 256 and seed.json()["sha256"] == ours["sha256"] == voice["embedding_sha256"]
    embedding = seed.json()["embedding"]

    # POST /api/v1/clone-voice, multipart, `audio` + `text` -> WAV in the uploaded voice
    r = c.post("/api/v1/clone-voice", files={"audio": _file(speech["a16"])}, data={"text": "Hello world"})
    assert r.status_code == 200 and r.headers["content-type"] == "audio/wav", r.text
    assert r.headers["x-voxport-embedding-sha256"] == voice["embedding_sha256"]
    cloned, rate = _read_wav(r.content)
    assert rate == live.service.sample_rate and len(cloned) > 0

    # POST /api/v1/synthesize-with-embedding, application/x-www-form-urlencoded, embedding=[0.123, ...]
    form = {"embedding": "[" + ", ".join(repr(v) for v in embedding) + "]", "text": "Hello world"}
    r = c.post("/api/v1/synthesize-with-embedding", data=form)
    assert r.request.headers["content-type"] == "application/x-www-form-urlencoded"
    assert r.status_code == 200 and r.headers["x-voxport-embedding-sha256"] == voice["embedding_sha256"], r.text
    as_json = c.post("/api/v1/synthesize-with-embedding", json={"embedding": embedding, "text": "Hello world"})
    assert as_json.status_code == 200 and as_json.content == r.content == c.post(
        "/api/v1/clone-voice", data={"text": "Hello world", "voice_id": voice["id"]}).content
    # form values are typed like JSON ones (stream, controls) and checked like them
    streamed = c.post("/api/v1/synthesize-with-embedding", data={**form, "stream": "true", "max_decoder_steps": "2"})
    assert streamed.status_code == 200 and len(streamed.content) == 44 + 2 * 2 * 256 * 2
    _check(c.post("/api/v1/synthesize-with-embedding", data={**form, "embedding": "0.1, 0.2"}), 422, "JSON-style")
    _check(c.post("/api/v1/synthesize-with-embedding", data={**form, "embedding": "[0.1, 0.2]"}), 422, "256")
    _check(c.post("/api/v1/synthesize-with-embedding", data={**form, "speaking_rate": "9"}), 422, "speaking_rate")
    _check(c.post("/api/v1/synthesize-with-embedding", content=b"text=a", headers={"content-type": "text/plain"}),
           415, "application/x-www-form-urlencoded")

    # the voice library and batch take `audio` too
    added = c.post("/api/v1/voices", files={"audio": _file(speech["a16"])}, data={"name": "seed"})
    assert added.status_code == 201 and added.json()["embedding_sha256"] == voice["embedding_sha256"]
    assert c.delete(f"/api/v1/voices/{added.json()['id']}").status_code == 200


def test_audio_and_reference_together_is_an_error(live: LiveServer, speech: dict[str, bytes]) -> None:  # noqa: F811
    before = live.client.get("/api/v1/voices").json()["count"]
    both = {"audio": _file(speech["a16"]), "reference": _file(speech["b16"])}
    for path, form in [("/api/v1/extract-embedding", {}), ("/api/v1/clone-voice", {"text": "hi"}),
                       ("/api/v1/batch-synthesize", {"texts": ["hi"]}), ("/api/v1/voices", {})]:
        _check(live.client.post(path, files=both, data=form), 422, "`audio`", "`reference`", "not both")
    _check(live.client.post("/api/v1/voices", data={"name": "x"}), 422, "`audio`")
    assert live.client.get("/api/v1/voices").json()["count"] == before  # nothing stored by the failures


# ---------------------------------------------------------------------------- unknown fields


def test_unknown_form_fields_are_named(live: LiveServer, voice: dict) -> None:
    c, vid = live.client, voice["id"]
    before = c.get("/api/v1/voices").json()["voices"]
    cases = [
        c.post("/api/v1/clone-voice", data={"text": "hi", "voice_id": vid, "speaking_rte": "2.0"}),
        c.post("/api/v1/extract-embedding", data={"voice_id": vid, "speaking_rte": "2.0"}),
        c.post("/api/v1/batch-synthesize", data={"texts": ["hi"], "voice_id": vid, "speaking_rte": "2.0"}),
        c.post("/api/v1/voices", files={"audio": _file(b"RIFF")}, data={"speaking_rte": "2.0"}),
        c.post("/api/v1/synthesize-with-embedding", data={"text": "hi", "embedding": "[1]", "speaking_rte": "2"}),
        c.post("/api/v1/synthesize-with-embedding", json={"text": "hi", "embedding": [1.0], "speaking_rte": 2}),
        c.post("/v1/audio/speech", json={"input": "hi", "voice": vid, "speaking_rte": 2}),
    ]
    for r in cases:
        assert r.status_code == 422, (r.request.url, r.text)
        assert "speaking_rte" in r.json()["detail"] and r.json()["kind"] == "validation", r.json()
    assert c.get("/api/v1/voices").json()["voices"] == before  # not touched, nothing added


# ------------------------------------------------------------------------ decode limits


def _encoded(frames: int, rate: int, channels: int, fmt: str) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, np.zeros((frames, channels), np.float32), rate, format=fmt, subtype="PCM_16")
    return buffer.getvalue()


def test_header_limits_refuse_before_decoding(live: LiveServer, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded an upload its header should have refused")

    monkeypatch.setattr(uploads, "load_wav", no_decoding)
    limits = live.service.settings.limits
    many_channels = _encoded(100, 16000, 64, "WAV")  # 13 kB declaring 64 channels
    high_rate = _encoded(4000, 384_000, 1, "WAV")  # 8 kB at 384 kHz
    # 4 s of 8-channel 96 kHz silence: 3 kB of FLAC declaring 384 k frames x 8 channels = 3.1 M samples
    decoded = _encoded(4 * 96_000, 96_000, 8, "FLAC")
    assert len(decoded) < limits.max_upload_bytes and 4 * 96_000 * 8 > limits.max_decoded_samples
    for path, form in [("/api/v1/voices", {}), ("/api/v1/extract-embedding", {}),
                       ("/api/v1/clone-voice", {"text": "hi"})]:
        post = live.client.post
        _check(post(path, files={"audio": _file(many_channels)}, data=form), 422, "max_channels", "64 channels")
        _check(post(path, files={"audio": _file(high_rate)}, data=form), 422, "max_sample_rate", "384000 Hz")
        _check(post(path, files={"audio": _file(decoded, "r.flac")}, data=form), 413, "max_decoded_samples")
    assert live.client.get("/health").json()["limits"]["max_decoded_samples"] == limits.max_decoded_samples


# ------------------------------------------------------------------ OpenAI's speech endpoint


def _speech(live: LiveServer, voice_id: str, **fields) -> httpx.Response:
    return live.client.post("/v1/audio/speech", json={"model": "tts-1", "input": "Hello world", "voice": voice_id,
                                                     **fields})


def test_openai_speech_in_the_stored_voice(live: LiveServer, voice: dict) -> None:
    rate = live.service.sample_rate
    wav = _speech(live, voice["id"], response_format="wav")
    assert wav.status_code == 200 and wav.headers["content-type"] == "audio/wav", wav.text
    assert wav.headers["x-voxport-voice"] == f"voice:{voice['id']}"
    assert wav.headers["x-voxport-embedding-sha256"] == voice["embedding_sha256"]
    assert wav.headers["x-voxport-model"].startswith("tts-1 (ignored")
    assert wav.headers.get("transfer-encoding") == "chunked"  # streamed as synthesized
    samples, wav_rate = _read_wav(wav.content)
    assert wav_rate == rate and len(samples) > 0 and np.abs(samples).max() > 0

    flac = _speech(live, voice["id"], response_format="flac")
    assert flac.status_code == 200 and flac.headers["content-type"] == "audio/flac" and flac.content[:4] == b"fLaC"
    flac_samples, flac_rate = _read_wav(flac.content)
    assert flac_rate == rate and len(flac_samples) == len(samples)
    # the same voice, text and seed: streamed WAV and whole FLAC carry the same speech
    snr = 10 * np.log10(np.sum(flac_samples**2) / max(np.sum((flac_samples - samples) ** 2), 1e-12))
    assert snr > 30.0

    pcm = _speech(live, voice["id"], response_format="pcm")
    assert pcm.status_code == 200 and pcm.headers["x-voxport-sample-rate"] == str(rate)
    assert pcm.content == wav.content[44:]  # the WAV's samples without its header

    for name in formats.supported(rate):  # mp3 and opus where this libsndfile writes them
        r = _speech(live, voice["id"], response_format=name)
        fmt = formats.FORMATS[name]
        assert r.status_code == 200 and r.headers["content-type"] == fmt.media_type
        if name != "pcm":
            decoded, decoded_rate = _read_wav(r.content)
            # the bundle's rate, but opus's at the next rate it carries (22.05 -> 24 kHz)
            assert decoded_rate == formats.encoded_rate(fmt, rate) == int(r.headers["x-voxport-sample-rate"])
            assert len(decoded) > 0, name


def test_openai_speech_errors(live: LiveServer, voice: dict) -> None:
    _check(_speech(live, "0" * 32), 404, "no voice")
    _check(_speech(live, "alloy"), 422, "invalid voice id")
    _check(_speech(live, voice["id"], response_format="ogg"), 422, "response_format")
    _check(_speech(live, voice["id"], response_format="aac"), 422, "AAC", "libsndfile")
    _check(_speech(live, voice["id"], speed=4.0), 422, "speed")
    _check(_speech(live, voice["id"], input=""), 422, "input")
    r = live.client.post("/v1/audio/speech", json={"input": "hi"})
    _check(r, 422, "voice")


def test_output_formats_name_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    assert {"wav", "pcm", "flac"} <= set(formats.supported(16000))
    opus = formats.FORMATS["opus"]
    assert [formats.encoded_rate(opus, r) for r in (16000, 22050, 44100)] == [16000, 24000, 48000]
    assert formats.encoded_rate(formats.FORMATS["flac"], 22050) == 22050
    # A libsndfile without MP3 (before 1.1.0): mp3 is refused naming what it needs, not sent as WAV.
    available = {k: v for k, v in sf.available_formats().items() if k != "MP3"}
    monkeypatch.setattr(sf, "available_formats", lambda: available)
    with pytest.raises(UnsupportedFormat, match=r"libsndfile >= 1\.1\.0 built with LAME"):
        formats.output_format("mp3", 16000)
    assert "mp3" not in formats.supported(16000)


# -------------------------------------------------------------------------------- OpenAPI


def test_openapi_lists_the_forms_and_errors(live: LiveServer) -> None:
    paths = live.client.get("/openapi.json").json()["paths"]
    speech_doc = paths["/v1/audio/speech"]["post"]
    assert {"404", "413", "422"} <= set(speech_doc["responses"])
    assert set(speech_doc["responses"]["200"]["content"]) >= {"audio/wav", "audio/flac", "audio/mpeg"}
    synth = paths["/api/v1/synthesize-with-embedding"]["post"]
    assert set(synth["requestBody"]["content"]) == {"application/json", "application/x-www-form-urlencoded"}
    assert {"413", "422"} <= set(synth["responses"])
    for path in ("/api/v1/extract-embedding", "/api/v1/clone-voice"):
        doc = paths[path]["post"]
        assert {"404", "413", "415", "422"} <= set(doc["responses"])
        ref = doc["requestBody"]["content"]["multipart/form-data"]["schema"]["$ref"].split("/")[-1]
        schema = live.client.get("/openapi.json").json()["components"]["schemas"][ref]
        assert {"audio", "reference"} <= set(schema["properties"]), schema
    assert "ErrorBody" in speech_doc["responses"]["404"]["content"]["application/json"]["schema"]["$ref"]
