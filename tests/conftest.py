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

    # Tests never share the stage cache of the working tree (artifacts/.cache): a build a test
    # makes judges and times what it exports, unless the test names a cache of its own.
    if not any(o.startswith("cache_dir=") for o in overrides):
        overrides = ("cache_dir=null", *overrides)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides))


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread_per_session():
    """PyTorch intra-op threads pinned to 1 for the test session, restored afterwards.

    On this 2-core host, with anything else running, PyTorch's OpenMP workers spin against each other
    and the other processes: `pytest -m "not slow"` took 408 s with 2 threads and 123 s with 1 under the
    same load (LSTM and conv tests 5-10x slower each). Tests of thread handling set their own counts."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def corpus() -> Corpus:
    return load_corpus(build_corpus())


@pytest.fixture(scope="session")
def bundle(corpus: Corpus, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from voxport.pipeline.engine import build_bundle

    out = tmp_path_factory.mktemp("bundle") / "default"
    cfg = compose_config(
        "stages=export_only", f"out_dir={out}", f"corpus_dir={corpus.root}",
        # One 1 s vocoder clip: its parity reference is a float64 HiFi-GAN (about 4 s per second of audio
        # on one core); 2 x 1.5 s made this fixture half the fast tier's setup.
        "stack.synthesizer.max_decoder_steps=20", "validation.vocoder_clips=1", "validation.encoder_clips=1",
        "validation.max_clip_seconds=1.0", "validation.synthesizer_steps=8",
    )
    return build_bundle(cfg).path


def stage_context(bundle_dir: Path, corpus: Corpus, records: list, gates: dict, **settings):
    """A BuildContext over a private bundle directory, as the engine makes one for a build; short
    inputs for tests: any `validation` setting (e.g. `gate_seconds`, `vocoder_clips`, `texts`),
    `timing_seconds`, `timing_repeats`."""
    import dataclasses

    from voxport.evaluate.components import ValidationConfig
    from voxport.pipeline.engine import BuildContext, TimingConfig

    fields = {f.name for f in dataclasses.fields(ValidationConfig)}
    validation = ValidationConfig.from_dict({k: settings.pop(k) for k in list(settings) if k in fields})
    timing = TimingConfig(repeats=settings.pop("timing_repeats", 1), seconds=settings.pop("timing_seconds", 1.0))
    return BuildContext(bundle_dir=bundle_dir, corpus=corpus, records=records, gates=gates, validation=validation,
                        timing=timing, **settings)


def run_stage(ctx, kind: str, parent, settings: dict):
    """One stage through the engine (transform, judge, time, record); its last record (the one a
    stage of that kind is about: an INT8 artifact, a pruned model)."""
    from voxport.pipeline.engine import run_stage as engine_run_stage

    return engine_run_stage(ctx, kind, parent, settings, graph=settings.get("graph"))[-1]
