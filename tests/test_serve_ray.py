"""`voxport serve serve.engine=ray` (runtime/serve/ray/): real Ray, no mocks, bounded.

1. Serve's local testing mode (deployments in this process, no cluster): the encoder's embedding is
   VoiceCloner's, the vocoder's `@serve.batch` gives every request its own audio, and the proxy's
   cancellation stops the synthesizer replica's decoder loop within a progress tick.
2. The CLI end to end (`voxport serve serve.engine=ray` in a subprocess, its own local cluster): the
   acceptance checks, and SIGTERM leaving no Ray process behind.
3. One `ray.cluster_utils.Cluster` (a head and two worker nodes on this machine): the voice library
   actor under concurrent adds from several processes, the vocoder's replicas spread over both worker
   nodes, and a worker node removed mid-load (every request 200 or a clear 503; service goes on).
The CLI test runs before the cluster exists, so the processes it leaves (none) are its own.
"""

from __future__ import annotations

import io
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf

from voxport.errors import BackendUnavailable, Cancelled, ConfigError
from voxport.evaluate.corpus import Corpus
from voxport.runtime.cloner import VoiceCloner
from voxport.runtime.serve.access import ApiKeys
from voxport.runtime.serve.settings import Limits, RaySettings, ServeSettings

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")



def ray_test(test):
    """Starts Ray (or Serve's local testing mode): marked `ray` and `slow`."""
    return pytest.mark.ray(pytest.mark.slow(test))

REPO = Path(__file__).resolve().parents[1]
TEXT = "Hello there, this is a test."


def _free_port() -> int:
    """A free port below the kernel's ephemeral range and above Ray's worker ports (10002-19999).

    A port the OS hands out for port 0 is an ephemeral one, and Ray opens many sockets on those
    before its proxy binds the HTTP port: CI once saw "Failed to bind to address 127.0.0.1:<port>".
    """
    try:
        ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral = 32768
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20000, max(ephemeral, 20001))
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port between Ray's worker ports and the ephemeral range")


def _wav_bytes(wav: np.ndarray, sr: int) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, wav, sr, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def _ray_processes() -> set[int]:
    """Ray's own processes on this host (workers, raylet, GCS)."""
    found: set[int] = set()
    for pattern in ("ray::", "raylet", "gcs_server"):
        out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout
        found |= {int(p) for p in out.split()}
    return found - {os.getpid()}


def _wait_ready(url: str, deadline_s: float, proc: subprocess.Popen | None = None) -> float:
    start = time.monotonic()
    while time.monotonic() - start < deadline_s:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"voxport serve exited with {proc.returncode} before answering")
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return time.monotonic() - start
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise AssertionError(f"{url} not ready within {deadline_s} s")


@pytest.fixture(scope="module")
def speech(corpus: Corpus) -> dict[str, np.ndarray]:
    items = [i for i in corpus.items() if 3.0 <= i.duration_s <= 7.0]
    a = items[0]
    b = next(i for i in items if i.speaker != a.speaker)
    return {"a": corpus.audio(a, 16000), "b": corpus.audio(b, 16000)}


@pytest.fixture(scope="module")
def local_cloner(bundle: Path) -> Iterator[VoiceCloner]:
    cloner = VoiceCloner(bundle, preference=("cpu", "torch"), threads=1)  # as the replicas open it
    yield cloner
    cloner.close()


def _settings(bundle: Path, voices: Path, **overrides) -> ServeSettings:
    limits = Limits(max_decoder_steps=40, max_voices=200)
    return ServeSettings(bundle_dir=bundle, voices_dir=voices, threads=1, request_timeout_s=60.0, limits=limits,
                         **overrides)


# ----------------------------------------------------------------------------- 0. settings, checks at load


def test_ray_settings_compose_and_become_serve_options():
    from tests.conftest import compose_config
    from voxport.runtime.serve.ray.launcher import deployment_options

    cfg = compose_config("serve.engine=ray", "serve.ray.vocoder.num_replicas=2", "serve.ray.vocoder.max_batch_size=4",
                         "serve.ray.vocoder.max_replicas_per_node=1", "+serve.ray.vocoder.resources.gpu_node=1",
                         "serve.ray.ingress.autoscaling={min_replicas: 1, max_replicas: 3, "
                         "target_ongoing_requests: 4}")
    settings = ServeSettings.from_cfg(cfg.serve, cfg.target)
    assert settings.engine == "ray" and settings.ray.address is None
    vocoder = deployment_options(settings.ray.vocoder, "vocoder")
    assert vocoder == {"name": "vocoder", "num_replicas": 2, "max_ongoing_requests": 16, "max_replicas_per_node": 1,
                       "ray_actor_options": {"num_cpus": 0.5, "resources": {"gpu_node": 1.0}}}
    assert settings.ray.vocoder.max_batch_size == 4 and settings.ray.speaker_encoder.batch_wait_timeout_s == 0.01
    ingress = deployment_options(settings.ray.ingress, "ingress")
    assert ingress["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 4.0}
    assert "num_replicas" not in ingress


@pytest.mark.parametrize(("node", "message"), [
    ({"engine": "spark"}, r"serve.engine must be one of local, ray"),
    ({"ray": {"vocoder": {"num_replicas": 0}}}, r"serve.ray.vocoder: num_replicas must be >= 1"),
    ({"ray": {"synthesizer": {"max_batch_size": 4}}}, r"serve.ray.synthesizer: unknown setting\(s\) max_batch_size"),
    ({"ray": {"vocoder": {"autoscaling": {"max": 2}}}}, r"serve.ray.vocoder.autoscaling: unknown setting\(s\) max"),
    ({"ray": {"vocoder": {"autoscaling": {"min_replicas": 3, "max_replicas": 2}}}}, r"min_replicas <= max_replicas"),
    ({"ray": {"address": "auto", "num_cpus": 2}}, r"num_cpus sizes a local cluster"),
    ({"ray": {"vocoder": {"batch_wait_timeout_s": -1}}}, r"batch_wait_timeout_s >= 0"),
    ({"ray": {"workers": 2}}, r"serve.ray: unknown setting\(s\) workers"),
])
def test_ray_settings_refuse_bad_values_in_one_line(node, message, tmp_path):
    with pytest.raises(ConfigError, match=message) as err:
        ServeSettings.from_cfg({"bundle_dir": str(tmp_path), "voices_dir": str(tmp_path), **node})
    assert "\n" not in str(err.value)


def test_a_replica_refuses_a_changed_artifact_or_an_invisible_bundle(bundle, tmp_path):
    """The component replica's own start-up (no Serve needed to construct it): every artifact that could
    serve its graphs is hashed against its record before anything loads; a mismatch fails loudly."""
    from voxport.pipeline.records import read_bundle
    from voxport.runtime.serve.ray.components import Vocoder

    copy = tmp_path / "bundle"
    copy.mkdir()
    served = next(r.file for r in read_bundle(bundle) if r.component == "vocoder" and r.format == "onnx")
    for path in bundle.iterdir():
        (copy / path.name).symlink_to(path)
    (copy / served).unlink()
    data = bytearray((bundle / served).read_bytes())
    data[-1] ^= 1
    (copy / served).write_bytes(bytes(data))
    with pytest.raises(BackendUnavailable, match=f"{served}: sha256 .* does not match its record"):
        Vocoder(str(copy), ("cpu", "torch"), False, 1)
    with pytest.raises(ConfigError, match="not visible on this node"):
        Vocoder(str(tmp_path / "elsewhere"), ("cpu", "torch"), False, 1)


# ----------------------------------------------------------------------------- 1. local testing mode


@pytest.fixture(scope="module")
def local_parts(bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """The three component deployments in Serve's local testing mode (in this process, no Ray)."""
    from ray.serve import context
    from ray.serve._private.common import DeploymentID, ReplicaID
    from ray.serve._private.config import DeploymentConfig

    from voxport.runtime.serve.ray.launcher import components

    # Ray 2.60's local testing mode sets no replica context, which `@serve.batch` reads when its queue is
    # made (to warn about max_ongoing_requests): give it the one a replica would have.
    context._set_internal_replica_context(
        replica_id=ReplicaID("local", DeploymentID("local", "voxport-test")), servable_object=None,
        _deployment_config=DeploymentConfig(max_ongoing_requests=16), rank=None, world_size=1)
    settings = _settings(bundle, tmp_path_factory.mktemp("voices"),
                         # Batch windows wide enough that two requests sent together meet even on a
                         # loaded host (the encoder's default window missed once at load average 4).
                         ray=RaySettings.from_cfg({"synthesizer_progress_steps": 2,
                                                   "speaker_encoder": {"batch_wait_timeout_s": 0.5},
                                                   "vocoder": {"batch_wait_timeout_s": 0.2}}))
    handles = {name: serve.run(app, name=f"local-{name}", route_prefix=None, _local_testing_mode=True)
               for name, app in components(settings, None).items()}
    try:
        yield handles
    finally:  # (serve.shutdown() would connect to, i.e. start, a cluster: local apps end with the process)
        context._INTERNAL_REPLICA_CONTEXT = None
        assert not ray.is_initialized(), "local testing mode must not start Ray"


@ray_test
def test_local_encoder_embedding_is_the_cloners(local_parts, local_cloner, speech):
    encoder = local_parts["speaker_encoder"]
    report = encoder.describe.remote().result()
    assert report["graphs"]["speaker_encoder/speaker_encoder"]["file"] == \
        local_cloner.served["speaker_encoder/speaker_encoder"].file
    # Two requests at once: batched into one encoder call, each gets its own speaker's embedding.
    responses = [encoder.embed.remote(speech[k], 16000) for k in ("a", "b")]
    got = [r.result(timeout_s=60) for r in responses]
    for k, embedding in zip(("a", "b"), got, strict=True):
        want = local_cloner.embed(speech[k], 16000)
        assert embedding.shape == want.shape
        np.testing.assert_allclose(embedding, want, atol=1e-5)
    assert float(got[0] @ got[1]) < 0.99  # two speakers, two embeddings
    assert max(encoder.batch_sizes.remote().result()) == 2


@ray_test
def test_local_vocoder_batches_and_returns_each_its_own(local_parts, local_cloner):
    vocoder = local_parts["vocoder"]
    rng = np.random.default_rng(0)
    floor = -4.0
    mels = [(rng.standard_normal((80, t)) + floor).astype(np.float32) for t in (24, 24, 24, 40, 40, 24)]
    responses = [vocoder.vocode.remote(m) for m in mels]
    outputs = [r.result(timeout_s=60) for r in responses]
    for mel, wav in zip(mels, outputs, strict=True):
        np.testing.assert_array_equal(wav, local_cloner.vocode(mel))  # never padded: exactly as alone
    sizes = vocoder.batch_sizes.remote().result()
    assert sum(sizes) == len(mels) and max(sizes) > 1, sizes  # Serve batched them (0.2 s window)


@ray_test
def test_local_synthesizer_stops_when_the_caller_stops(local_parts, local_cloner, bundle):
    from voxport.runtime.serve.ray.proxy import RemoteCloner

    reports = {name: h.describe.remote().result() for name, h in local_parts.items()}
    proxy = RemoteCloner(bundle, local_parts, reports, timeout_s=60)
    embedding = np.ones(local_cloner.synth_cfg.speaker_embedding_dim, np.float32) / 16.0
    # Whole: the same mel as VoiceCloner, and one should_stop call per decoder step the replica ran.
    calls = Counter()

    def count() -> bool:
        calls["steps"] += 1
        return False

    mel = proxy.synthesize(TEXT, embedding, seed=3, max_decoder_steps=12, should_stop=count)
    np.testing.assert_array_equal(mel, local_cloner.synthesize(TEXT, embedding, seed=3, max_decoder_steps=12))
    assert calls["steps"] >= 12
    # Stopped after 3 steps: Cancelled within a progress tick (2 steps here), and the replica still serves.
    seen = Counter()

    def stop_after_three() -> bool:
        seen["steps"] += 1
        return seen["steps"] > 3

    with pytest.raises(Cancelled):
        proxy.synthesize(TEXT * 4, embedding, max_decoder_steps=40, should_stop=stop_after_three)
    assert seen["steps"] == 4
    assert proxy.synthesize("Hi.", embedding, max_decoder_steps=5).shape[0] == local_cloner.mel_cfg.n_mels


# ----------------------------------------------------------------------------- 2. the CLI end to end


@ray_test
def test_cli_serves_on_ray_and_leaves_no_ray_process(bundle, corpus, speech, tmp_path, local_cloner):
    """Acceptance: answers within 4 minutes; extract-embedding matches the local engine (cosine >= 0.999);
    clone-voice returns a WAV; /health names replicas, nodes and artifacts; SIGTERM leaves no Ray process."""
    before = _ray_processes()
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "serve.log"
    cmd = [sys.executable, "-m", "voxport.cli", "serve", "serve.engine=ray", f"serve.port={port}",
           f"out_dir={bundle}", f"serve.voices_dir={tmp_path / 'voices'}", f"corpus_dir={corpus.root}",
           "serve.ray.num_cpus=2", "serve.threads=1", f"hydra.run.dir={tmp_path / 'hydra'}"]
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, cwd=tmp_path, start_new_session=True)
    try:
        seconds = _wait_ready(url, 240, proc)
        with httpx.Client(base_url=url, timeout=120) as client:
            audio = {"audio": ("ref.wav", _wav_bytes(speech["a"], 16000), "audio/wav")}
            r = client.post("/api/v1/extract-embedding", files=audio)
            assert r.status_code == 200, r.text
            got = np.asarray(r.json()["embedding"], np.float32)
            want = local_cloner.embed(sf.read(io.BytesIO(audio["audio"][1]), dtype="float32")[0], 16000)
            assert float(got @ want / np.linalg.norm(got) / np.linalg.norm(want)) >= 0.999
            r = client.post("/api/v1/clone-voice", files=audio, data={"text": TEXT})
            assert r.status_code == 200 and r.headers["content-type"] == "audio/wav", r.text[:300]
            wav, sr = sf.read(io.BytesIO(r.content), dtype="float32")
            assert sr == local_cloner.sample_rate and wav.size > 0
            # The rest of the API over the same deployments: streaming, the library, OpenAI speech, metrics.
            r = client.post("/api/v1/clone-voice", files=audio, data={"text": TEXT, "stream": "true"})
            assert r.status_code == 200 and r.content[:4] == b"RIFF" and len(r.content) > 44, r.text[:300]
            r = client.post("/api/v1/voices", files=audio, data={"name": "ray"})
            assert r.status_code == 201, r.text
            voice_id = r.json()["id"]
            r = client.post("/v1/audio/speech", json={"input": "Hi.", "voice": voice_id, "response_format": "wav"})
            assert r.status_code == 200 and r.content[:4] == b"RIFF", r.text[:300]
            assert client.get(f"/api/v1/voices/{voice_id}/reference.wav").content[:4] == b"RIFF"
            assert client.delete(f"/api/v1/voices/{voice_id}").status_code == 200
            assert "voxport" in client.get("/metrics").text
            health = client.get("/health").json()
        assert health["engine"] == "ray"
        deployments = health["deployments"]
        for name, graphs in (("speaker_encoder", 1), ("synthesizer", 3), ("vocoder", 1)):
            replicas = deployments[name]["replicas"]
            assert len(replicas) == 1 and replicas[0]["node_id"] and replicas[0]["node_ip"]
            artifacts = replicas[0]["artifacts"]
            assert len(artifacts) == graphs
            for key, artifact in artifacts.items():
                assert (bundle / artifact["file"]).is_file() and len(artifact["sha256"]) == 64
                assert artifact["file"] == local_cloner.served[key].file
        assert deployments["ingress"]["replicas"][0]["node_id"]
        assert seconds < 240
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
            raise AssertionError("voxport serve did not exit within 90 s of SIGTERM") from None
    assert proc.returncode == 0, log_path.read_text()[-3000:]
    deadline = time.monotonic() + 20
    while _ray_processes() - before and time.monotonic() < deadline:
        time.sleep(0.5)
    left = _ray_processes() - before
    assert not left, f"Ray processes left after SIGTERM: {left}"


# ----------------------------------------------------------------------------- 3. a multi-node cluster


@pytest.fixture(scope="module")
def cluster_app(bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """Head (2 CPUs: Serve, ingress, encoder, synthesizer, library) + two 1-CPU worker nodes, each able to
    hold one vocoder replica; the application deployed by the launcher's own `deploy`."""
    from ray.cluster_utils import Cluster

    from voxport.runtime.serve.ray import launcher

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "resources": {"head": 10}})
    workers = [cluster.add_node(num_cpus=1, resources={"vocoder_slot": 1}) for _ in range(2)]
    settings = None
    try:
        cluster.wait_for_nodes()
        port = _free_port()
        on_head = {"num_cpus": 0.25, "resources": {"head": 1}}
        ray_cfg = RaySettings.from_cfg({
            "address": cluster.address, "ingress": on_head, "speaker_encoder": on_head, "synthesizer": on_head,
            "vocoder": {"num_replicas": 2, "num_cpus": 0.5, "resources": {"vocoder_slot": 1},
                        "max_replicas_per_node": 1}})
        settings = _settings(bundle, tmp_path_factory.mktemp("voices"), port=port, ray=ray_cfg, workers=4,
                             queue_size=16)
        launcher.connect(settings)
        actors = launcher.deploy(settings, ApiKeys(()))
        url = f"http://127.0.0.1:{port}"
        _wait_ready(url, 180)
        yield {"cluster": cluster, "workers": workers, "settings": settings, "url": url, "actors": actors}
    finally:
        try:
            if ray.is_initialized():
                serve.shutdown()
                ray.shutdown()
        finally:
            cluster.shutdown()


def _embedding(url: str, wav: np.ndarray) -> list[float]:
    r = httpx.post(f"{url}/api/v1/extract-embedding", timeout=60,
                   files={"audio": ("ref.wav", _wav_bytes(wav, 16000), "audio/wav")})
    assert r.status_code == 200, r.text
    return r.json()["embedding"]


@ray_test
def test_cluster_library_actor_under_concurrent_adds(cluster_app, speech):
    """Four processes (Ray tasks, as four ingress replicas would) add voices at once through the one
    library actor: every voice stored once, none lost, index and disk agree."""
    from voxport.runtime.serve.ray.launcher import actor_names
    from voxport.runtime.serve.ray.library_actor import RemoteLibrary

    settings = cluster_app["settings"]
    name, namespace = actor_names(settings)[0], settings.ray.namespace
    wav = _wav_bytes(speech["a"][:32000], 16000)
    base = np.ones(256, np.float32) / 16.0

    @ray.remote(num_cpus=0)
    def writer(index: int, count: int) -> list[tuple[str, str]]:
        library = RemoteLibrary(name, namespace)
        out = []
        for i in range(count):
            voice, _ = library.add(wav, base * (1 + index * 10 + i), duration_s=2.0, sample_rate=16000,
                                   encoder_sha256="0" * 64, name=f"w{index}-{i}")
            out.append((voice.id, voice.name))
        return out

    results = ray.get([writer.remote(i, 5) for i in range(4)], timeout=120)
    added = [item for batch in results for item in batch]
    ids = [voice_id for voice_id, _ in added]
    assert len(ids) == 20 and len(set(ids)) == 20
    library = RemoteLibrary(name, namespace)
    stored = {v.id: v.name for v in library.list()}
    assert stored == dict(added)
    assert library.stats()[0] == 20
    on_disk = {p.name for p in (Path(settings.voices_dir) / "voices").iterdir()}
    assert on_disk == set(ids)
    for voice_id, voice_name in added:
        index, i = (int(x) for x in voice_name[1:].split("-"))
        np.testing.assert_array_equal(library.embedding(voice_id), base * (1 + index * 10 + i))
    for voice_id in ids:
        library.delete(voice_id)
    assert library.stats()[0] == 0


@ray_test
def test_cluster_vocoder_replicas_spread_and_survive_a_lost_node(cluster_app, speech):
    url, cluster = cluster_app["url"], cluster_app["cluster"]
    head_id = cluster.head_node.node_id
    health = httpx.get(f"{url}/health", timeout=30).json()
    vocoders = health["deployments"]["vocoder"]["replicas"]
    nodes = {r["node_id"] for r in vocoders}
    assert len(vocoders) == 2 and len(nodes) == 2 and head_id not in nodes, vocoders
    for name in ("ingress", "speaker_encoder", "synthesizer"):
        assert health["deployments"][name]["replicas"][0]["node_id"] == head_id
    assert health["deployments"]["voice_library"]["node_id"] == head_id
    # Errors raised on purpose in a replica or the library actor cross Ray as themselves: 4xx, not 500.
    silent = {"audio": ("silent.wav", _wav_bytes(np.zeros(16000, np.float32), 16000), "audio/wav")}
    r = httpx.post(f"{url}/api/v1/extract-embedding", files=silent, timeout=60)
    assert r.status_code == 422 and r.json()["kind"] == "audio" and "silent" in r.json()["detail"], r.text
    r = httpx.get(f"{url}/api/v1/voices/{'0' * 32}", timeout=30)
    assert r.status_code == 404 and r.json()["kind"] == "voice_not_found", r.text

    body = {"embedding": _embedding(url, speech["a"]), "text": TEXT, "max_decoder_steps": 20}
    statuses: list[tuple[float, int, dict]] = []
    stop = threading.Event()
    lock = threading.Lock()

    def client() -> None:
        with httpx.Client(base_url=url, timeout=90) as http:  # a hang fails the test (ReadTimeout)
            while not stop.is_set():
                r = http.post("/api/v1/synthesize-with-embedding", json=body)
                detail = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
                if r.status_code == 200:
                    assert r.content[:4] == b"RIFF"
                with lock:
                    statuses.append((time.monotonic(), r.status_code, detail))

    def statuses_so_far() -> int:
        with lock:
            return len(statuses)

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(client) for _ in range(4)]
        deadline = time.monotonic() + 60
        while statuses_so_far() < 4 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert statuses_so_far() >= 4, "no request finished before the node removal"
        victim = next(w for w in cluster_app["workers"] if w.node_id == vocoders[0]["node_id"])
        removed_at = time.monotonic()
        cluster.remove_node(victim)
        time.sleep(12)  # load goes on while Serve notices the lost replica
        stop.set()
        for future in futures:
            future.result(timeout=120)  # raises what a client raised (a hang: ReadTimeout)

    codes = Counter(code for _, code, _ in statuses)
    print(f"node removal: {dict(codes)}; 503s: {[d for _, c, d in statuses if c == 503][:3]}")
    assert set(codes) <= {200, 503}, codes
    for _, code, detail in statuses:
        if code == 503:  # a clear refusal: named, no traceback
            assert detail.get("kind") in ("replica_unavailable", "overloaded"), detail
            assert "Traceback" not in detail.get("detail", "")
    after = [code for t, code, _ in statuses if t > removed_at + 8]
    assert after and after[-1] == 200, codes
    # Recovered: on the remaining node, request after request succeeds.
    for _ in range(3):
        r = httpx.post(f"{url}/api/v1/synthesize-with-embedding", json=body, timeout=90)
        assert r.status_code == 200, r.text
    live = httpx.get(f"{url}/health", timeout=30).json()["deployments"]["vocoder"]["replicas"]
    assert {r["node_id"] for r in live} <= {w.node_id for w in cluster_app["workers"] if w is not victim}


@ray_test
def test_cluster_teardown_of_a_joined_cluster_deletes_only_our_application(cluster_app):
    """Joined (serve.ray.address set): shutdown deletes our application and actors; the cluster goes on."""
    from voxport.runtime.serve.ray import launcher

    settings, cluster = cluster_app["settings"], cluster_app["cluster"]
    launcher.teardown(settings, cluster_app["actors"], started=False)
    assert not ray.is_initialized()
    ray.init(address=cluster.address, namespace=settings.ray.namespace)
    assert settings.ray.app_name not in serve.status().applications
    for name in launcher.actor_names(settings):
        with pytest.raises(ValueError):
            ray.get_actor(name, namespace=settings.ray.namespace)
    assert len([n for n in ray.nodes() if n["Alive"]]) == 2  # head + the worker that was not removed
