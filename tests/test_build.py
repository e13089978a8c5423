"""voxport build: records with parity figures, FP32 ONNX parity gates, atomic failure."""

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import compose_config

from voxport.errors import ParityError
from voxport.pipeline.engine import build_bundle
from voxport.pipeline.records import read_bundle, read_record


def test_bundle_has_manifest_and_a_record_per_artifact(bundle: Path) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    records = read_bundle(bundle)
    assert len(records) == len(manifest["records"]) == 8
    for record in records:
        assert (bundle / record.file).is_file()
        assert read_record(bundle / record.file) == record
        if record.stage == "export":
            assert record.parity, f"{record.file} has no parity figures"
            assert record.format == "onnx" and record.precision == "fp32"
    weights = {r.component: r.weights for r in records}
    assert weights == {"speaker_encoder": "real", "synthesizer": "seeded", "vocoder": "real"}
    assert manifest["stack"]["components"]["synthesizer"]["weights"] == "seeded"


@pytest.mark.slow
def test_fp32_onnx_exports_match_their_torch_originals_recomputed_from_the_files(bundle: Path, corpus) -> None:
    """Parity recomputed here from the bundle's files alone, on real speech the build did not validate on.

    (The records' own figures cannot fail a test: the bundle exists only because they met the build's
    tolerances.) Each FP32 ONNX artifact and its PyTorch original are loaded through the runtime's
    backends, which also check every file's sha256 against its record, and their outputs compared here.
    """
    from voxport.models.audio import mel_spectrogram
    from voxport.models.prenet_masks_torch import TorchMasks
    from voxport.models.speaker_encoder import SpeakerEncoderConfig, partial_mels, preprocess_wav
    from voxport.models.synthesizer import SynthesizerConfig
    from voxport.models.text import encode_text
    from voxport.models.vocoder import VocoderConfig
    from voxport.runtime.backends import open_backend
    from voxport.runtime.synthesizer_loop import run_host_loop

    records = read_bundle(bundle)
    source = {r.component: r for r in records if r.stage == "source"}
    exported = {(r.component, r.graph): r for r in records if r.format == "onnx" and r.precision == "fp32"}

    def run_both(component: str, graph: str, feed: dict) -> tuple[dict, dict]:
        torch_be = open_backend(source[component], bundle, graph=graph)
        onnx_be = open_backend(exported[(component, graph)], bundle)
        assert onnx_be.providers == ["CPUExecutionProvider"]
        try:
            return torch_be.infer(feed), onnx_be.infer(feed)
        finally:
            torch_be.close()
            onnx_be.close()

    def snr_db(ref: np.ndarray, out: np.ndarray) -> float:
        ref, out = ref.astype(np.float64), out.astype(np.float64)
        return float(10 * np.log10(np.sum(ref**2) / np.sum((ref - out) ** 2)))

    # The calibration split: never among the build's validation clips (held-out eval speech).
    item = next(i for i in sorted(corpus.items(split="calib"), key=lambda i: i.id) if 2.0 <= i.duration_s <= 4.0)

    voc = VocoderConfig.from_dict(source["vocoder"].model["config"]).mel
    wav = corpus.audio(item, voc.sample_rate)[: voc.sample_rate // 2]
    mel = mel_spectrogram(wav, voc)[None].astype(np.float32)
    ref, out = (o["wav"] for o in run_both("vocoder", "vocoder", {"mel": mel}))
    assert ref.shape == out.shape == (1, 1, mel.shape[-1] * voc.hop_length)
    assert snr_db(ref, out) > 80.0  # float32 summation order only (the build records ~110 dB)

    enc = SpeakerEncoderConfig.from_dict(source["speaker_encoder"].model["config"])
    partials = partial_mels(preprocess_wav(corpus.audio(item, enc.sample_rate), enc.sample_rate, enc), enc)
    ref, out = (o["embeddings"] for o in run_both("speaker_encoder", "speaker_encoder",
                                                   {"mels": partials.astype(np.float32)}))
    assert ref.shape == out.shape and ref.shape[0] >= 2
    cosines = np.sum(ref * out, axis=1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(out, axis=1))
    assert cosines.min() > 0.99999

    # The synthesizer's three graphs through the host loop, on real text and this speaker's embedding.
    syn = SynthesizerConfig.from_dict(source["synthesizer"].model["config"])
    embedding = out.mean(axis=0)
    chars = np.asarray([encode_text("Voice cloning turns speech into a voice.", syn.n_symbols)[0]], dtype=np.int64)
    results = []
    for torch_side in (True, False):
        engines = [open_backend(source["synthesizer"], bundle, graph=g) if torch_side
                   else open_backend(exported[("synthesizer", g)], bundle)
                   for g in ("encoder", "decoder_step", "postnet")]
        speaker = (embedding / np.linalg.norm(embedding))[None]
        results.append(run_host_loop(*(e.infer for e in engines), chars, speaker, -1, TorchMasks(7),
                                     syn, max_decoder_steps=10, stop_on_token=False))
        for e in engines:
            e.close()
    ref_syn, out_syn = results
    assert ref_syn.mel.shape == out_syn.mel.shape == (1, syn.n_mels, 10 * syn.r)
    assert snr_db(ref_syn.mel, out_syn.mel) > 60.0
    np.testing.assert_allclose(out_syn.stops, ref_syn.stops, atol=1e-4)


def test_onnx_records_name_tensors_and_dynamic_axes(bundle: Path) -> None:
    record = read_record(bundle / "vocoder_fp32.onnx")
    (mel,) = record.inputs
    assert mel.name == "mel" and mel.dtype == "float32" and mel.shape[2] == "frames"
    assert record.outputs[0].name == "wav" and record.outputs[0].shape[2] == "samples"
    assert record.parent == "vocoder_fp32.pt" and record.parent_sha256


def test_failed_parity_leaves_previous_bundle_and_no_partial_files(
    bundle: Path, corpus, tmp_path: Path
) -> None:
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "marker.txt").write_text("previous bundle")
    cfg = compose_config(
        "stages=export_only", f"out_dir={out}", f"corpus_dir={corpus.root}",
        "stack.synthesizer.max_decoder_steps=8", "validation.vocoder_clips=1",
        "validation.max_clip_seconds=0.5", "validation.synthesizer_steps=4",
        "tolerances.speaker_encoder.min_cosine=1.5",  # impossible: the build must fail
    )
    with pytest.raises(ParityError, match="speaker_encoder: embedding cosine"):
        build_bundle(cfg)
    assert (out / "marker.txt").read_text() == "previous bundle"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"], "staging directory left behind"


@pytest.mark.slow
def test_torch_and_onnx_backends_clone_the_same_audio(bundle: Path, corpus) -> None:
    from voxport.runtime.cloner import VoiceCloner

    item = next(i for i in corpus.items(split="eval") if i.speaker == "allison")
    ref = corpus.audio(item, 16000)
    outputs = {}
    for prefer in ("onnx", "torch"):
        cloner = VoiceCloner(bundle, preference=(prefer,), strict=True)
        assert {s.format for s in cloner.served.values()} == {prefer}
        outputs[prefer] = cloner.clone(ref, 16000, "Hello there.", seed=3, max_decoder_steps=10)
        cloner.close()
    assert outputs["onnx"].shape == outputs["torch"].shape
    snr = 10 * np.log10(np.sum(outputs["torch"] ** 2) / np.sum((outputs["torch"] - outputs["onnx"]) ** 2))
    assert snr > 60.0
