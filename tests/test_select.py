"""Artifact selection over simulated hosts, engine fingerprints, host requirements, and the
runtime's refusal of artifacts that changed or were built for another GPU."""

import dataclasses
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from voxport.errors import BackendUnavailable
from voxport.models.checkpoint import sha256_file
from voxport.pipeline.records import Record, TensorSpec, write_manifest, write_record
from voxport.runtime.host import (
    Host,
    fingerprint_mismatches,
    missing_requirements,
    parse_driver_version,
    require_target,
)
from voxport.runtime.select import DEFAULT_PREFERENCE, Selection, ranked, select

A10 = {"name": "NVIDIA A10", "compute_capability": "8.6", "memory_mb": 22731}
L4 = {"name": "NVIDIA L4", "compute_capability": "8.9", "memory_mb": 22491}
CPU_ONLY = Host(cpu_model="test cpu", cores=2, cpu_flags=("avx2", "fma"),
                onnxruntime_providers=("CPUExecutionProvider",))
CPU_BF16 = Host(cpu_model="test cpu", cores=2, cpu_flags=("avx512f", "avx512_vnni", "avx512_bf16"),
                onnxruntime_providers=("CPUExecutionProvider",))
CUDA_ONLY = Host(cpu_model="test cpu", cores=8, onnxruntime_providers=("CUDAExecutionProvider", "CPUExecutionProvider"),
                 cuda_available=True, gpus=(A10,), cuda_version="12.4", driver_version="550.54.14")
TRT_A10 = Host(**{**CUDA_ONLY.to_dict(), "gpus": (A10,), "tensorrt_version": "10.13.0.35"})
TRT_L4 = Host(**{**TRT_A10.to_dict(), "gpus": (L4,)})
TRT_NEWER = Host(**{**TRT_A10.to_dict(), "tensorrt_version": "10.14.1"})
TRT_STUB = Host(**{**TRT_A10.to_dict(), "tensorrt_error": "OSError: libnvonnxparser.so.11: cannot open shared object"})
ENGINE_FP = {"gpu": "NVIDIA A10", "compute_capability": "8.6", "tensorrt": "10.13.0.35", "cuda": "12.4",
             "driver": "550.54.14", "profiles": {"mel": {"min": [1, 80, 8], "opt": [1, 80, 200], "max": [1, 80, 800]}}}
MEL = (TensorSpec("mel", "float32", ("batch", 80, "frames")),)
WAV = (TensorSpec("wav", "float32", ("batch", 1, "samples")),)


def rec(file: str, fmt: str, precision: str, stage: str, graph: str = "vocoder", ratio: float | None = None,
        host: dict | None = None, sha: str = "0" * 64) -> Record:
    return Record(component="vocoder", graph=graph, format=fmt, precision=precision, file=file, sha256=sha,
                  weights="real", stage=stage, inputs=MEL, outputs=WAV,
                  speed={"speedup_vs_torch_fp32": ratio} if ratio else {}, host=host or {})


BUNDLE = [
    rec("vocoder_fp32.pt", "torch", "fp32", "source", graph="*"),
    rec("vocoder_fp32.onnx", "onnx", "fp32", "export"),
    rec("vocoder_int8.onnx", "onnx", "int8-static", "quantize-static", ratio=3.1),
    rec("vocoder_bf16.pt", "torch", "bf16", "bf16", ratio=3.5),
    rec("vocoder_fp16.onnx", "onnx", "fp16", "fp16", ratio=0.8),
    rec("vocoder_fp16.plan", "trt", "fp16", "tensorrt", host=ENGINE_FP),
]

# host, preference, expected file, expected tier, phrases the reason must contain
TABLE = [
    (CPU_ONLY, DEFAULT_PREFERENCE, "vocoder_int8.onnx", "cpu",
     ["3.10x PyTorch FP32", "trt: 1 engine(s) in the bundle, but no CUDA device", "onnx-cuda: no CUDA device"]),
    (CPU_BF16, DEFAULT_PREFERENCE, "vocoder_bf16.pt", "cpu", ["torch bf16 on CPU, 3.50x"]),
    (CPU_ONLY, ("onnx", "torch"), "vocoder_int8.onnx", "onnx", ["first preference"]),
    (CPU_ONLY, ("torch",), "vocoder_fp32.pt", "torch", ["PyTorch FP32 original"]),
    (CUDA_ONLY, DEFAULT_PREFERENCE, "vocoder_fp16.onnx", "onnx-cuda",
     ["onnx fp16 on ONNX Runtime CUDA", "TensorRT is not usable here"]),
    (TRT_STUB, DEFAULT_PREFERENCE, "vocoder_fp16.onnx", "onnx-cuda", ["libnvonnxparser"]),
    (TRT_A10, DEFAULT_PREFERENCE, "vocoder_fp16.plan", "trt", ["NVIDIA A10", "first preference"]),
    (TRT_L4, DEFAULT_PREFERENCE, "vocoder_fp16.onnx", "onnx-cuda",
     ["gpu 'NVIDIA A10' (engine) != 'NVIDIA L4' (host)", "compute_capability '8.6' (engine) != '8.9' (host)"]),
    (TRT_NEWER, DEFAULT_PREFERENCE, "vocoder_fp16.onnx", "onnx-cuda", ["tensorrt '10.13.0.35' (engine) != '10.14.1'"]),
]


@pytest.mark.parametrize(("host", "preference", "file", "tier", "phrases"), TABLE)
def test_selection_table_over_simulated_hosts(host, preference, file, tier, phrases) -> None:
    choice = select(BUNDLE, "vocoder", "vocoder", host, preference)
    assert isinstance(choice, Selection)
    assert (choice.record.file, choice.tier) == (file, tier), choice.reason
    for phrase in phrases:
        assert phrase in choice.reason
    record, reason = choice  # call sites unpack (record, reason)
    assert record is choice.record and reason == choice.reason


def test_engine_with_mismatched_fingerprint_is_never_a_candidate() -> None:
    for host in (CPU_ONLY, CUDA_ONLY, TRT_L4, TRT_NEWER, TRT_STUB):
        files = [c.record.file for c in ranked(BUNDLE, "vocoder", "vocoder", host)]
        assert "vocoder_fp16.plan" not in files
        assert files[-1] == "vocoder_fp32.pt"  # the PyTorch original is always the last resort


def test_cpu_tier_never_serves_gpu_or_unsupported_artifacts() -> None:
    files = [c.record.file for c in ranked(BUNDLE, "vocoder", "vocoder", CPU_ONLY, ("cpu",))]
    assert files == ["vocoder_int8.onnx", "vocoder_fp32.onnx"]  # fastest first; no fp16, no bf16 here
    gpu_only = [r for r in BUNDLE if r.precision == "fp16" or r.stage == "source"]
    with pytest.raises(BackendUnavailable, match="GPU artifact"):
        select(gpu_only, "vocoder", "vocoder", CPU_ONLY, ("cpu",))


def test_an_openvino_ir_serves_on_cpu_where_it_measured_fastest_and_bf16_only_where_native() -> None:
    """OpenVINO is an engine of the `cpu` tier: ranked by its measured speed like the others; one that
    runs its float parts in bfloat16 never serves where the CPU would emulate it, and says why."""
    ir = rec("vocoder_int8_openvino.xml", "openvino", "int8-static", "openvino", ratio=3.6)
    choice = select([*BUNDLE, ir], "vocoder", "vocoder", CPU_ONLY)
    assert choice.record.file == ir.file and choice.tier == "cpu"
    assert choice.reason.startswith("openvino int8-static on CPU, 3.60x PyTorch FP32 measured")
    assert [c.record.file for c in ranked([*BUNDLE, ir], "vocoder", "vocoder", CPU_ONLY, ("onnx",))][0] \
        == "vocoder_int8.onnx"  # the `onnx` tier stays ONNX Runtime's
    bf16 = dataclasses.replace(ir, config={"inference_precision": "bf16"})
    assert select([*BUNDLE, bf16], "vocoder", "vocoder", CPU_BF16).record.file == bf16.file
    files = [c.record.file for c in ranked([*BUNDLE, bf16], "vocoder", "vocoder", CPU_ONLY, ("cpu",))]
    assert bf16.file not in files
    with pytest.raises(BackendUnavailable, match="vocoder_int8_openvino.xml needs native bfloat16"):
        select([BUNDLE[0], bf16], "vocoder", "vocoder", CPU_ONLY, ("cpu",))


def test_unmeasured_fp32_export_beats_a_measured_slower_artifact() -> None:
    slow = rec("vocoder_pruned.onnx", "onnx", "fp32", "prune", ratio=0.7)
    choice = select([BUNDLE[0], BUNDLE[1], slow], "vocoder", "vocoder", CPU_ONLY)
    assert choice.record.file == "vocoder_fp32.onnx" and "speed not measured" in choice.reason


def test_fp32_export_timed_as_a_parent_beats_its_slower_int8_child() -> None:
    """The real encoder case: INT8 with its first LSTM float is 1.29x PyTorch, its FP32 ONNX
    parent (timed beside it) 1.51x; the runtime must serve the parent."""
    child = dataclasses.replace(rec("vocoder_int8.onnx", "onnx", "int8-dynamic", "quantize-dynamic"),
                                parent="vocoder_fp32.onnx",
                                speed={"speedup_vs_torch_fp32": 1.29, "parent_speedup_vs_torch_fp32": 1.51})
    choice = select([BUNDLE[0], BUNDLE[1], child], "vocoder", "vocoder", CPU_ONLY)
    assert choice.record.file == "vocoder_fp32.onnx"
    assert "1.51x PyTorch FP32 measured beside its INT8 children" in choice.reason


def test_strict_mode_refuses_fallback() -> None:
    with pytest.raises(BackendUnavailable, match="strict mode and first preference 'trt'.*no CUDA device"):
        select(BUNDLE, "vocoder", "vocoder", CPU_ONLY, DEFAULT_PREFERENCE, strict=True)
    with pytest.raises(BackendUnavailable, match="strict.*'onnx-cuda'"):
        select(BUNDLE, "vocoder", "vocoder", CPU_ONLY, ("onnx-cuda", "cpu"), strict=True)
    only = ranked(BUNDLE, "vocoder", "vocoder", TRT_A10, DEFAULT_PREFERENCE, strict=True)
    assert [c.record.file for c in only] == ["vocoder_fp16.plan"]


def test_selection_errors_name_the_problem() -> None:
    with pytest.raises(BackendUnavailable, match="no artifact for synthesizer/postnet"):
        select(BUNDLE, "synthesizer", "postnet", CPU_ONLY)
    with pytest.raises(BackendUnavailable, match="unknown preference 'gpu'"):
        select(BUNDLE, "vocoder", "vocoder", CPU_ONLY, ("gpu",))
    with pytest.raises(BackendUnavailable, match="nothing in the bundle can serve"):
        select([BUNDLE[5]], "vocoder", "vocoder", CPU_ONLY)


def test_fingerprint_matching_rules() -> None:
    host = TRT_A10.fingerprint()
    assert fingerprint_mismatches(ENGINE_FP, host) == []
    assert fingerprint_mismatches({**ENGINE_FP, "driver": "535.104.05"}, host) == []  # newer driver: fine
    older = fingerprint_mismatches({**ENGINE_FP, "driver": "560.28.03"}, host)
    assert older == ["driver 550.54.14 (host) is older than 560.28.03 (engine)"]
    assert fingerprint_mismatches({**ENGINE_FP, "cuda": "12.8"}, host) == []  # same major
    assert "major version" in fingerprint_mismatches({**ENGINE_FP, "cuda": "13.0"}, host)[0]
    assert fingerprint_mismatches(ENGINE_FP, CPU_ONLY.fingerprint()) == ["this host has no CUDA GPU"]
    assert fingerprint_mismatches(ENGINE_FP, CUDA_ONLY.fingerprint()) == ["TensorRT is not usable on this host"]
    assert len(fingerprint_mismatches(ENGINE_FP, TRT_L4.fingerprint())) == 2


def test_driver_version_parsing() -> None:
    text = ("NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.14  Thu Feb 22 01:44:30 UTC 2024\n"
            "GCC version:  gcc version 12.2.0 (Debian 12.2.0-14)\n")
    assert parse_driver_version(text) == "550.54.14"
    open_module = "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  570.86.15  Release Build\n"
    assert parse_driver_version(open_module) == "570.86.15"
    assert parse_driver_version("no driver here") is None


def _needs(*kinds: str) -> dict:
    from voxport.pipeline.passes import pass_kind

    return {kind: pass_kind(kind).requires for kind in kinds}


def test_target_requirements_are_checked_in_one_line() -> None:
    require_target({"name": "cpu", "requires": []}, CPU_ONLY)
    with pytest.raises(BackendUnavailable) as err:
        require_target({"name": "tensorrt", "requires": ["cuda", "tensorrt"]}, CPU_ONLY)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("target 'tensorrt' cannot be built on this host")
    assert "no CUDA device" in message and "TensorRT is not installed" in message
    with pytest.raises(BackendUnavailable, match="^target 'cpu' with tensorrt stages cannot be built on this host"):
        require_target({"name": "cpu", "requires": []}, CPU_ONLY, stages=_needs("fp16", "tensorrt"))
    require_target({"name": "cpu", "requires": []}, CPU_ONLY, stages=_needs("fp16", "quantize_static"))
    with pytest.raises(BackendUnavailable, match="^target 'tensorrt' cannot be built"):  # stages add nothing new
        require_target({"name": "tensorrt", "requires": ["cuda", "tensorrt"]}, CPU_ONLY, stages=_needs("tensorrt"))
    assert missing_requirements(["cuda", "tensorrt"], TRT_A10) == []
    assert missing_requirements(["tensorrt"], TRT_STUB)[0].startswith("TensorRT 10.13.0.35 is installed but cannot")
    assert missing_requirements(["onnxruntime-cuda"], CPU_ONLY)[0].startswith("ONNX Runtime has no CUDA")
    with pytest.raises(BackendUnavailable, match="unknown host requirement 'tpu'"):
        missing_requirements(["tpu"], CPU_ONLY)


# --- the runtime refuses what changed or does not belong to this host ------------------------


def _tiny_onnx(path: Path, scale: float) -> Path:
    node = helper.make_node("Mul", ["mel", "k"], ["y"])
    reduce = helper.make_node("ReduceMean", ["y"], ["wav"], axes=[1], keepdims=1)
    graph = helper.make_graph(
        [node, reduce], "tiny", [helper.make_tensor_value_info("mel", TensorProto.FLOAT, ["batch", 80, "frames"])],
        [helper.make_tensor_value_info("wav", TensorProto.FLOAT, ["batch", 1, "frames"])],
        [helper.make_tensor("k", TensorProto.FLOAT, [], [scale])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), path)
    return path


def test_a_record_whose_sha256_does_not_match_is_refused(tmp_path: Path) -> None:
    from voxport.runtime.backends.onnxruntime import OnnxRuntimeBackend
    from voxport.runtime.backends.tensorrt import TensorRTBackend

    path = _tiny_onnx(tmp_path / "vocoder_fp32.onnx", 1.0)
    good = rec(path.name, "onnx", "fp32", "export", sha=sha256_file(path))
    OnnxRuntimeBackend().load(good, tmp_path)
    changed = good.replace(sha256="f" * 64)
    with pytest.raises(BackendUnavailable, match="sha256 .* does not match its record"):
        OnnxRuntimeBackend().load(changed, tmp_path)
    engine = tmp_path / "vocoder_fp16.plan"
    engine.write_bytes(b"not the engine that was validated")
    record = rec(engine.name, "trt", "fp16", "tensorrt", host=ENGINE_FP, sha="a" * 64)
    with pytest.raises(BackendUnavailable, match="sha256"):  # fingerprint matches, the file does not
        TensorRTBackend(host=TRT_A10).load(record, tmp_path)


def test_onnxruntime_backend_runs_with_the_optimization_level_its_stage_measured_fastest(tmp_path: Path) -> None:
    from voxport.runtime.backends.onnxruntime import OnnxRuntimeBackend, recorded_settings

    path = _tiny_onnx(tmp_path / "vocoder_int8.onnx", 2.0)
    plain = rec(path.name, "onnx", "int8-static", "quantize-static", sha=sha256_file(path))
    tuned = plain.replace(speed={"speedup_vs_torch_fp32": 2.6, "session": {"graph_optimization_level": "extended"}})
    for record, level in ((plain, "all"), (tuned, "extended")):
        backend = OnnxRuntimeBackend()
        backend.load(record, tmp_path)
        assert backend.graph_optimization == level
        out = backend.infer({"mel": np.ones((1, 80, 4), dtype=np.float32)})["wav"]
        assert np.allclose(out, 2.0)  # same answer at either level
    cuda = recorded_settings(tuned, ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert cuda.graph_optimization == "all"  # CPU timing only
    with pytest.raises(BackendUnavailable, match="unknown graph optimization level 'turbo'"):
        OnnxRuntimeBackend().load(plain.replace(speed={"session": {"graph_optimization_level": "turbo"}}), tmp_path)


def test_an_engine_for_another_host_is_never_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from voxport.runtime.backends import tensorrt as trt_backend

    def read(*_a, **_k):
        raise AssertionError("the engine file was read although its fingerprint does not match")

    monkeypatch.setattr(trt_backend, "verified_artifact", read)
    record = rec("vocoder_fp16.plan", "trt", "fp16", "tensorrt", host=ENGINE_FP)
    for host in (CPU_ONLY, TRT_L4, TRT_NEWER):
        with pytest.raises(BackendUnavailable, match="engine fingerprint does not match this host"):
            trt_backend.TensorRTBackend(host=host).load(record, tmp_path)


def test_runtime_falls_back_past_a_refused_artifact_and_says_why(tmp_path: Path) -> None:
    from voxport.runtime.backends import open_first

    fast = _tiny_onnx(tmp_path / "vocoder_int8.onnx", 2.0)
    plain = _tiny_onnx(tmp_path / "vocoder_fp32.onnx", 1.0)
    records = [rec(fast.name, "onnx", "int8-static", "quantize-static", ratio=3.0, sha="b" * 64),  # tampered
               rec(plain.name, "onnx", "fp32", "export", sha=sha256_file(plain))]
    for r in records:
        write_record(r, tmp_path)
    write_manifest(tmp_path, records, {})
    choices = ranked(records, "vocoder", "vocoder", CPU_ONLY, ("cpu",))
    assert [c.record.file for c in choices] == ["vocoder_int8.onnx", "vocoder_fp32.onnx"]
    backend, choice, reason = open_first(choices, tmp_path, "vocoder", CPU_ONLY)
    assert choice.record.file == "vocoder_fp32.onnx" and backend.providers == ["CPUExecutionProvider"]
    assert "vocoder_int8.onnx refused" in reason and "sha256" in reason
    out = backend.infer({"mel": np.ones((1, 80, 5), np.float32)})["wav"]
    assert np.allclose(out, 1.0)  # the plain model (scale 1), not the tampered one (scale 2)
    strict = ranked(records, "vocoder", "vocoder", CPU_ONLY, ("onnx",), strict=True)
    with pytest.raises(BackendUnavailable, match="sha256"):
        open_first(strict, tmp_path, "vocoder", CPU_ONLY, strict=True)


def test_detect_describes_this_host_consistently() -> None:
    from voxport.runtime.host import detect

    host = detect()
    assert host.cores >= 1 and "CPUExecutionProvider" in host.onnxruntime_providers
    fingerprint = host.fingerprint()
    assert set(fingerprint) == {"gpu", "compute_capability", "tensorrt", "cuda", "driver"}
    if not host.cuda_available:
        assert fingerprint["gpu"] is None and not host.tensorrt_usable and not host.onnxruntime_cuda


def test_doctor_says_what_serves_each_graph_and_why(tmp_path: Path) -> None:
    from voxport.runtime.doctor import report

    plain = _tiny_onnx(tmp_path / "vocoder_fp32.onnx", 1.0)
    records = [rec(plain.name, "onnx", "fp32", "export", sha=sha256_file(plain)),
               rec("vocoder_fp16.plan", "trt", "fp16", "tensorrt", host=ENGINE_FP)]
    (tmp_path / "vocoder_fp16.plan").write_bytes(b"engine")
    for r in records:
        write_record(r, tmp_path)
    write_manifest(tmp_path, records, {})
    text = report(tmp_path, host=TRT_L4)
    assert "gpu: NVIDIA L4 (compute capability 8.9)" in text and "tensorrt: 10.13.0.35" in text
    line = next(x for x in text.splitlines() if x.strip().startswith("vocoder/vocoder:"))
    assert "vocoder_fp32.onnx" in line and "onnx-cuda" in line and "gpu 'NVIDIA A10' (engine)" in line
    assert "speaker_encoder/speaker_encoder: unavailable: no artifact" in text
