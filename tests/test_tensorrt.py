"""TensorRT path: profiles derived from data, one-line refusals without CUDA / TensorRT, every
parser error reported, `voxport build target=tensorrt` stopping before any work; and GPU tests
that build and run real engines (skipped where CUDA or TensorRT is missing)."""

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import compose_config

from voxport.errors import BackendUnavailable, ConfigError
from voxport.export.profiles import (
    ProfileConfig,
    axis_ranges,
    length_range,
    profile_shapes,
    shape_problem,
)
from voxport.export.tensorrt import (
    EngineBuildError,
    TensorRTConfig,
    build_engine,
    parser_errors,
    require_tensorrt,
    strongly_typed,
)
from voxport.pipeline.records import Record, TensorSpec
from voxport.runtime.host import Host

MEL = TensorSpec("mel", "float32", ("batch", 80, "frames"))
DECODER_INPUTS = (TensorSpec("prev_frame", "float32", ("batch", 80)),
                  TensorSpec("decoder_masks", "float32", (2, "batch", 256)),
                  TensorSpec("cumulative", "float32", ("batch", "text")),
                  TensorSpec("encoder_seq", "float32", ("batch", "text", 1024)),
                  TensorSpec("chars", "int64", ("batch", "text")))
VOCODER_CONTRACT = {"mel": {"sample_rate": 22050, "hop_length": 256}}
SYNTH_MODEL = {"network": "tacotron", "config": {"n_symbols": 75}}


def test_length_range_from_data() -> None:
    cfg = ProfileConfig()
    assert length_range(range(10, 101), cfg) == (10, 55, 128)  # max 100 x 1.25 -> 125 -> multiple of 8
    tight = ProfileConfig(min_percentile=10, opt_percentile=50, max_percentile=90, max_headroom=1.0, round_to=1)
    assert length_range(range(1, 101), tight) == (10, 50, 91)
    assert length_range([7], cfg) == (7, 7, 16)
    with pytest.raises(ConfigError, match="no lengths"):
        length_range([], cfg)
    with pytest.raises(ConfigError, match="percentiles"):
        ProfileConfig(min_percentile=60, opt_percentile=50)


def test_profile_shapes_fill_symbolic_axes_and_keep_fixed_ones() -> None:
    ranges = axis_ranges({"text": [5, 20, 40], "frames": [100, 300]}, ProfileConfig(batch=(1, 2, 4)))
    assert ranges["text"] == (5, 20, 56) and ranges["batch"] == (1, 2, 4)
    shapes = profile_shapes(DECODER_INPUTS, ranges)
    assert shapes["decoder_masks"] == {"min": [2, 1, 256], "opt": [2, 2, 256], "max": [2, 4, 256]}
    assert shapes["encoder_seq"] == {"min": [1, 5, 1024], "opt": [2, 20, 1024], "max": [4, 56, 1024]}
    assert shapes["chars"]["max"] == [4, 56]
    wide = ProfileConfig.from_dict({"overrides": {"frames": [16, 256, 2048]}})
    overridden = axis_ranges({"frames": [100, 300]}, wide)
    assert profile_shapes([MEL], overridden)["mel"]["max"] == [1, 80, 2048]
    with pytest.raises(ConfigError, match="axis 'text' but no profile range.*overrides.text"):
        profile_shapes(DECODER_INPUTS, {"batch": (1, 1, 1)})
    with pytest.raises(ConfigError, match="for 'frames' must be"):
        ProfileConfig.from_dict({"overrides": {"frames": [300, 200, 100]}})


def test_shape_check_against_a_profile() -> None:
    shapes = profile_shapes([MEL], {"batch": (1, 1, 1), "frames": (8, 200, 800)})
    assert shape_problem(shapes, "mel", (1, 80, 8)) is None
    assert shape_problem(shapes, "mel", (1, 80, 800)) is None
    assert "outside the engine's profile [1, 80, 8]..[1, 80, 800]" in shape_problem(shapes, "mel", (1, 80, 801))
    assert "no input 'wav'" in shape_problem(shapes, "wav", (1, 1, 10))


def _component(name: str, corpus, model: dict, contract: dict, texts=()):
    """A component over a source record alone (profiles need its config, not its weights)."""
    from voxport.evaluate.components import EvaluationSettings, ValidationConfig, component_class

    source = Record(component=name, graph="*", format="torch", precision="fp32", file=f"{name}_fp32.pt",
                    sha256="0" * 64, weights="real", stage="source", model=model, contract=contract)
    settings = EvaluationSettings(validation=ValidationConfig(texts=tuple(texts)))
    return component_class(name)(Path("."), corpus, [source], settings)


def test_profiles_from_the_corpus_cover_every_recording_and_text(corpus) -> None:
    cfg = ProfileConfig()
    lengths, sources = _component("vocoder", corpus, {}, VOCODER_CONTRACT).axis_lengths()
    lo, opt, hi = axis_ranges(lengths, cfg)["frames"]
    frames = [int(i.duration_s * 22050) // 256 + 1 for i in corpus.items()]
    assert lo == min(frames) and hi >= max(frames) * 1.25 and lo <= opt <= hi
    assert opt == round(float(np.median(frames)))
    assert "corpus recordings" in sources["frames"]

    texts = compose_config().validation.texts
    lengths, sources = _component("synthesizer", corpus, SYNTH_MODEL, VOCODER_CONTRACT, texts).axis_lengths()
    from voxport.models.text import encode_text

    fragments = [len(ids) for t in texts for ids in encode_text(t, 75)]
    lo, _, hi = axis_ranges(lengths, cfg)["text"]
    assert lo <= min(fragments) and hi >= max(fragments)
    assert "configured + corpus transcripts" in sources["text"]

    from voxport.models.speaker_encoder import SpeakerEncoderConfig

    enc_model = {"network": "ge2e", "config": SpeakerEncoderConfig().to_dict()}
    lengths, _ = _component("speaker_encoder", corpus, enc_model, {}).axis_lengths()
    lo, opt, hi = axis_ranges(lengths, cfg)["batch"]  # partials per utterance are the encoder's batch
    assert lo >= 1 and hi > opt >= lo and hi >= max(lengths["batch"])


CPU_ONLY = Host(cpu_model="test", onnxruntime_providers=("CPUExecutionProvider",))
CUDA_NO_TRT = Host(cpu_model="test", cuda_available=True, gpus=({"name": "NVIDIA A10", "compute_capability": "8.6"},),
                   cuda_version="12.4")
CUDA_STUB_TRT = Host(**{**CUDA_NO_TRT.to_dict(), "tensorrt_version": "10.13.0",
                        "tensorrt_error": "OSError: libnvonnxparser.so.10: cannot open shared object file"})


@pytest.mark.parametrize(("host", "phrases"), [
    (CPU_ONLY, ["no CUDA device", "TensorRT is not installed"]),
    (CUDA_NO_TRT, ["TensorRT is not installed"]),
    (CUDA_STUB_TRT, ["TensorRT 10.13.0 is installed but cannot be imported", "libnvonnxparser"]),
])
def test_engine_build_refuses_in_one_line_without_cuda_or_tensorrt(host: Host, phrases: list[str]) -> None:
    with pytest.raises(BackendUnavailable) as err:
        require_tensorrt(host)
    message = str(err.value)
    assert message.startswith("cannot build TensorRT engines on this host: ") and "\n" not in message
    for phrase in phrases:
        assert phrase in message
    if host.cuda_available:
        assert "no CUDA device" not in message


def test_tensorrt_stage_on_this_host_fails_before_writing(tmp_path: Path, corpus) -> None:
    import torch
    from conftest import run_stage, stage_context

    if torch.cuda.is_available():
        pytest.skip("this host has CUDA: the refusal path is for CPU-only hosts")
    parent = Record(component="vocoder", graph="vocoder", format="onnx", precision="fp16",
                    file="vocoder_fp16.onnx", sha256="0" * 64, weights="real", stage="fp16", inputs=(MEL,))
    source = Record(component="vocoder", graph="vocoder", format="torch", precision="fp32", file="vocoder_fp32.pt",
                    sha256="0" * 64, weights="real", stage="source")
    ctx = stage_context(tmp_path, corpus, [source, parent],
                        {"vocoder": {"fp16": {"max_log_mel_increase_db": 0.1, "max_pesq_drop": 0.05}}})
    with pytest.raises(BackendUnavailable, match="cannot build TensorRT engines on this host: no CUDA device"):
        run_stage(ctx, "tensorrt", parent, {"graph": "vocoder"})
    assert list(tmp_path.iterdir()) == []


def test_strong_typing_follows_the_tensorrt_release() -> None:
    assert strongly_typed("10.12.0.36", "auto") and strongly_typed("11.0.0", "auto")
    assert not strongly_typed("10.11.0", "auto") and not strongly_typed("8.6.1", "auto")
    assert not strongly_typed("11.0.0", "never") and strongly_typed("10.3.0", "always")
    with pytest.raises(ConfigError, match="strongly_typed"):
        TensorRTConfig(strongly_typed="sometimes")
    with pytest.raises(ConfigError, match="unknown settings"):
        TensorRTConfig.from_settings({"workspace": 1})


class _Error:
    def __init__(self, node: int, name: str, op: str, desc: str) -> None:
        self._node, self._name, self._op, self._desc = node, name, op, desc

    def node(self) -> int:
        return self._node

    def node_name(self) -> str:
        return self._name

    def node_operator(self) -> str:
        return self._op

    def desc(self) -> str:
        return self._desc

    def code(self) -> str:
        return "ErrorCode.UNSUPPORTED_NODE"


def test_every_parser_error_is_reported(tmp_path: Path) -> None:
    errors = [_Error(12, "/generator/ups.0/ConvTranspose", "ConvTranspose", "unsupported dilation"),
              _Error(40, "/generator/Pad", "Pad", "reflect padding needs opset 18"),
              _Error(-1, "", "", "model has no graph output")]

    class Parser:
        num_errors = len(errors)

        def __init__(self, *_a) -> None:
            pass

        def parse_from_file(self, _path: str) -> bool:
            return False

        def get_error(self, i: int) -> _Error:
            return errors[i]

    described = parser_errors(Parser())
    assert described[0] == ("node 12 /generator/ups.0/ConvTranspose ConvTranspose: unsupported dilation "
                            "(ErrorCode.UNSUPPORTED_NODE)")
    assert described[2].startswith("graph: model has no graph output")
    class Logger:
        WARNING = 2

        def __init__(self, level: int) -> None:
            self.level = level

    builder = SimpleNamespace(create_network=lambda flags: object())
    trt = SimpleNamespace(__version__="10.13.0", Logger=Logger, OnnxParser=Parser, Builder=lambda logger: builder,
                          NetworkDefinitionCreationFlag=SimpleNamespace(STRONGLY_TYPED=0))
    with pytest.raises(EngineBuildError) as err:
        build_engine(trt, tmp_path / "vocoder_fp16.onnx", {}, TensorRTConfig(), fp16=True)
    message = str(err.value)
    assert message.startswith("vocoder_fp16.onnx: the TensorRT ONNX parser failed: ")
    for text in ("unsupported dilation", "reflect padding needs opset 18", "model has no graph output"):
        assert text in message


@pytest.mark.slow
def test_build_target_tensorrt_without_cuda_stops_in_one_line(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this host has CUDA")
    out = tmp_path / "artifacts" / "trt"
    run = subprocess.run([sys.executable, "-m", "voxport.cli", "build", "target=tensorrt", f"out_dir={out}"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith("voxport build: error: target 'tensorrt' cannot be built on this host: no CUDA")
    assert not out.parent.exists(), "a refused build must not write any artifact"


def test_gpu_targets_compose_their_stage_presets() -> None:
    trt = compose_config("target=tensorrt")
    kinds = [(e.kind, e.get("parent_precision", "fp32")) for e in trt.stages.vocoder]
    assert kinds == [("fp16", "fp32"), ("tensorrt", "fp16")]
    assert [e.graph for e in trt.stages.synthesizer if e.kind == "tensorrt"] == ["encoder", "decoder_step", "postnet"]
    assert list(trt.target.requires) == ["cuda", "tensorrt"] and trt.target.preference[0] == "trt"
    assert compose_config("target=cuda").stages.vocoder[0].kind == "fp16"
    assert compose_config("target=tensorrt", "stages=export_only").stages.vocoder == []  # explicit choice wins
    cpu = compose_config()
    assert list(cpu.target.requires) == [] and all(e.kind != "tensorrt" for e in cpu.stages.vocoder)
    assert TensorRTConfig.from_settings({**trt.tensorrt, "graph": "vocoder"}).profile.max_headroom == 1.25


# --- GPU: real engines (skipped without CUDA and TensorRT) ------------------------------------


def _gpu_ready() -> None:
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    pytest.importorskip("tensorrt", reason="needs TensorRT")


@pytest.fixture(scope="module")
def gpu_bundle(tmp_path_factory: pytest.TempPathFactory, corpus):
    """FP32 originals + exports, then FP16 ONNX and TensorRT engines of every graph, on this GPU."""
    _gpu_ready()
    from voxport.pipeline.engine import build_bundle

    out = tmp_path_factory.mktemp("gpu") / "bundle"
    cfg = compose_config("target=tensorrt", f"out_dir={out}", f"corpus_dir={corpus.root}",
                         f"tensorrt.timing_cache={out.parent / 'timing.cache'}", "timing.repeats=2")
    return build_bundle(cfg)


@pytest.mark.gpu
def test_gpu_engines_pass_the_fp16_gates_and_carry_their_fingerprint(gpu_bundle) -> None:
    from voxport.runtime.host import detect, fingerprint_mismatches

    engines = [r for r in gpu_bundle.records if r.format == "trt"]
    assert sorted(r.key for r in engines) == ["speaker_encoder/speaker_encoder", "synthesizer/decoder_step",
                                              "synthesizer/encoder", "synthesizer/postnet", "vocoder/vocoder"]
    host = detect()
    for r in engines:
        assert r.quality["passed"] and r.precision == "fp16"
        assert fingerprint_mismatches(r.host, host.fingerprint()) == []
        assert set(r.host["profiles"]) == {t.name for t in r.inputs}
        assert r.config["strongly_typed"] or r.config["fp16_builder_flag"]
    assert Path(engines[0].config["timing_cache"]).is_file()  # persisted for the next build
    vocoder = next(r for r in engines if r.component == "vocoder").quality
    assert vocoder["log_mel_distance_increase_db"] <= 0.1 and vocoder["pesq_drop"] <= 0.05
    encoder = next(r for r in engines if r.component == "speaker_encoder").quality
    assert encoder["embedding_cosine_min"] >= 0.9999 and encoder["decisions_changed"] == 0


@pytest.mark.gpu
def test_gpu_engine_output_matches_pytorch_fp32(gpu_bundle, corpus) -> None:
    from voxport.evaluate.inputs import speech_clips
    from voxport.models import registry
    from voxport.models.audio import MelConfig
    from voxport.runtime.backends.tensorrt import TensorRTBackend
    from voxport.runtime.cloner import VoiceCloner

    records = gpu_bundle.records
    source = next(r for r in records if r.component == "vocoder" and r.stage == "source")
    engine = next(r for r in records if r.component == "vocoder" and r.format == "trt")
    module = registry.load_torch_artifact(gpu_bundle.path / source.file, source.model)
    spec = registry.graph_specs(module, source.model)["vocoder"]
    clip = speech_clips(corpus, MelConfig.from_dict(source.contract["mel"]), 1, 2.0)[0]
    feed = {"mel": clip.mel[None].astype(np.float32)}
    import torch

    with torch.inference_mode():
        ref = spec.module(torch.from_numpy(feed["mel"]))[0].numpy()
    backend = TensorRTBackend()
    backend.load(engine, gpu_bundle.path)
    out = backend.infer(feed)["wav"]
    backend.close()
    assert out.shape == ref.shape
    snr = 10 * np.log10(np.sum(ref**2) / np.sum((ref - out) ** 2))
    assert snr > 25.0, f"TensorRT FP16 vocoder is {snr:.1f} dB from PyTorch FP32"
    cloner = VoiceCloner(gpu_bundle.path)
    assert all(s.format == "trt" for s in cloner.served.values()), {k: s.reason for k, s in cloner.served.items()}
    cloner.close()
