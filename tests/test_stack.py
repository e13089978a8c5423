"""Stacks: the default stack's contracts, and a MockingBird-format checkpoint set loaded by shapes."""

from pathlib import Path

import pytest
import torch
from conftest import compose_config

from voxport.errors import CheckpointError, ConfigError
from voxport.models import vocoder
from voxport.models.speaker_encoder import seeded_speaker_encoder
from voxport.models.stack import load_stack
from voxport.models.synthesizer import SynthesizerConfig, seeded_synthesizer


def _weight_normed(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """MockingBird/jik876 files keep weight norm: weight -> (weight_g, weight_v)."""
    out = {}
    for key, value in state.items():
        if key.endswith(".weight") and value.dim() == 3:
            base = key[: -len(".weight")]
            out[f"{base}.weight_g"] = value.flatten(1).norm(dim=1).reshape(-1, 1, 1)
            out[f"{base}.weight_v"] = value
        else:
            out[key] = value
    return out


@pytest.fixture(scope="module")
def mockingbird_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mb")
    enc = seeded_speaker_encoder(seed=1).state_dict()
    enc |= {"similarity_weight": torch.tensor([10.0]), "similarity_bias": torch.tensor([-5.0])}
    torch.save({"step": 5, "model_state": enc}, root / "encoder.pt")
    syn = seeded_synthesizer(SynthesizerConfig(variant="D", n_symbols=75), seed=2)
    torch.save({"model_state": syn.state_dict()}, root / "synthesizer.pt")
    voc = vocoder.seeded_vocoder(vocoder.MOCKINGBIRD_16K, seed=3)
    torch.save({"generator": _weight_normed(voc.state_dict())}, root / "g_hifigan.pt")
    return {"encoder": root / "encoder.pt", "synthesizer": root / "synthesizer.pt", "vocoder": root / "g_hifigan.pt"}


def _mb_config(files: dict[str, Path], **swap: Path):
    paths = {**files, **swap}
    return compose_config(
        "stack=mockingbird", f"stack.speaker_encoder.checkpoint={paths['encoder']}",
        f"stack.synthesizer.checkpoint={paths['synthesizer']}", f"stack.vocoder.checkpoint={paths['vocoder']}",
    )


def test_default_stack_contracts() -> None:
    stack = load_stack(compose_config().stack)
    assert stack.vocoder.contract["hop"] == 256 and stack.vocoder.contract["sample_rate"] == 22050
    assert stack.synthesizer.weights == "seeded" and stack.vocoder.weights == "real"
    assert stack.synthesizer.contract["mel"] == stack.vocoder.contract["mel"]


def test_mockingbird_stack_loads_and_detects_variant(mockingbird_files: dict[str, Path]) -> None:
    stack = load_stack(_mb_config(mockingbird_files).stack)
    assert stack.synthesizer.contract["variant"] == "D"
    assert stack.vocoder.contract == {**stack.vocoder.contract, "hop": 200, "sample_rate": 16000}
    assert all(c.weights == "real" for c in stack.components)  # user files count as real weights
    with torch.inference_mode():
        wav = stack.vocoder.module(torch.zeros(1, 80, 10))
    assert wav.shape[-1] == 2000  # MockingBird padding: exactly 200 samples per frame


def test_swapped_checkpoint_is_refused_naming_a_key(mockingbird_files: dict[str, Path]) -> None:
    with pytest.raises(CheckpointError, match="'"):
        load_stack(_mb_config(mockingbird_files, synthesizer=mockingbird_files["encoder"]).stack)


def test_missing_paths_are_a_config_error(tmp_path: Path) -> None:
    from voxport.pipeline.engine import build_bundle

    cfg = compose_config("stack=mockingbird", f"out_dir={tmp_path / 'b'}")
    with pytest.raises(ConfigError, match="stack.speaker_encoder.checkpoint"):
        build_bundle(cfg)
    assert not (tmp_path / "b").exists()
