"""The serving runtime imports no torch unless a torch artifact is served.

torch costs seconds and hundreds of MB per process; a service of ONNX Runtime artifacts never needs
it. Each check runs in a fresh interpreter (`sys.executable -c`), since this test process has long
imported torch through other test modules.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

# Everything the `voxport serve` path imports, and the torch-free model modules under it.
SERVING_MODULES = (
    "voxport.runtime.cloner",
    "voxport.runtime.streaming",
    "voxport.runtime.synthesizer_loop",
    "voxport.runtime.backends",
    "voxport.runtime.backends.onnxruntime",
    "voxport.runtime.doctor",
    "voxport.runtime.serve.app",
    "voxport.runtime.serve.routes",
    "voxport.runtime.serve.service",
    "voxport.runtime.serve.engine",
    "voxport.runtime.serve.library",
    "voxport.runtime.serve.ray.proxy",
    "voxport.runtime.serve.ray.ingress",
    "voxport.models.speaker_frontend",
    "voxport.models.synthesizer_config",
    "voxport.models.synthesizer_io",
    "voxport.models.prenet_masks",
    "voxport.models.checkpoint",
)


def _run(code: str) -> str:
    """Run `code` in a fresh interpreter; its stdout (the test fails with its stderr if it fails)."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def test_serving_path_imports_no_torch() -> None:
    out = _run(f"""
        import importlib, sys
        for name in {SERVING_MODULES!r}:
            importlib.import_module(name)
        from voxport.models.prenet_masks import NumpyMasks
        from voxport.models.synthesizer_config import SynthesizerConfig
        from voxport.runtime.host import detect
        detect()  # no NVIDIA driver here: "no CUDA" without asking torch
        NumpyMasks(0).encoder(1, 5, SynthesizerConfig())
        print("torch" in sys.modules)
    """)
    assert out.strip() == "False"


@pytest.mark.slow  # a fresh interpreter importing torch: about 3 s
def test_torch_helpers_stay_importable_from_the_loop_module_and_load_torch() -> None:
    # The PyTorch helpers that lived in runtime/synthesizer_loop.py are still importable from it;
    # asking for one is what imports torch.
    out = _run("""
        import sys
        import voxport.runtime.synthesizer_loop as loop
        before = "torch" in sys.modules
        from voxport.runtime.synthesizer_loop import draw_prenet_masks, generate, module_runner, torch_runner
        from voxport.models.synthesizer_reference import generate as reference_generate
        assert generate is reference_generate
        print(before, "torch" in sys.modules)
    """)
    assert out.split() == ["False", "True"]


@pytest.mark.slow  # a fresh interpreter importing torch: about 3 s
def test_opening_a_torch_record_imports_torch(tmp_path: Path) -> None:
    # The torch backend is imported (with torch) only when a torch record is opened; the record
    # here names no real file, so loading then refuses it, after the import.
    out = _run(f"""
        import sys
        from pathlib import Path
        from voxport.errors import BackendUnavailable
        from voxport.pipeline.records import Record
        from voxport.runtime.backends import open_backend
        before = "torch" in sys.modules
        record = Record(component="vocoder", graph="*", format="torch", precision="fp32", file="absent.pt",
                        sha256="0" * 64, weights="seeded", stage="source")
        try:
            open_backend(record, Path({str(tmp_path)!r}), graph="vocoder")
            raise SystemExit("a record without its file loaded")
        except BackendUnavailable:
            pass
        print(before, "torch" in sys.modules)
    """)
    assert out.split() == ["False", "True"]


@pytest.mark.slow
def test_an_onnx_bundle_serves_without_torch_and_its_torch_originals_with_it(bundle: Path) -> None:
    """A real bundle: clone through the ONNX artifacts, torch-free; pick the torch originals, torch loads."""
    out = _run(f"""
        import sys
        import numpy as np
        from voxport.runtime.cloner import VoiceCloner

        cloner = VoiceCloner({str(bundle)!r}, preference=("cpu",), threads=1)
        formats = sorted({{s.format for s in cloner.served.values()}})
        embedding = np.ones(256, np.float32) / 16.0
        wav = cloner.vocode(cloner.synthesize("hello", embedding, seed=1, max_decoder_steps=4))
        chunks = list(cloner.stream("hello", embedding, seed=1, max_decoder_steps=4))
        cloner.close()
        print(formats, wav.size > 0, len(chunks) > 0, "torch" in sys.modules)
        torch_cloner = VoiceCloner({str(bundle)!r}, preference=("torch",), threads=1)
        print(sorted({{s.format for s in torch_cloner.served.values()}}), "torch" in sys.modules)
    """)
    onnx_line, torch_line = out.strip().splitlines()
    assert onnx_line == "['onnx'] True True False"
    assert torch_line == "['torch'] True"
