"""HiFi-GAN generator: real weights, output lengths, weight-norm folding, errors, copy synthesis."""

from __future__ import annotations

import dataclasses
import json
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from voxport.errors import CheckpointError, ConfigError
from voxport.evaluate.metrics import log_mel_distance_db, mr_stft_distance, pesq_wb
from voxport.models.audio import HIFIGAN_V1_22K, MelConfig, mel_spectrogram
from voxport.models.checkpoint import load_state_dict
from voxport.models.vocoder import (
    MOCKINGBIRD_16K,
    V1_22K_UNIVERSAL,
    V2_22K,
    V3_22K,
    HiFiGANGenerator,
    PolyphaseUpsample,
    VocoderConfig,
    copy_synthesis,
    example_inputs,
    fold_weight_norm,
    graph_spec,
    load_vocoder,
    seeded_vocoder,
)
from voxport.models.weights import bundled_weights

PRESETS = {"v1": V1_22K_UNIVERSAL, "v2": V2_22K, "v3": V3_22K, "mockingbird": MOCKINGBIRD_16K}
# Parameter counts after weight-norm removal, from the HiFi-GAN paper / MockingBird config.
PARAMS = {"v1": 13_926_017, "v2": 925_985, "v3": 1_462_273, "mockingbird": 12_975_745}

# A tiny jik876-style generator for the folding tests (hop 16).
TINY_MEL = MelConfig(8000, 64, 16, 64, 80, 0, 4000)
TINY = VocoderConfig("1", (4, 4), (8, 8), 16, (3, 5), ((1, 3, 5), (1, 2, 3)), mel=TINY_MEL)


@pytest.fixture(scope="module")
def universal() -> HiFiGANGenerator:
    return load_vocoder(bundled_weights("hifigan_v1_universal"), V1_22K_UNIVERSAL)


def _run(model: nn.Module, mel: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(mel)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_shapes_params_and_config_round_trip(name):
    cfg = PRESETS[name]
    assert VocoderConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    model = HiFiGANGenerator(cfg)
    assert sum(p.numel() for p in model.parameters()) == PARAMS[name]


def test_config_validation():
    with pytest.raises(ConfigError, match="hop"):
        dataclasses.replace(MOCKINGBIRD_16K, mel=HIFIGAN_V1_22K)  # 200 samples/frame vs hop 256
    with pytest.raises(ConfigError, match="resblock"):
        dataclasses.replace(V1_22K_UNIVERSAL, resblock="3")
    with pytest.raises(ConfigError, match="unknown"):
        VocoderConfig.from_dict({**V1_22K_UNIVERSAL.to_dict(), "sampling_rate": 22050})


def test_universal_weights_load_strictly(universal):
    raw = load_state_dict(bundled_weights("hifigan_v1_universal"))
    assert len(raw) == 234
    assert sum(k.endswith((".weight_g", ".weight_v")) for k in raw) == 156
    folded = fold_weight_norm(raw)
    assert set(folded) == set(universal.state_dict())  # 78 weights + 78 biases
    assert not universal.training
    # The loaded weight is g * v / ||v|| of the file: spot-check one ConvTranspose1d layer.
    g, v = raw["ups.0.weight_g"], raw["ups.0.weight_v"]
    expected = v * g / v.flatten(1).norm(dim=1).view(-1, 1, 1)
    torch.testing.assert_close(universal.ups[0].weight.detach(), expected)


@pytest.fixture(scope="module")
def mockingbird() -> HiFiGANGenerator:
    return seeded_vocoder(MOCKINGBIRD_16K, seed=0)


@pytest.mark.parametrize("frames", [1, 7, pytest.param(50, marks=pytest.mark.slow)])
def test_output_is_exactly_hop_samples_per_frame(universal, mockingbird, frames):
    mel = torch.full((2, 80, frames), -6.0)
    assert _run(universal, mel).shape == (2, 1, 256 * frames)
    assert _run(mockingbird, torch.zeros(1, 80, frames)).shape == (1, 1, 200 * frames)


def test_seeded_vocoder_is_deterministic_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a, b = seeded_vocoder(TINY, 7), seeded_vocoder(TINY, 7)
    assert torch.equal(torch.random.get_rng_state(), before)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)
    c = seeded_vocoder(TINY, 8)
    assert not torch.equal(a.ups[0].weight, c.ups[0].weight)


def _weight_normed(api: str, seed: int = 0) -> HiFiGANGenerator:
    """TINY generator with weight norm (dim 0) on every conv, through `api`, with random g."""
    warnings.filterwarnings("ignore", "`torch.nn.utils.weight_norm` is deprecated", FutureWarning)
    model = seeded_vocoder(TINY, seed)
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.Conv1d | nn.ConvTranspose1d):
            if api == "old":
                nn.utils.weight_norm(module)
                g = module.weight_g
            else:
                nn.utils.parametrizations.weight_norm(module)
                g = module.parametrizations.weight.original0
            with torch.no_grad():  # g != ||v||, so folding really has to compute g * v / ||v||
                g.mul_(0.5 + torch.rand(g.shape, generator=gen))
    return model.eval()


@pytest.mark.parametrize("api", ["old", "parametrizations"])
def test_folding_matches_torch_remove_weight_norm(api, tmp_path):
    model = _weight_normed(api)
    sd = model.state_dict()
    marker = ".weight_g" if api == "old" else ".parametrizations.weight.original0"
    assert any(k.endswith(marker) for k in sd)
    path = tmp_path / "g.pt"
    torch.save({"generator": sd}, path)
    mel = torch.randn(1, 80, 9, generator=torch.Generator().manual_seed(1))
    expected = _run(model, mel)
    loaded = load_vocoder(path, TINY)

    # torch's own removal gives the same plain weights as our folding.
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv1d | nn.ConvTranspose1d):
            if api == "old":
                nn.utils.remove_weight_norm(module)
            else:
                parametrize.remove_parametrizations(module, "weight")
            ours = loaded.get_submodule(name).weight
            torch.testing.assert_close(ours, module.weight, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(_run(loaded, mel), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(_run(model, mel), expected, rtol=1e-5, atol=1e-6)


def test_wrong_shape_names_the_file_key(tmp_path):
    sd = _weight_normed("old").state_dict()
    sd["ups.1.weight_v"] = torch.randn(8, 4, 7)  # kernel 7 instead of 8; g still fits
    torch.save({"generator": sd}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=r"shape mismatch for 'ups\.1\.weight_v'"):
        load_vocoder(tmp_path / "bad.pt", TINY)

    sd = _weight_normed("old").state_dict()
    sd["conv_post.bias"] = torch.zeros(2)
    torch.save(sd, tmp_path / "bad_bias.pt")
    with pytest.raises(CheckpointError, match=r"'conv_post\.bias'"):
        load_vocoder(tmp_path / "bad_bias.pt", TINY)

    sd = _weight_normed("old").state_dict()
    del sd["resblocks.3.convs2.1.weight_g"]
    torch.save(sd, tmp_path / "half.pt")
    with pytest.raises(CheckpointError, match=r"resblocks\.3\.convs2\.1\.weight_g"):
        load_vocoder(tmp_path / "half.pt", TINY)


def test_real_weights_with_the_wrong_config_are_refused():
    with pytest.raises(CheckpointError, match=r"ups\.0\.weight_v"):
        load_vocoder(bundled_weights("hifigan_v1_universal"), MOCKINGBIRD_16K)


def test_mockingbird_24k_variant_is_refused(tmp_path):
    torch.save({"generator": {"ups.0.1.weight_g": torch.ones(512, 1, 1)}}, tmp_path / "g24k.pt")
    with pytest.raises(CheckpointError, match="24 kHz"):
        load_vocoder(tmp_path / "g24k.pt", MOCKINGBIRD_16K)


def test_graph_spec_contract(mockingbird):
    model = mockingbird
    spec = graph_spec(model)
    assert (spec.component, spec.name, spec.artifact_stem) == ("vocoder", "vocoder", "vocoder")
    assert spec.input_names == ("mel",) and spec.output_names == ("wav",)
    assert spec.dynamic_axes == {"mel": {0: "batch", 2: "frames"}, "wav": {0: "batch", 2: "samples"}}
    (mel,) = spec.example_inputs
    assert mel.dtype == torch.float32 and mel.shape == (1, 80, 50)
    assert -4.0 <= mel.min() and mel.max() <= 4.0  # the MockingBird mel range
    out = _run(spec.module, mel)
    assert isinstance(out, tuple) and len(out) == 1
    assert out[0].shape == (1, 1, 200 * 50)
    torch.testing.assert_close(out[0], _run(model, mel))


# ---------------------------------------------------------------------------------------------
# Copy synthesis of real speech with the real universal generator


@pytest.fixture(scope="module")
def speech(corpus) -> dict[str, np.ndarray]:
    """Up to 2.5 s of each of the first 4 wideband (native >= 16 kHz) recordings of the eval split.

    2.5 s rather than less: PESQ gets erratic on shorter clips (1.9 instead of 2.4 on one at 2 s).
    Wideband only: 8 kHz telephone clips have nothing above 4 kHz, where HiFi-GAN adds energy
    that every spectral metric then counts as error.
    """
    items = [
        it
        for it in corpus.items(split="eval")
        if it.source_path is not None and it.native_sample_rate >= 16000 and it.duration_s >= 1.0
    ][:4]
    assert len(items) >= 3, "corpus eval split has too few wideband recordings"
    return {it.id: corpus.audio(it, 22050)[: int(2.5 * 22050)] for it in items}


@pytest.mark.slow
def test_copy_synthesis_of_real_speech(universal, speech):
    scores = {}
    for item_id, ref in speech.items():
        out = copy_synthesis(universal, ref, V1_22K_UNIVERSAL)
        assert out.dtype == np.float32
        n_frames = mel_spectrogram(ref, HIFIGAN_V1_22K).shape[1]
        assert len(out) == 256 * n_frames == 256 * (len(ref) // 256)
        ref = ref[: len(out)]
        scores[item_id] = (
            log_mel_distance_db(ref, out, 22050),
            mr_stft_distance(ref, out),
            pesq_wb(ref, out, 22050),
        )
        # Same loudness and time envelope: a misaligned or mis-scaled mel would break these.
        assert np.sqrt(np.mean(out**2)) == pytest.approx(np.sqrt(np.mean(ref**2)), rel=0.3), item_id
        env = [np.log(np.mean(x.reshape(-1, 256) ** 2, axis=1) + 1e-9) for x in (ref, out)]
        assert np.corrcoef(*env)[0, 1] > 0.9, item_id
    log_mel, mr_stft, pesq = np.mean(list(scores.values()), axis=0)
    # Measured on these 4 clips: log-mel 2.35-3.18 dB (mean 2.75), MR-STFT 1.45-1.95 (1.65),
    # PESQ-wb 2.41-3.34 (2.82). On speech_orig_16k-seg0 the LJSpeech (single-speaker) generator
    # scores 4.6 dB / 2.04 / 2.27 and a seeded (untrained) one 29.7 dB / 4.6 / 1.05.
    assert log_mel < 3.5, scores
    assert mr_stft < 2.2, scores
    assert pesq > 2.5, scores
    assert max(s[0] for s in scores.values()) < 4.5, scores


def test_copy_synthesis_refuses_a_different_config(universal, speech):
    with pytest.raises(ConfigError, match="cfg differs"):
        copy_synthesis(universal, next(iter(speech.values())), V2_22K)


def test_export_parity_accepts_an_artifact_as_exact_as_pytorch_fp32_itself():
    """An FP32 export is judged against the float64 evaluation; a clip below `min_snr_db` passes only
    when the artifact is no further from float64 than PyTorch FP32 itself is (`accept_torch_floor`)."""
    from voxport.evaluate import parity
    from voxport.export.onnx import torch_runner

    spec = graph_spec(seeded_vocoder(TINY, seed=0))
    feeds = [{"mel": example_inputs(TINY, frames)[0].numpy()} for frames in (12, 20)]
    same = torch_runner(spec)  # PyTorch FP32 itself: exactly at its own rounding floor

    def worse(feed):  # 20 dB further from float64 than PyTorch's rounding
        wav = same(feed)["wav"]
        return {"wav": wav + (wav - _float64(spec, feed)) * 10.0}

    def slightly_worse(feed):  # 3.5 dB further: another engine's summation order, not an export bug
        wav = same(feed)["wav"]
        return {"wav": wav + (wav - _float64(spec, feed)) * 0.5}

    strict = {"min_snr_db": 400.0}
    figures, failures = parity.vocoder(spec, same, feeds, {**strict, "accept_torch_floor": True})
    assert not failures and figures["clips_passed_by_torch_floor"] == 2
    _, failures = parity.vocoder(spec, same, feeds, {**strict, "accept_torch_floor": False})
    assert failures and "< 400.0 dB" in failures[0]
    _, failures = parity.vocoder(spec, worse, feeds, {**strict, "accept_torch_floor": True})
    assert failures and "less exact than PyTorch FP32 itself" in failures[0]
    # Within `torch_floor_slack_db` of PyTorch's own floor passes; 20 dB further never does.
    _, failures = parity.vocoder(spec, slightly_worse, feeds, {**strict, "accept_torch_floor": True})
    assert failures and "(allowed: 0 dB)" in failures[0]
    slack = {**strict, "accept_torch_floor": True, "torch_floor_slack_db": 6.0}
    figures, failures = parity.vocoder(spec, slightly_worse, feeds, slack)
    assert not failures and figures["clips_passed_by_torch_floor"] == 2
    _, failures = parity.vocoder(spec, worse, feeds, slack)
    assert failures and "less exact than PyTorch FP32 itself (allowed: 6 dB)" in failures[0]
    _, failures = parity.vocoder(spec, worse, feeds, {"min_snr_db": 20.0, "accept_torch_floor": True})
    assert not failures  # the absolute tolerance alone still passes what it always passed


def _float64(spec, feed) -> np.ndarray:
    import copy

    with torch.inference_mode():
        return copy.deepcopy(spec.module).double()(torch.from_numpy(feed["mel"]).double())[0].numpy()


# ---------------------------------------------------------------------------------------------
# Polyphase upsampling: the transposed convolutions as stride-1 convs (same function)


@pytest.mark.parametrize(("stride", "padding", "output_padding"),
                         [(8, 4, 0), (2, 1, 0), (5, 3, 1), (4, 2, 0), (3, 3, 1)])
@pytest.mark.parametrize("frames", [1, 37])
def test_polyphase_upsample_equals_the_transposed_conv(stride, padding, output_padding, frames):
    gen = torch.Generator().manual_seed(stride * 100 + frames)
    up = nn.ConvTranspose1d(6, 4, 2 * stride, stride, padding=padding, output_padding=output_padding).double()
    with torch.no_grad():
        up.weight.copy_(torch.randn(up.weight.shape, generator=gen, dtype=torch.float64))
        up.bias.copy_(torch.randn(4, generator=gen, dtype=torch.float64))
    x = torch.randn(2, 6, frames, generator=gen, dtype=torch.float64)
    poly = PolyphaseUpsample(up)
    expected, got = _run(up, x), _run(poly, x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    assert poly.conv.kernel_size == (2,) and poly.conv.stride == (1,)  # a plain conv, INT8-able


def test_polyphase_upsample_refuses_what_it_cannot_rewrite():
    for bad in (nn.ConvTranspose1d(4, 4, 7, 4, padding=2),         # kernel != 2u
                nn.ConvTranspose1d(4, 4, 8, 4, padding=5),         # padding > u
                nn.ConvTranspose1d(4, 4, 8, 4, padding=0, output_padding=1)):  # output padding > padding
        with pytest.raises(ConfigError, match="polyphase upsampling needs kernel 2u"):
            PolyphaseUpsample(bad)


def test_polyphase_graph_of_the_real_vocoder_is_the_same_function(universal, mockingbird):
    for model in (universal, mockingbird):
        (mel,) = example_inputs(model.cfg, frames=20)
        spec = graph_spec(model, upsampling="polyphase")
        assert not any(isinstance(m, nn.ConvTranspose1d) for m in spec.module.modules())
        assert all(isinstance(up, nn.ConvTranspose1d) for up in model.ups)  # the model is untouched
        torch.testing.assert_close(_run(spec.module, mel)[0], _run(model, mel), rtol=0, atol=2e-5)
    with pytest.raises(ConfigError, match="upsampling must be one of"):
        graph_spec(universal, upsampling="nearest")
