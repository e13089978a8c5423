"""One runner: every ONNX Runtime session of the product is opened by runtime/backends/onnxruntime.py,
with the SessionSettings the build timed an artifact under (recorded in `speed.session`), so the
speeds selection ranks by are the speeds serving gets. Tiny models built here; no weights needed."""

import os
import re
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper

from voxport.errors import BackendUnavailable, ConfigError
from voxport.export.onnx import ort_runner
from voxport.models.checkpoint import sha256_file
from voxport.pipeline.records import Record, TensorSpec
from voxport.runtime.backends import open_first
from voxport.runtime.backends.onnxruntime import OnnxRuntimeBackend, SessionSettings, open_session
from voxport.runtime.select import Selection

REPO = Path(__file__).resolve().parents[1]  # the repo root is the voxport package
SKIP_DIRS = {"tests", ".venv", "artifacts", "outputs", ".voxport", ".git", "__pycache__"}
SPINNING = ("session.intra_op.allow_spinning", "session.inter_op.allow_spinning")


def _model_bytes(scale: float = 2.0) -> bytes:
    node = helper.make_node("Mul", ["mel", "k"], ["wav"])
    graph = helper.make_graph(
        [node], "tiny", [helper.make_tensor_value_info("mel", TensorProto.FLOAT, ["batch", 80, "frames"])],
        [helper.make_tensor_value_info("wav", TensorProto.FLOAT, ["batch", 80, "frames"])],
        [helper.make_tensor("k", TensorProto.FLOAT, [], [scale])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9).SerializeToString()


def _artifact(tmp_path: Path, session: dict | None) -> Record:
    """A tiny ONNX artifact on disk and its record, whose speed.session is `session`."""
    path = tmp_path / "vocoder_int8.onnx"
    path.write_bytes(_model_bytes())
    spec = TensorSpec("mel", "float32", ("batch", 80, "frames"))
    return Record(component="vocoder", graph="vocoder", format="onnx", precision="int8-static", file=path.name,
                  sha256=sha256_file(path), weights="real", stage="quantize-static", inputs=(spec,),
                  outputs=(TensorSpec("wav", "float32", ("batch", 80, "frames")),),
                  speed={"session": session} if session is not None else {})


def _options_say(session, settings: SessionSettings) -> None:
    """The session's own options (read back from ORT) are `settings`."""
    import onnxruntime as ort

    opts = session.get_session_options()
    levels = {"disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
              "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    assert opts.graph_optimization_level == levels[settings.graph_optimization]
    assert opts.intra_op_num_threads == settings.intra_op_threads
    assert opts.inter_op_num_threads == settings.inter_op_threads
    spin = "1" if settings.allow_spinning else "0"
    assert [opts.get_session_config_entry(key) for key in SPINNING] == [spin, spin]
    assert opts.enable_cpu_mem_arena == (settings.cpu_arena != "disabled")


def _product_files() -> list[Path]:
    files = []
    for root, dirs, names in os.walk(REPO):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.startswith(".")]
        rel_root = Path(root).relative_to(REPO)
        for name in names:
            if not name.endswith(".py"):
                continue
            if rel_root == Path("benchmarks") and name.startswith("test_"):
                continue
            files.append(Path(root) / name)
    return files


def test_exactly_one_place_in_the_product_opens_an_onnxruntime_session() -> None:
    files = _product_files()
    assert REPO / "runtime" / "backends" / "onnxruntime.py" in files and len(files) > 20
    hits = [(str(p.relative_to(REPO)), n) for p in files
            if (n := len(re.findall(r"InferenceSession\(", p.read_text(encoding="utf-8"))))]
    assert hits == [("runtime/backends/onnxruntime.py", 1)]


def test_session_settings_round_trip_and_read_old_records() -> None:
    tuned = SessionSettings(graph_optimization="extended", intra_op_threads=3, inter_op_threads=2,
                            allow_spinning=True)
    assert SessionSettings.from_dict(tuned.to_dict()) == tuned
    assert set(tuned.to_dict()) == {"graph_optimization", "intra_op_threads", "inter_op_threads", "allow_spinning",
                                    "cpu_arena"}
    # Old records carry only the level; the rest takes the defaults. Timing figures beside it are ignored.
    old = {"graph_optimization_level": "extended", "medians_s": {"all": 1.2, "extended": 1.1}}
    assert SessionSettings.from_dict(old) == SessionSettings(graph_optimization="extended")
    assert SessionSettings.from_dict(None) == SessionSettings.from_dict({}) == SessionSettings()
    assert SessionSettings().with_overrides(intra_op_threads=2, allow_spinning=None) == SessionSettings(
        intra_op_threads=2)
    with pytest.raises(ConfigError, match="intra_op_threads"):
        SessionSettings(intra_op_threads=-1)
    with pytest.raises(ConfigError, match="'threads'"):
        SessionSettings().with_overrides(threads=2)


def test_a_backend_opens_an_artifact_with_the_settings_its_record_carries(tmp_path: Path) -> None:
    record = _artifact(tmp_path, {"graph_optimization": "extended", "intra_op_threads": 1, "inter_op_threads": 1,
                                  "allow_spinning": False, "medians_s": {"all": 0.2, "extended": 0.1}})
    backend = OnnxRuntimeBackend()
    backend.load(record, tmp_path)
    assert backend.settings == SessionSettings(graph_optimization="extended", intra_op_threads=1)
    _options_say(backend.session, backend.settings)
    assert np.allclose(backend.infer({"mel": np.ones((1, 80, 3), np.float32)})["wav"], 2.0)
    # The old form of the record means the same level.
    old = OnnxRuntimeBackend()
    old.load(_artifact(tmp_path, {"graph_optimization_level": "extended"}), tmp_path)
    assert old.settings == SessionSettings(graph_optimization="extended")
    # An override replaces only its field; explicit settings replace the record's outright.
    pinned = OnnxRuntimeBackend(intra_op_threads=2)
    pinned.load(record, tmp_path)
    assert pinned.settings == SessionSettings(graph_optimization="extended", intra_op_threads=2)
    _options_say(pinned.session, pinned.settings)
    explicit = OnnxRuntimeBackend(settings=SessionSettings(graph_optimization="basic"))
    explicit.load(record, tmp_path)
    assert explicit.settings == SessionSettings(graph_optimization="basic")
    _options_say(explicit.session, explicit.settings)


def test_the_runtime_keeps_recorded_settings_unless_threads_are_pinned(tmp_path: Path) -> None:
    record = _artifact(tmp_path, {"graph_optimization": "extended", "intra_op_threads": 1})
    choice = Selection(record, "test", "cpu")
    recorded, _, _ = open_first([choice], tmp_path, "vocoder", host=None)  # host is only read for engines
    assert recorded.settings == SessionSettings(graph_optimization="extended", intra_op_threads=1)
    pinned, _, _ = open_first([choice], tmp_path, "vocoder", host=None, threads=2)
    assert pinned.settings == SessionSettings(graph_optimization="extended", intra_op_threads=2)


def test_the_memory_arena_policy_is_a_deployment_override(tmp_path: Path) -> None:
    """serve.cpu_arena reaches the session (arena off) or every run (shrinkage), over whatever the
    record says, and gives the same outputs; a wrong policy is named."""
    record = _artifact(tmp_path, {"graph_optimization": "extended", "intra_op_threads": 1})
    choice = Selection(record, "test", "cpu")
    feed = {"mel": np.ones((1, 80, 3), np.float32)}
    for policy in ("keep", "shrink", "disabled"):
        backend, _, _ = open_first([choice], tmp_path, "vocoder", host=None, cpu_arena=policy)
        expected = SessionSettings(graph_optimization="extended", intra_op_threads=1, cpu_arena=policy)
        assert backend.settings == expected
        _options_say(backend.session, expected)
        assert (backend._run_options is not None) == (policy == "shrink")
        for _ in range(2):  # a shrunk arena serves the next run as well
            assert np.allclose(backend.infer(feed)["wav"], 2.0)
    with pytest.raises(ConfigError, match="cpu_arena must be one of keep, shrink, disabled"):
        SessionSettings(cpu_arena="on")


def test_spinning_is_off_in_both_pools_by_default(tmp_path: Path) -> None:
    assert SessionSettings().allow_spinning is False
    _options_say(open_session(_model_bytes()), SessionSettings())
    # The build-time runners are the runtime backend, with the same defaults.
    path = tmp_path / "m.onnx"
    path.write_bytes(_model_bytes())
    run = ort_runner(path, 1, "extended")
    assert run.__self__.settings == SessionSettings(graph_optimization="extended", intra_op_threads=1)
    _options_say(run.__self__.session, run.__self__.settings)
    serialized = OnnxRuntimeBackend.from_file(_model_bytes(3.0))  # a candidate held in memory
    assert serialized.settings == SessionSettings()
    _options_say(serialized.session, SessionSettings())
    assert np.allclose(serialized.infer({"mel": np.ones((1, 80, 2), np.float32)})["wav"], 3.0)
    spinning = OnnxRuntimeBackend.from_file(path, SessionSettings(allow_spinning=True))
    _options_say(spinning.session, SessionSettings(allow_spinning=True))


def test_an_unknown_level_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown graph optimization level 'turbo'"):
        SessionSettings(graph_optimization="turbo")
    with pytest.raises(ConfigError, match="'turbo'"):
        SessionSettings.from_dict({"graph_optimization_level": "turbo"})
    with pytest.raises(ConfigError, match="'turbo'"):
        ort_runner(tmp_path / "never_opened.onnx", 0, "turbo")
    # From a record: BackendUnavailable, so the runtime can fall back to the next artifact.
    with pytest.raises(BackendUnavailable, match=r"vocoder_int8\.onnx.*unknown graph optimization level 'turbo'"):
        OnnxRuntimeBackend().load(_artifact(tmp_path, {"graph_optimization": "turbo"}), tmp_path)


def test_providers_this_host_lacks_are_refused() -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this host has ONNX Runtime CUDA")
    with pytest.raises(BackendUnavailable, match="CUDAExecutionProvider.*not available here"):
        OnnxRuntimeBackend.from_file(_model_bytes(), providers=("CUDAExecutionProvider", "CPUExecutionProvider"))
