"""`voxport package format=triton`: a Triton model repository from the session bundle.

Offline (no Triton server): every config.pbtxt parses with tritonclient's ModelConfig schema, its
tensors match the ONNX graph it serves (read here with `onnx` directly), the decoder step's state
pairs exist in its graph, and voxport_tts/model.py, run over the stand-in for Triton's request API
(tests/triton_standin.py: BLS calls dispatched to ONNX Runtime over the repository's own
model.onnx files, implicit state emulated from the config), gives the audio `voxport clone`
(runtime VoiceCloner) gives on the same inputs. The `triton` test runs the repository in a real
`tritonserver` when one is on PATH.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from triton_standin import PythonModel

from voxport.errors import ConfigError, PackageError
from voxport.export.triton import PackageConfig, package_triton
from voxport.export.triton.configs import graph_io
from voxport.export.triton.validate import check_graph_config
from voxport.models.synthesizer_io import STATE_NAMES

tritonclient = pytest.importorskip("tritonclient.grpc.model_config_pb2")
from google.protobuf import json_format, text_format  # noqa: E402

GRAPH_MODELS = ("speaker_encoder", "synthesizer_encoder", "synthesizer_decoder_step", "synthesizer_postnet",
                "vocoder")
BATCHED = ("speaker_encoder", "synthesizer_postnet", "vocoder")
TEXT = "Hello world, this is voxport."
_TYPES = {1: "TYPE_FP32", 7: "TYPE_INT64", 9: "TYPE_BOOL", 10: "TYPE_FP16", 6: "TYPE_INT32"}


@pytest.fixture(scope="module")
def repository(bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("triton") / "repo"
    package = package_triton(PackageConfig(out=out, bundle_dir=bundle))
    assert package.parsed_with_schema
    return out


def parsed(path: Path) -> dict:
    message = text_format.Parse(path.read_text(), tritonclient.ModelConfig())
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def onnx_tensors(path: Path) -> dict[str, tuple[str, list]]:
    graph = onnx.load(str(path), load_external_data=False).graph
    return {v.name: (_TYPES[v.type.tensor_type.elem_type],
                     [d.dim_value if d.HasField("dim_value") else d.dim_param for d in v.type.tensor_type.shape.dim])
            for v in [*graph.input, *graph.output]}


def step_feeds(n_text: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The decoder step's non-state inputs for one step of a batch of one."""
    return {"prev_frame": rng.standard_normal((1, 80), dtype=np.float32),
            "decoder_masks": (rng.random((2, 1, 256)) > 0.5).astype(np.float32) * 2,
            "encoder_seq": rng.standard_normal((1, n_text, 1024), dtype=np.float32),
            "encoder_seq_proj": rng.standard_normal((1, n_text, 128), dtype=np.float32),
            "chars": rng.integers(2, 70, (1, n_text))}


def test_every_config_parses_and_matches_its_graph(repository: Path):
    models = sorted(p.name for p in repository.iterdir() if p.is_dir())
    assert models == sorted([*GRAPH_MODELS, "voxport_tts"])
    for name in GRAPH_MODELS:
        config = parsed(repository / name / "config.pbtxt")
        assert config["name"] == name and config["backend"] == "onnxruntime"
        assert config["instance_group"] == [{"count": 1, "kind": "KIND_CPU"}]
        tensors = onnx_tensors(repository / name / "1" / "model.onnx")
        batched = int(config.get("max_batch_size", 0)) > 0
        assert batched == (name in BATCHED), name
        assert ("dynamic_batching" in config) == batched
        for entry in [*config["input"], *config["output"]]:
            dtype, shape = tensors[entry["name"]]
            dims = [int(d) for d in entry["dims"]]
            graph_dims = shape[1:] if batched else shape
            assert entry["data_type"] == dtype, (name, entry)
            assert dims == [d if isinstance(d, int) and d > 0 else -1 for d in graph_dims], (name, entry, shape)
        listed = {e["name"] for e in config["input"]}
        states = {s["input_name"] for s in config.get("sequence_batching", {}).get("state", [])}
        graph_inputs = {v.name for v in onnx.load(str(repository / name / "1" / "model.onnx"),
                                                     load_external_data=False).graph.input}
        assert listed | states == graph_inputs and not listed & states, name


def test_decoder_step_is_stateful_with_pairs_in_its_graph(repository: Path):
    config = parsed(repository / "synthesizer_decoder_step" / "config.pbtxt")
    states = config["sequence_batching"]["state"]
    assert [s["input_name"] for s in states] == list(STATE_NAMES)
    tensors = onnx_tensors(repository / "synthesizer_decoder_step" / "1" / "model.onnx")
    for state in states:
        assert state["output_name"] == state["input_name"] + "_out"
        assert tensors[state["input_name"]][0] == tensors[state["output_name"]][0] == state["data_type"]
        assert len(tensors[state["input_name"]][1]) == len(state["dims"]) == 2
        (initial,) = state["initial_state"]
        assert initial["zero_data"] and all(int(d) >= 1 for d in initial["dims"])
    outputs = {e["name"] for e in config["output"]}
    assert outputs == {"mel_frames", "stop", "attention"}  # the state stays on the server


def test_python_model_is_decoupled_bls_and_package_carries_the_bundle(repository: Path, bundle: Path):
    config = parsed(repository / "voxport_tts" / "config.pbtxt")
    assert config["backend"] == "python" and config["model_transaction_policy"] == {"decoupled": True}
    assert {"TEXT", "EMBEDDING", "SPEAKER_MELS", "SEED", "STREAM"} <= {e["name"] for e in config["input"]}
    version = repository / "voxport_tts" / "1"
    source = (version / "model.py").read_text()
    assert "pb_utils.InferenceRequest(" in source and ".exec()" in source
    assert "import torch" not in source and not (set((version / "voxport_frontend").glob("*.py")) == set())
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert (repository / "manifest.json").read_text() == (bundle / "manifest.json").read_text()
    assert all((repository / name).is_file() for name in manifest["records"])
    card = (repository / "MODEL_CARD.md").read_text()
    assert all(f"`{name}`" in card for name in GRAPH_MODELS) and "seeded" in card and "Packaged on" in card
    info = json.loads((repository / "voxport_package.json").read_text())
    assert info["models"]["synthesizer_decoder_step"]["graph_edits"] == ["cumulative"]


def test_shipped_front_end_imports_without_voxport_torch_or_pypinyin(repository: Path):
    """What a stock Triton Python backend has: numpy, and none of voxport, torch or pypinyin."""
    version = repository / "voxport_tts" / "1"
    code = ("import sys\nfor m in ('torch', 'voxport', 'pypinyin', 'librosa'): sys.modules[m] = None\n"
            f"sys.path.insert(0, {str(version)!r})\n"
            "from voxport_frontend import streaming, synthesizer_loop\nfrom voxport_frontend.text import encode_text\n"
            f"print(encode_text({TEXT!r}))\n"
            "try:\n    encode_text('你好')\nexcept ValueError as exc:\n    print(exc)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    from voxport.models.text import encode_text

    lines = out.stdout.strip().splitlines()
    assert lines[0] == str(encode_text(TEXT))  # the shim passes Latin text through as pypinyin does
    assert "needs pypinyin" in lines[1]


def test_speaker_mels_beyond_max_batch_are_sent_in_chunks(repository: Path):
    """12 partials through a speaker encoder model taking at most 8: two BLS calls, the same mean."""
    from triton_standin import Request

    tts = PythonModel(repository)
    mels = np.random.default_rng(0).standard_normal((3, 160, 40)).astype(np.float32)
    once = tts.model.embedding(Request({"SPEAKER_MELS": mels}))
    tiled = tts.model.embedding(Request({"SPEAKER_MELS": np.concatenate([mels] * 4)}))
    assert tts.server.calls["speaker_encoder"] == 1 + 2
    assert float(once @ tiled) > 0.99999 and abs(float(np.linalg.norm(tiled)) - 1) < 1e-5


def test_packaged_decoder_step_equals_the_bundle_graph(repository: Path, bundle: Path):
    """The state edit: Triton's (1, 1) zero `cumulative` gives what the runtime's (1, n_text) zero gives."""
    from voxport.runtime.backends.onnxruntime import open_session

    info = json.loads((repository / "voxport_package.json").read_text())["models"]["synthesizer_decoder_step"]
    original = open_session(bundle / info["artifact"])
    packaged = open_session(repository / "synthesizer_decoder_step" / "1" / "model.onnx")
    rng = np.random.default_rng(0)
    n_text = 7
    feeds = {**step_feeds(n_text, rng), **{
        n: np.zeros((1, 128 if n == "attn_hidden" else 1024), np.float32) for n in STATE_NAMES if n != "cumulative"}}
    a = original.run(None, {**feeds, "cumulative": np.zeros((1, n_text), np.float32)})
    b = packaged.run(None, {**feeds, "cumulative": np.zeros((1, 1), np.float32)})
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    later = {**feeds, "cumulative": rng.random((1, n_text), dtype=np.float32)}
    assert all(np.array_equal(x, y) for x, y in zip(original.run(None, later), packaged.run(None, later), strict=True))


@pytest.fixture(scope="module")
def cloner(bundle: Path):
    """What `voxport clone` runs, over the same bundle, on ONNX artifacts as the package serves."""
    from voxport.runtime.cloner import VoiceCloner

    cloner = VoiceCloner(bundle, preference=("onnx",))
    yield cloner
    cloner.close()


def snr_db(reference: np.ndarray, test: np.ndarray) -> float:
    assert reference.shape == test.shape
    noise = float(((reference - test) ** 2).sum())
    return float("inf") if noise == 0 else 10 * np.log10(float((reference ** 2).sum()) / noise)


def test_bls_loop_gives_the_audio_of_voxport_clone(repository: Path, cloner):
    """voxport_tts over the stand-in vs VoiceCloner on the same embedding, text, seed and step cap."""
    tts = PythonModel(repository)
    embedding = np.random.default_rng(1).standard_normal(256).astype(np.float32)
    embedding /= np.linalg.norm(embedding)
    expected = cloner.vocode(cloner.synthesize(TEXT, embedding, seed=3, max_decoder_steps=6))
    (response,) = tts.request(TEXT=np.array([TEXT.encode()], dtype=object), EMBEDDING=embedding,
                              SEED=np.array([3]), MAX_DECODER_STEPS=np.array([6]))
    assert not response.has_error(), response.error().message()
    audio, rate = (t.as_numpy() for t in response.output_tensors())
    assert int(rate[0]) == cloner.sample_rate and audio.size > 0
    assert snr_db(expected, audio) >= 40.0
    assert tts.server.calls["synthesizer_decoder_step"] == 2 * 6  # two fragments, the last step carried END
    assert not tts.server.sequences  # every decoder sequence ended


@pytest.mark.slow
def test_bls_loop_matches_voice_cloner_from_reference_streamed_and_stopped(repository: Path, cloner, corpus):
    """voxport_tts over the stand-in vs VoiceCloner (what `voxport clone` runs) on the same reference
    clip, text, seed and step cap: one-shot from the reference, streamed, and stopped early by the
    stop token."""
    from voxport.models import speaker_frontend as se

    tts = PythonModel(repository)
    item = corpus.items(split="eval", lang="en")[0]
    ref = corpus.audio(item, 16000)
    text = np.array([TEXT.encode()], dtype=object)
    steps = 12

    # One shot, from the reference: SPEAKER_MELS through the speaker encoder model, as clone embeds it.
    expected = cloner.clone(ref, 16000, TEXT, seed=3, max_decoder_steps=steps)
    mels = se.partial_mels(se.preprocess_wav(ref, 16000, cloner.encoder_cfg), cloner.encoder_cfg).astype(np.float32)
    (response,) = tts.request(TEXT=text, SPEAKER_MELS=mels, SEED=np.array([3]), MAX_DECODER_STEPS=np.array([steps]))
    assert not response.has_error(), response.error().message()
    audio, rate = (t.as_numpy() for t in response.output_tensors())
    assert int(rate[0]) == cloner.sample_rate and audio.size > 0
    assert snr_db(expected, audio) >= 40.0
    assert not tts.server.sequences  # every decoder sequence ended

    # Streamed, from an embedding: chunk by chunk what VoiceCloner.stream gives.
    embedding = cloner.embed(ref, 16000)
    expected_chunks = list(cloner.stream(TEXT, embedding, seed=5, max_decoder_steps=steps))
    responses = tts.request(TEXT=text, EMBEDDING=embedding, SEED=np.array([5]), MAX_DECODER_STEPS=np.array([steps]),
                            STREAM=np.array([True]))
    chunks = [r.output_tensors()[0].as_numpy() for r in responses]
    assert len(chunks) == len(expected_chunks) > 1
    assert snr_db(np.concatenate(expected_chunks), np.concatenate(chunks)) >= 40.0

    # The stop token ends each fragment early; the sequence is then closed with one extra END step.
    calls = tts.server.calls.get("synthesizer_decoder_step", 0)
    expected = cloner.vocode(cloner.synthesize(TEXT, embedding, seed=7, max_decoder_steps=steps, min_stop_token=0.0))
    (response,) = tts.request(TEXT=text, EMBEDDING=embedding, SEED=np.array([7]),
                              MAX_DECODER_STEPS=np.array([steps]), MIN_STOP_TOKEN=np.array([0.0], np.float32))
    assert snr_db(expected, response.output_tensors()[0].as_numpy()) >= 40.0
    fragments = 2  # "Hello world" and "this is voxport."
    assert tts.server.calls["synthesizer_decoder_step"] - calls == fragments * (6 + 1 + 1)  # steps 0..6, then END
    assert not tts.server.sequences


def test_bad_requests_are_named_errors(repository: Path):
    tts = PythonModel(repository)
    text = np.array([TEXT.encode()], dtype=object)
    (response,) = tts.request(TEXT=text)
    assert response.has_error() and "EMBEDDING or SPEAKER_MELS" in response.error().message()
    (response,) = tts.request(TEXT=text, EMBEDDING=np.ones(256, np.float32), MAX_DECODER_STEPS=np.array([10 ** 6]))
    assert response.has_error() and "MAX_DECODER_STEPS" in response.error().message()
    # Triton refuses a step of a sequence that was never started; the stand-in does too.
    feeds = step_feeds(5, np.random.default_rng(0))
    refused = tts.server.infer("synthesizer_decoder_step", feeds, ["stop"], correlation_id=9, flags=0)
    assert refused.has_error() and "was not started" in refused.error().message()
    started = tts.server.infer("synthesizer_decoder_step", feeds, ["stop"], correlation_id=9, flags=1 | 2)
    assert not started.has_error() and not tts.server.sequences


def test_batch_axis_comes_from_the_declared_axes(bundle: Path):
    """A quantizer renames an output's axes (the static INT8 vocoder's `wav` is ('ConvTranspose_149_o0__d0',
    1, ...)); the record's declared axes still say which one is the batch."""
    from voxport.export.triton.configs import TensorIO, batch_axis
    from voxport.export.triton.repository import _declared
    from voxport.pipeline.records import read_bundle

    record = next(r for r in read_bundle(bundle) if r.file == "vocoder_fp32.onnx")
    graph_in = [TensorIO("mel", "TYPE_FP32", ("batch", 80, "frames"))]
    graph_out = [TensorIO("wav", "TYPE_FP32", ("ConvTranspose_149_o0__d0", 1, "ConvTranspose_149_o0__d2"))]
    assert batch_axis([*graph_in, *graph_out]) is None
    assert batch_axis(_declared(record, graph_in, graph_out)) == "batch"
    with pytest.raises(PackageError, match="its record names tensors"):
        _declared(record, graph_in, [TensorIO("audio", "TYPE_FP32", ("batch", 1, "samples"))])


def test_check_graph_config_names_every_mismatch(repository: Path):
    path = repository / "vocoder" / "1" / "model.onnx"
    config = parsed(repository / "vocoder" / "config.pbtxt")
    assert check_graph_config(config, *graph_io(path)) == []
    config["input"][0].update(data_type="TYPE_FP16", dims=["80"])
    config["output"].append({"name": "nope", "data_type": "TYPE_FP32", "dims": ["-1"]})
    problems = " | ".join(check_graph_config(config, *graph_io(path)))
    assert "TYPE_FP16" in problems and "rank" in problems and "'nope'" in problems


def test_validation_refuses_a_config_that_does_not_fit(repository: Path, tmp_path: Path):
    from voxport.export.triton.validate import validate_repository

    graphs = {"vocoder": repository / "vocoder" / "1" / "model.onnx"}
    (tmp_path / "vocoder").mkdir()
    config = tmp_path / "vocoder" / "config.pbtxt"
    config.write_text((repository / "vocoder" / "config.pbtxt").read_text().replace("dims: [ 80, -1 ]", "dims: [ 80 ]"))
    with pytest.raises(PackageError, match="vocoder: input mel has rank 2"):
        validate_repository(tmp_path, graphs)
    config.write_text("name: 'vocoder'\nmax_batch_size: lots\n")
    with pytest.raises(PackageError, match="does not parse with Triton's ModelConfig schema"):
        validate_repository(tmp_path, graphs)


def test_refuses_a_non_empty_out_without_force_and_replaces_it_with(bundle: Path, tmp_path: Path, monkeypatch,
                                                                   caplog):
    out = tmp_path / "repo"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(PackageError, match="not empty"):
        package_triton(PackageConfig(out=out, bundle_dir=bundle))
    assert (out / "keep.txt").is_file() and not list(tmp_path.glob(".repo.*"))
    # Without tritonclient: written and checked against the graphs all the same, and it says so.
    from voxport.export.triton import repository, validate

    monkeypatch.setattr(validate, "protobuf_schema", lambda: None)
    monkeypatch.setattr(repository, "protobuf_schema", lambda: None)
    with caplog.at_level("INFO", logger="voxport.export.triton.validate"):
        package = package_triton(PackageConfig(out=out, bundle_dir=bundle, force=True, instances=2, max_batch_size=4))
    assert "tritonclient is not installed" in caplog.text and not package.parsed_with_schema
    assert "configs not parsed with Triton's schema" in package.summary()
    monkeypatch.undo()
    assert not (out / "keep.txt").exists() and not list(tmp_path.glob(".repo.*"))
    vocoder = parsed(out / "vocoder" / "config.pbtxt")
    assert vocoder["max_batch_size"] == 4 and vocoder["instance_group"][0]["count"] == 2
    with pytest.raises(ConfigError, match="unknown package setting 'colour'"):
        PackageConfig.from_settings({"out": str(out), "colour": "red"}, bundle)


def test_tensorrt_target_config_shape(bundle: Path, tmp_path: Path):
    """target=tensorrt on this CPU host: no engine can be chosen, so each graph falls back (the reason
    says why) and every graph model gets GPU instances; voxport_tts stays on the CPU."""
    package = package_triton(PackageConfig(out=tmp_path / "trt", bundle_dir=bundle, target="tensorrt"))
    for model in package.models:
        config = parsed(tmp_path / "trt" / model.name / "config.pbtxt")
        assert config["instance_group"][0]["kind"] == "KIND_GPU" and "parameters" not in config
        assert "fallback" in model.reason or "trt" in model.reason
    assert parsed(tmp_path / "trt" / "voxport_tts" / "config.pbtxt")["instance_group"][0]["kind"] == "KIND_CPU"


def test_tensorrt_engine_is_packaged_as_a_plan(bundle: Path, tmp_path: Path):
    """Config shape only (no GPU here): a bundle with a vocoder engine whose fingerprint matches the
    host gets `vocoder/1/model.plan` on the tensorrt backend, typed from the engine's ONNX parent.
    The plan file is a stand-in byte string, never loaded."""
    from voxport.models.checkpoint import sha256_file
    from voxport.pipeline.records import read_bundle, write_record
    from voxport.runtime.host import Host

    gpu_host = Host(cpu_model="test", cores=2, cuda_available=True, tensorrt_version="10.3.0", cuda_version="12.4",
                    driver_version="550.54.14", gpus=({"name": "NVIDIA L4", "compute_capability": "8.9"},))
    copy = tmp_path / "bundle"
    copy.mkdir()
    for item in bundle.iterdir():
        if item.is_file():
            (copy / item.name).symlink_to(item)
    plan = copy / "vocoder_fp16.plan"
    plan.write_bytes(b"stand-in engine bytes: this test checks the config, not the engine")
    parent = next(r for r in read_bundle(bundle) if r.file == "vocoder_fp32.onnx")
    engine = parent.replace(format="trt", precision="fp16", file=plan.name, sha256=sha256_file(plan), stage="tensorrt",
                            parent=parent.file, parent_sha256=parent.sha256, host=gpu_host.fingerprint())
    write_record(engine, copy)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["records"].append(plan.name + ".json")
    (copy / "manifest.json").unlink()
    (copy / "manifest.json").write_text(json.dumps(manifest))
    package = package_triton(PackageConfig(out=tmp_path / "repo", bundle_dir=copy, target="tensorrt"), host=gpu_host)
    vocoder = next(m for m in package.models if m.name == "vocoder")
    assert vocoder.file == "model.plan" and "TensorRT fp16 engine" in vocoder.reason
    assert (tmp_path / "repo" / "vocoder" / "1" / "model.plan").read_bytes() == plan.read_bytes()
    config = parsed(tmp_path / "repo" / "vocoder" / "config.pbtxt")
    assert config["backend"] == "tensorrt" and config["instance_group"][0]["kind"] == "KIND_GPU"
    tensors = onnx_tensors(bundle / "vocoder_fp32.onnx")
    assert [(e["name"], e["data_type"], len(e["dims"]) + 1) for e in [*config["input"], *config["output"]]] == [
        (name, tensors[name][0], len(tensors[name][1])) for name in ("mel", "wav")]


def test_cli_package(bundle: Path, tmp_path: Path, capsys):
    from voxport.cli import main

    assert main(["--help"]) == 0 and "package" in capsys.readouterr().out
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "old.txt").write_text("x")
    assert main(["package", "format=triton", f"out={tmp_path / 'r'}", f"bundle_dir={bundle}"]) == 1
    assert "--force" in capsys.readouterr().err
    assert main(["package", "format=triton", f"out={tmp_path / 'r'}", "--force", f"bundle_dir={bundle}"]) == 0
    assert "voxport_tts" in capsys.readouterr().out and not (tmp_path / "r" / "old.txt").exists()
    assert main(["package", "format=triton", "bundle_dir"]) == 1
    assert "key=value" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.triton
@pytest.mark.skipif(shutil.which("tritonserver") is None, reason="no tritonserver on PATH")
def test_real_triton_server_serves_the_repository(repository: Path, bundle: Path, tmp_path: Path):
    """The repository in a real tritonserver, over its HTTP API: every model loads and is ready, and
    voxport_tts (through the generate_stream extension, which serves decoupled models) gives the audio
    VoiceCloner gives for the same embedding, text, seed and step cap."""
    import httpx

    from voxport.runtime.cloner import VoiceCloner

    port = _free_port()
    server = subprocess.Popen(
        ["tritonserver", f"--model-repository={repository}", f"--http-port={port}", f"--grpc-port={_free_port()}",
         f"--metrics-port={_free_port()}", "--log-verbose=0"],
        stdout=(tmp_path / "triton.log").open("w"), stderr=subprocess.STDOUT, env=os.environ.copy())
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{base}/v2/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert server.poll() is None, (tmp_path / "triton.log").read_text()[-3000:]
            time.sleep(1)
        else:
            pytest.fail("tritonserver not ready in 120 s: " + (tmp_path / "triton.log").read_text()[-3000:])
        for name in [*GRAPH_MODELS, "voxport_tts"]:
            assert httpx.get(f"{base}/v2/models/{name}/ready", timeout=5).status_code == 200, name
        cloner = VoiceCloner(bundle, preference=("onnx",))
        rng = np.random.default_rng(0)
        embedding = rng.standard_normal(256).astype(np.float32)
        embedding /= np.linalg.norm(embedding)
        expected = cloner.vocode(cloner.synthesize(TEXT, embedding, seed=3, max_decoder_steps=12))
        body = {"TEXT": TEXT, "EMBEDDING": embedding.tolist(), "SEED": 3, "MAX_DECODER_STEPS": 12}
        audio = []
        with httpx.stream("POST", f"{base}/v2/models/voxport_tts/generate_stream", json=body, timeout=120) as r:
            assert r.status_code == 200, r.read()
            for line in r.iter_lines():
                if line.startswith("data:"):
                    event = json.loads(line[5:])
                    assert "error" not in event, event
                    audio.append(np.asarray(event["AUDIO"], dtype=np.float32))
        audio = np.concatenate(audio)
        noise = float(((expected - audio) ** 2).sum())
        assert noise == 0 or 10 * np.log10(float((expected ** 2).sum()) / noise) >= 40.0
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)
