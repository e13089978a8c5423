"""Dynamic INT8 of the real GE2E encoder (ONNX Runtime and PyTorch) and of the synthesizer decoder
step: the naive encoder fails its speaker gate, the searched one keeps LSTM layer 0 float and
passes; integer kernels are really there; global torch settings are left alone."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from voxport.quantize.config import QuantizeConfig
from voxport.records import read_bundle, read_record
from voxport.stages import GateError, StageContext, stage

GATES = {
    "speaker_encoder": {"int8-dynamic": {"min_cosine": 0.995, "same_speaker_threshold": 0.75,
                                         "require_speedup": False}},
    "synthesizer": {"int8-dynamic": {"min_mel_snr_db": 20.0, "min_stop_agreement": 0.95, "steps": 12,
                                     "require_speedup": False}},
}
FIRST_LSTM = "/encoder/lstm/LSTM"


def make_ctx(bundle: Path, corpus, tmp: Path, components: tuple[str, ...]) -> StageContext:
    records = [r for r in read_bundle(bundle) if r.component in components]
    for r in records:
        for name in (r.file, r.file + ".json"):
            os.link(bundle / name, tmp / name)
    return StageContext(bundle_dir=tmp, corpus=corpus, records=records, gates=GATES, timing_repeats=1)


def settings() -> tuple:
    return (torch.get_num_threads(), torch.is_grad_enabled(), torch.get_default_dtype(),
            torch.are_deterministic_algorithms_enabled(), torch.backends.quantized.engine)


@pytest.fixture
def enc_ctx(bundle: Path, corpus, tmp_path: Path) -> StageContext:
    return make_ctx(bundle, corpus, tmp_path, ("speaker_encoder",))


def cfg(**kw) -> dict:
    return {"graph": "speaker_encoder", "timing_seconds": 1.0, **kw}


def test_naive_encoder_int8_fails_the_speaker_gate_and_writes_nothing(enc_ctx: StageContext):
    before = sorted(p.name for p in enc_ctx.bundle_dir.iterdir())
    parent = enc_ctx.find("speaker_encoder", "speaker_encoder", "onnx")
    with pytest.raises(GateError) as info:
        stage("quantize_dynamic")(parent, cfg(search="none"), enc_ctx)
    assert "embedding cosine" in str(info.value)
    assert info.value.metrics["quality"]["embedding_cosine_min"] < 0.9  # ~0.4: layer 0 sees zeros
    assert sorted(p.name for p in enc_ctx.bundle_dir.iterdir()) == before


def test_searched_encoder_int8_keeps_first_lstm_float_and_passes(enc_ctx: StageContext):
    before = settings()
    parent = enc_ctx.find("speaker_encoder", "speaker_encoder", "onnx")
    record = stage("quantize_dynamic")(parent, cfg(), enc_ctx)
    assert settings() == before
    assert record.precision == "int8-dynamic" and record.quality["passed"]
    assert record.quality["embedding_cosine_min"] >= 0.995 and record.quality["decisions_changed"] == 0
    assert FIRST_LSTM in record.parity["float_nodes"] and FIRST_LSTM not in record.parity["quantized_nodes"]
    runtime = record.parity["integer_ops"]["runtime"]
    assert runtime.get("DynamicQuantizeLSTM", 0) >= 1 and runtime.get("LSTM", 0) >= 1
    assert read_record(enc_ctx.bundle_dir / record.file) == record
    assert "speedup_vs_torch_fp32" in record.speed


def test_torch_flavour_encoder_splits_the_lstm_and_reloads_through_the_backend(enc_ctx: StageContext):
    from voxport.runtime.backends.torch import TorchBackend

    before = settings()
    record = stage("quantize_dynamic")(enc_ctx.source("speaker_encoder"), cfg(), enc_ctx)
    assert settings() == before
    assert record.format == "torch" and record.file.endswith("_int8_dynamic.pt")
    assert record.parity["split_lstm_max_abs_vs_fp32"] < 1e-5
    assert "lstm.layers.0" in record.parity["float_nodes"]
    assert record.parity["integer_ops"]["runtime"].get("DynamicQuantizedLSTM", 0) >= 1
    backend = TorchBackend()
    backend.load(record, enc_ctx.bundle_dir)
    feed = {"mels": np.abs(np.random.default_rng(0).normal(0, 0.05, (2, 160, 40))).astype(np.float32)}
    assert backend.infer(feed)["embeddings"].shape == (2, 256)


def test_decoder_step_dynamic_int8_passes_its_gate(bundle: Path, corpus, tmp_path: Path):
    ctx = make_ctx(bundle, corpus, tmp_path, ("synthesizer", "speaker_encoder"))
    parent = ctx.find("synthesizer", "decoder_step", "onnx")
    qc = {"graph": "decoder_step", "timing_seconds": 1.0, "texts": ["Voice cloning in a few seconds."]}
    record = stage("quantize_dynamic")(parent, qc, ctx)
    assert record.graph == "decoder_step" and record.quality["passed"]
    assert record.quality["mel_snr_db_min"] >= 20.0 and record.quality["stop_agreement_min"] >= 0.95
    runtime = record.parity["integer_ops"]["runtime"]
    assert sum(v for k, v in runtime.items() if "Integer" in k or "DynamicQuantize" in k) > 0


def test_dynamic_config_rejects_unknown_keys():
    with pytest.raises(Exception, match="unknown quantize setting"):
        QuantizeConfig.from_cfg({"enigne": "torch"})
