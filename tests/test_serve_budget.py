"""Bounded work and cancellation (issue 12): a per-request work budget, chunked vocoding, and work that
stops when its client leaves. A real server on loopback over the shared seeded `cloner` (it never
meets the stop token, so every fragment runs its full max_decoder_steps: the worst case)."""

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from test_serve import LiveServer, _settings, cloner  # noqa: F401  (fixtures)

from voxport.runtime import streaming
from voxport.runtime.serve.settings import Limits

STEPS = 40  # the test server's per-fragment cap (and every request's max_decoder_steps here)


def _rss_bytes() -> int:
    """Resident memory of this process, which runs the server threads (from /proc, no psutil)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


@pytest.fixture(scope="module")
def live(bundle: Path, cloner, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:  # noqa: F811
    limits = Limits(max_text_chars=500, max_decoder_steps=STEPS, max_request_decoder_steps=400,
                    max_request_audio_seconds=12.0)
    settings = _settings(bundle, tmp_path_factory.mktemp("voices"), limits=limits, vocoder_chunk_frames=64)
    with LiveServer(settings, cloner) as server:
        yield server


def _speak(live: LiveServer, text: str, client: httpx.Client | None = None, **extra) -> httpx.Response:
    rng = np.random.default_rng(0)
    embedding = rng.standard_normal(live.service.embedding_dim)
    body = {"text": text, "embedding": (embedding / np.linalg.norm(embedding)).tolist(),
            "max_decoder_steps": STEPS, **extra}
    return (client or live.client).post("/api/v1/synthesize-with-embedding", json=body)


def _in_flight(live: LiveServer) -> int:
    return live.client.get("/health").json()["capacity"]["in_flight"]


def test_many_fragments_get_413_before_any_work(live: LiveServer) -> None:
    rss = _rss_bytes()
    start = time.perf_counter()
    r = _speak(live, "a," * 250)  # 500 chars, 250 fragments: at least 250 x 7 steps > 400
    assert r.status_code == 413, r.text
    assert "max_request_decoder_steps" in r.json()["detail"]
    assert time.perf_counter() - start < 2.0  # refused before admission, not after the work
    assert _rss_bytes() - rss < 50 * 1024 * 1024
    # Batches share one budget: four texts that fit alone do not fit together.
    r = live.client.post("/api/v1/batch-synthesize", data={"texts": ["a," * 30] * 4, "voice_id": "0" * 32})
    assert r.status_code == 413 and "max_request_decoder_steps" in r.json()["detail"], r.text


@pytest.mark.slow
def test_budget_is_enforced_while_running(live: LiveServer) -> None:
    # 11 fragments may stop early (11 x 7 steps fit) but this model never stops: 11 x 40 > 400 steps.
    r = _speak(live, "hello there, " * 11)
    assert r.status_code == 413, r.text
    assert "max_request_decoder_steps" in r.json()["detail"]
    # At half speed the same steps make twice the audio: the seconds budget (12 s) is spent first.
    r = _speak(live, "hello there, " * 7, speaking_rate=0.5)  # 280 steps: 13 s
    assert r.status_code == 413 and "max_request_audio_seconds" in r.json()["detail"], r.text
    assert _in_flight(live) == 0


@pytest.mark.slow
def test_a_long_bounded_request_leaves_memory_where_it_was(live: LiveServer) -> None:
    assert _speak(live, "hello there").status_code == 200  # warm-up: sessions and arenas at their size
    rss = _rss_bytes()
    r = _speak(live, "hello there, " * 10)  # 400 steps: the whole budget, 9.3 s of audio
    assert r.status_code == 200, r.text
    assert float(r.headers["X-Voxport-Duration-S"]) > 8.0
    grown = _rss_bytes() - rss
    print(f"server RSS {rss / 2**20:.0f} MiB before, {(rss + grown) / 2**20:.0f} MiB after")
    assert grown < 150 * 1024 * 1024, f"server RSS grew by {grown / 2**20:.0f} MiB"


@pytest.mark.slow
def test_a_client_that_leaves_frees_its_slot(live: LiveServer) -> None:
    metrics = live.client.get("/metrics").text
    before = _counter(metrics, 'voxport_errors_total{kind="cancelled"}')
    with httpx.Client(base_url=live.url, timeout=httpx.Timeout(1.0, connect=5.0)) as impatient:
        with pytest.raises(httpx.ReadTimeout):
            _speak(live, "hello there, " * 10, client=impatient)  # ~10 s of work
    left = time.monotonic()
    while _in_flight(live) and time.monotonic() - left < 3.0:
        time.sleep(0.05)
    freed = time.monotonic() - left
    assert _in_flight(live) == 0, "the slot was still held 3 s after the client left"
    print(f"slot freed {freed:.2f} s after the client left")
    deadline = time.monotonic() + 3.0
    while _counter(live.client.get("/metrics").text, 'voxport_errors_total{kind="cancelled"}') <= before:
        assert time.monotonic() < deadline, "the cancelled request was not counted"
        time.sleep(0.05)


def _counter(metrics: str, name: str) -> float:
    for line in metrics.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


@pytest.mark.slow  # about 10 s: a whole utterance vocoded twice on 2 cores
def test_chunked_vocoding_matches_one_shot(cloner) -> None:  # noqa: F811
    mel = cloner.synthesize("hello there, hello world", np.eye(1, cloner.synth_cfg.speaker_embedding_dim)[0],
                            max_decoder_steps=STEPS)
    mel = np.concatenate([mel] * 3, axis=1)  # 240 frames: several chunks at 64
    whole = cloner.vocode(mel)
    scfg = streaming.StreamConfig(chunk_frames=64, vocoder_context=12)
    chunked = np.concatenate(list(streaming.vocoded_chunks([mel], cloner.vocode, cloner.mel_cfg.hop_length, scfg)))
    assert chunked.shape == whole.shape
    snr = 10 * np.log10(np.sum(whole.astype(np.float64) ** 2) / max(np.sum((whole - chunked) ** 2.0), 1e-30))
    print(f"chunked vs one-shot vocoding: {snr:.1f} dB SNR")
    assert snr > 40.0, snr


@pytest.mark.slow  # about 15 s: a long request (~10 s of work) with short ones beside it
def test_a_short_request_beside_a_long_one_keeps_its_latency(live: LiveServer) -> None:
    """Fair scheduling: the long request's vocoding is cut into chunks that interleave with the short
    request's (never one call per utterance, never an item padded to a long one), and each request
    synthesizes on its own worker, so a short request is not queued behind the long one."""
    import concurrent.futures
    import statistics

    def short() -> float:
        start = time.perf_counter()
        r = _speak(live, "hello there", max_decoder_steps=12)
        assert r.status_code == 200, r.text
        return time.perf_counter() - start

    short()  # warm-up
    solo = statistics.median(short() for _ in range(3))
    with httpx.Client(base_url=live.url, timeout=60.0) as other, concurrent.futures.ThreadPoolExecutor(1) as pool:
        long_request = pool.submit(_speak, live, "hello there, " * 10, other)  # 400 steps, ~9 s of audio
        time.sleep(0.5)  # the long one is admitted and working
        beside = []
        while not long_request.done() and len(beside) < 3:
            beside.append(short())
        long_done = long_request.done()
        assert long_request.result().status_code == 200
    assert len(beside) >= 2 and not long_done, "the long request ended before the short ones were measured"
    ratio = statistics.median(beside) / solo
    print(f"short request: {solo * 1000:.0f} ms alone, {statistics.median(beside) * 1000:.0f} ms beside a long one "
          f"({ratio:.2f}x)")
    assert ratio <= 2.0, f"a short request took {ratio:.2f}x its solo latency beside a long one"


@pytest.mark.slow  # about 15 s
def test_the_vocoder_interleaves_a_short_mel_with_a_long_one(bundle: Path, cloner, tmp_path: Path) -> None:  # noqa: F811
    """The vocoder stage alone: a short utterance's vocoding beside a 20 s one is not queued behind it.
    The long one is cut into chunks and there is a vocoder lane per worker, so the short one runs on the
    other lane at once. (One lane and one call per utterance: the short one waited for the whole long
    call, 5-10x its solo time here; nothing was ever padded to the long one's length either way.)"""
    import concurrent.futures
    import statistics

    from voxport.runtime.serve.engine import Engine
    from voxport.runtime.serve.telemetry import Telemetry

    engine = Engine(cloner, _settings(bundle, tmp_path, workers=2, vocoder_chunk_frames=64), Telemetry())
    rng = np.random.default_rng(0)
    floor = np.log(1e-5)
    short_mel = (floor + 4 * rng.random((cloner.mel_cfg.n_mels, 40))).astype(np.float32)
    long_mel = (floor + 4 * rng.random((cloner.mel_cfg.n_mels, 1700))).astype(np.float32)  # ~20 s
    never = lambda: False  # noqa: E731

    def short() -> float:
        start = time.perf_counter()
        engine.vocode_chunked(short_mel, never)
        return time.perf_counter() - start

    try:
        short()
        solo = statistics.median(short() for _ in range(5))
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            long_job = pool.submit(engine.vocode_chunked, long_mel, never)
            time.sleep(0.2)
            beside = [short() for _ in range(5)]
            long_done = long_job.done()
            long_job.result()
    finally:
        engine.close()
    assert not long_done, "the long mel was vocoded before the short ones were measured"
    ratio = statistics.median(beside) / solo
    print(f"short vocoding: {solo * 1000:.0f} ms alone, {statistics.median(beside) * 1000:.0f} ms beside a long one "
          f"({ratio:.2f}x)")
    assert ratio <= 2.0, f"a short mel took {ratio:.2f}x its solo time beside a long one"
