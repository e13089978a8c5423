"""Shared fixtures.

`corpus`: the real-speech corpus, built once (about 10 s, needs apt) if missing.
`compose_config(*overrides)`: the Hydra config as `voxport build` composes it.
`bundle`: one small bundle (FP32 originals + validated ONNX exports, no optimization stages) built
once per test session into a temporary directory and shared by every test that needs artifacts.
"""

from pathlib import Path

import pytest

from voxport.evaluate.corpus import Corpus, build_corpus, load_corpus

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def compose_config(*overrides: str):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides))


@pytest.fixture(scope="session")
def corpus() -> Corpus:
    return load_corpus(build_corpus())


@pytest.fixture(scope="session")
def bundle(corpus: Corpus, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from voxport.pipeline.engine import build_bundle

    out = tmp_path_factory.mktemp("bundle") / "default"
    cfg = compose_config(
        "stages=export_only", f"out_dir={out}", f"corpus_dir={corpus.root}",
        "stack.synthesizer.max_decoder_steps=20", "validation.vocoder_clips=2",
        "validation.max_clip_seconds=1.5", "validation.synthesizer_steps=12",
    )
    return build_bundle(cfg).path
