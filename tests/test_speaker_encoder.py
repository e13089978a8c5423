"""GE2E speaker encoder: parity with the real Resemblyzer on real speech, front end, loading, graph.

The golden embeddings in tests/data/ge2e_golden.json were computed by Resemblyzer 0.1.4 itself
(see its "how_made" field) from original Debian recordings that the test corpus also holds.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from voxport.errors import AudioError, CheckpointError, ConfigError
from voxport.models.checkpoint import load_state_dict, sha256_file
from voxport.models.speaker_encoder import (
    SpeakerEncoderConfig,
    compute_partial_slices,
    embed_reference,
    embed_utterance,
    graph_spec,
    load_speaker_encoder,
    partial_mels,
    preprocess_wav,
    seeded_speaker_encoder,
)
from voxport.models.weights import bundled_weights

GOLDEN = Path(__file__).parent / "data" / "ge2e_golden.json"


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    # Small LSTM batches gain nothing from a second thread, and on a busy 2-core host OpenMP spin
    # contention made them 50x slower. Restored afterwards: other test files see no change.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def encoder():
    return load_speaker_encoder(bundled_weights("ge2e"))


@pytest.fixture(scope="module")
def golden() -> dict:
    return json.loads(GOLDEN.read_text())


@pytest.fixture(scope="module")
def golden_audio(corpus, golden) -> dict[str, tuple[np.ndarray, int]]:
    """source_path -> (float32 wav, sample rate) of the original files, found through the corpus."""
    by_source = {item.source_path: item for item in corpus.items() if item.source_path}
    audio = {}
    for clip in golden["clips"]:
        item = by_source.get(clip["source_path"])
        assert item is not None, f"corpus has no item with source_path {clip['source_path']}"
        path = corpus.raw_path(item)
        assert sha256_file(path) == clip["sha256"], f"{path} differs from the golden reference file"
        wav, sr = sf.read(path, dtype="float32")  # what librosa.load(sr=None) returns for PCM
        assert sr == clip["sample_rate"]
        audio[clip["source_path"]] = (wav, sr)
    return audio


@pytest.fixture(scope="module")
def ours(encoder, golden, golden_audio) -> dict[str, np.ndarray]:
    return {
        c["source_path"]: embed_reference(encoder, *golden_audio[c["source_path"]]) for c in golden["clips"]
    }


def test_matches_real_resemblyzer_on_real_speech(encoder, golden, golden_audio, ours):
    cosines = {}
    for clip in golden["clips"]:
        wav, sr = golden_audio[clip["source_path"]]
        pre = preprocess_wav(wav, sr)
        # Same VAD decisions and partial split as the reference, not only a similar vector.
        assert len(pre) == clip["preprocessed_samples"], clip["path"]
        assert len(partial_mels(pre)) == clip["n_partials"], clip["path"]
        ref = np.asarray(clip["embedding"])
        cosines[clip["path"]] = float(ours[clip["source_path"]] @ ref / np.linalg.norm(ref))
    assert min(cosines.values()) >= 0.999, cosines


def test_same_speaker_scores_above_different_speaker(golden, ours):
    speaker = {c["source_path"]: c["speaker"] for c in golden["clips"]}
    same, different = [], []
    for a, b in itertools.combinations(ours, 2):
        cos = float(ours[a] @ ours[b])
        if speaker[a] == "allison" and speaker[b] == "allison":
            same.append(cos)
        elif "allison" in (speaker[a], speaker[b]):
            different.append(cos)
    assert len(same) >= 3 and len(different) >= 3
    assert min(same) > 0.8, same
    assert min(same) > max(different) + 0.15, (same, different)


def test_embeddings_are_unit_norm_and_non_negative(encoder, golden, golden_audio, ours):
    for emb in ours.values():
        assert emb.shape == (256,) and emb.dtype == np.float32
        assert abs(np.linalg.norm(emb) - 1.0) < 1e-5
        assert emb.min() >= 0.0
    wav, sr = golden_audio[golden["clips"][0]["source_path"]]
    with torch.inference_mode():
        partials = encoder(torch.from_numpy(partial_mels(preprocess_wav(wav, sr))))
    assert partials.shape[1] == 256 and partials.shape[0] > 1
    torch.testing.assert_close(partials.norm(dim=1), torch.ones(len(partials)), atol=1e-5, rtol=0)


def test_rejects_empty_silent_quiet_and_short_references(encoder, golden, golden_audio):
    with pytest.raises(AudioError, match="empty"):
        embed_reference(encoder, np.zeros(0, np.float32), 16000)
    with pytest.raises(AudioError, match="silent"):
        embed_reference(encoder, np.zeros(32000, np.float32), 16000)
    hum = (1e-3 * np.random.default_rng(0).standard_normal(48000)).astype(np.float32)
    with pytest.raises(AudioError, match="voiced speech"):
        embed_reference(encoder, hum, 16000)
    # 0.6 s of real, voiced speech: too little to describe a voice.
    wav, sr = golden_audio[golden["clips"][0]["source_path"]]
    voiced = preprocess_wav(wav, sr)
    start = len(voiced) // 3
    with pytest.raises(AudioError, match=r"0\.\d+ s of voiced speech"):
        embed_reference(encoder, voiced[start : start + 9600], 16000)
    with pytest.raises(AudioError, match="mono"):
        embed_reference(encoder, np.stack([wav, wav]), sr)
    with pytest.raises(AudioError, match="dtype"):
        embed_reference(encoder, (wav * 32767).astype(np.int16), sr)
    with pytest.raises(AudioError, match="empty"):
        embed_utterance(encoder, np.zeros(0, np.float32))


def test_vad_removes_a_long_pause(golden, golden_audio):
    wav, sr = golden_audio[golden["clips"][0]["source_path"]]
    with_pause = np.concatenate([wav, np.zeros(3 * sr, np.float32), wav])
    kept = preprocess_wav(with_pause, sr)
    once = preprocess_wav(wav, sr)
    # At most 6 silent VAD windows (+ smoothing) survive on each side of the pause.
    assert len(kept) < 2 * len(once) + 16000
    assert len(kept) > 2 * len(once) - 16000
    assert len(kept) % 480 == 0


def test_partial_slices():
    rtvc = SpeakerEncoderConfig(partial_step=80)
    wav_slices, mel_slices = compute_partial_slices(48000, rtvc)  # 3.0 s
    assert [(s.start, s.stop) for s in mel_slices] == [(0, 160), (80, 240), (160, 320)]
    assert wav_slices[-1].stop == 51200
    # 2.5 s: the third partial would be 56 % real audio (< 75 %) and is dropped.
    assert len(compute_partial_slices(40000, rtvc)[1]) == 2
    _, mel_slices = compute_partial_slices(48000, SpeakerEncoderConfig())  # Resemblyzer: step 77
    assert [s.start for s in mel_slices] == [0, 77, 154]
    assert len(compute_partial_slices(8000)[1]) == 1  # shorter than one partial: still one


def test_real_checkpoint_loads_strictly(encoder, tmp_path):
    path = bundled_weights("ge2e")
    sd = load_state_dict(path)
    assert set(sd) - set(encoder.state_dict()) == {"similarity_weight", "similarity_bias"}
    for key, value in encoder.state_dict().items():
        assert torch.equal(value, sd[key]), key
    assert not encoder.training

    bad = dict(sd)
    bad["lstm.weight_ih_l0"] = torch.zeros(1024, 80)
    torch.save({"model_state": bad}, tmp_path / "wrong_shape.pt")
    with pytest.raises(CheckpointError, match=r"'lstm\.weight_ih_l0'.*\(1024, 80\)"):
        load_speaker_encoder(tmp_path / "wrong_shape.pt")
    missing = {k: v for k, v in sd.items() if k != "linear.bias"}
    torch.save({"model_state": missing}, tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match=r"missing key 'linear\.bias'"):
        load_speaker_encoder(tmp_path / "missing.pt")


def test_graph_spec_is_the_same_computation(encoder):
    spec = graph_spec(encoder)
    assert (spec.component, spec.name, spec.artifact_stem) == ("speaker_encoder",) * 3
    assert spec.input_names == ("mels",) and spec.output_names == ("embeddings",)
    assert spec.dynamic_axes == {"mels": {0: "batch"}, "embeddings": {0: "batch"}}
    (mels,) = spec.example_inputs
    assert mels.shape[1:] == (160, 40) and mels.dtype == torch.float32
    with torch.inference_mode():
        out = spec.module(*spec.example_inputs)
        assert isinstance(out, tuple) and len(out) == 1
        assert out[0].shape == (mels.shape[0], 256)
        torch.testing.assert_close(out[0], encoder(mels), rtol=0, atol=0)
        three = spec.module(torch.cat([mels, mels[:1]]))[0]  # batch is dynamic
    torch.testing.assert_close(three[:2], out[0], rtol=1e-5, atol=1e-6)


def test_config_roundtrip_and_validation():
    cfg = SpeakerEncoderConfig(partial_step=80, l2_eps=1e-5)
    assert SpeakerEncoderConfig.from_dict(cfg.to_dict()) == cfg
    assert json.loads(json.dumps(cfg.to_dict())) == cfg.to_dict()
    with pytest.raises(ConfigError, match="hop_size"):
        SpeakerEncoderConfig.from_dict({**cfg.to_dict(), "hop_size": 200})
    with pytest.raises(ConfigError, match="partial_step"):
        SpeakerEncoderConfig(partial_step=0)
    with pytest.raises(ConfigError, match="vad_window_ms"):
        SpeakerEncoderConfig(vad_window_ms=25)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.partial_step = 77  # type: ignore[misc]


def test_seeded_encoder_is_reproducible_and_keeps_global_rng():
    before = torch.get_rng_state()
    a, b, c = (seeded_speaker_encoder(seed=s) for s in (7, 7, 8))
    assert torch.equal(torch.get_rng_state(), before)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(a.lstm.weight_ih_l0, c.lstm.weight_ih_l0)
    assert not a.training
