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


def test_fp32_onnx_parity_meets_acceptance(bundle: Path) -> None:
    by_key = {(r.key, r.format): r for r in read_bundle(bundle)}
    vocoder = by_key[("vocoder/vocoder", "onnx")].parity
    assert vocoder["wav_snr_db_min"] >= 100.0
    assert vocoder["mr_stft_distance_max"] < 1e-2
    encoder = by_key[("speaker_encoder/speaker_encoder", "onnx")].parity
    assert encoder["embedding_cosine_min"] >= 0.99999
    synth = by_key[("synthesizer/decoder_step", "onnx")].parity
    assert synth["mel_snr_db_min"] >= 80.0
    assert synth["stop_agreement_min"] == 1.0


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
