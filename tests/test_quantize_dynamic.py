"""Dynamic INT8 of the real GE2E encoder (ONNX Runtime and PyTorch) and of the synthesizer decoder
step: the naive encoder fails its speaker gate, the searched one keeps LSTM layer 0 float and
passes; integer kernels are really there; global torch settings are left alone."""

import os
from pathlib import Path

import pytest
import torch
from conftest import run_stage, stage_context

from voxport.errors import GateError
from voxport.pipeline.engine import BuildContext
from voxport.pipeline.records import read_bundle, read_record
from voxport.quantize.config import QuantizeConfig

GATES = {
    "speaker_encoder": {"int8-dynamic": {"min_cosine": 0.995, "same_speaker_threshold": 0.75,
                                         "require_speedup": False}},
    "synthesizer": {"int8-dynamic": {"min_mel_snr_db": 20.0, "min_stop_agreement": 0.95, "steps": 12,
                                     "require_speedup": False}},
}
FIRST_LSTM = "/encoder/lstm/LSTM"


def make_ctx(bundle: Path, corpus, tmp: Path, components: tuple[str, ...], **settings) -> BuildContext:
    records = [r for r in read_bundle(bundle) if r.component in components]
    for r in records:
        for name in (r.file, r.file + ".json"):
            os.link(bundle / name, tmp / name)
    return stage_context(tmp, corpus, records, GATES, **settings)


def settings() -> tuple:
    return (torch.get_num_threads(), torch.is_grad_enabled(), torch.get_default_dtype(),
            torch.are_deterministic_algorithms_enabled(), torch.backends.quantized.engine)


@pytest.fixture
def enc_ctx(bundle: Path, corpus, tmp_path: Path) -> BuildContext:
    return make_ctx(bundle, corpus, tmp_path, ("speaker_encoder",))


def cfg(**kw) -> dict:
    return {"graph": "speaker_encoder", **kw}


def test_naive_encoder_int8_fails_the_speaker_gate_and_writes_nothing(enc_ctx: BuildContext):
    before = sorted(p.name for p in enc_ctx.bundle_dir.iterdir())
    parent = enc_ctx.find("speaker_encoder", "speaker_encoder", "onnx")
    with pytest.raises(GateError) as info:
        run_stage(enc_ctx, "quantize_dynamic", parent, cfg(search="none"))
    assert "embedding cosine" in str(info.value)
    assert info.value.metrics["quality"]["embedding_cosine_min"] < 0.9  # ~0.4: layer 0 sees zeros
    assert sorted(p.name for p in enc_ctx.bundle_dir.iterdir()) == before


@pytest.mark.slow
def test_searched_encoder_int8_keeps_first_lstm_float_and_passes(enc_ctx: BuildContext):
    before = settings()
    parent = enc_ctx.find("speaker_encoder", "speaker_encoder", "onnx")
    record = run_stage(enc_ctx, "quantize_dynamic", parent, cfg())
    assert settings() == before
    assert record.precision == "int8-dynamic" and record.quality["passed"]
    assert record.quality["embedding_cosine_min"] >= 0.995 and record.quality["decisions_changed"] == 0
    assert FIRST_LSTM in record.parity["float_nodes"] and FIRST_LSTM not in record.parity["quantized_nodes"]
    runtime = record.parity["integer_ops"]["runtime"]
    assert runtime.get("DynamicQuantizeLSTM", 0) >= 1 and runtime.get("LSTM", 0) >= 1
    assert read_record(enc_ctx.bundle_dir / record.file) == record
    assert "speedup_vs_torch_fp32" in record.speed


def test_torch_flavour_recipe_splits_the_lstm_and_reloads_through_the_backend(enc_ctx: BuildContext):
    """The PyTorch flavour's artifact: FP32 weights + recipe, rebuilt by the torch backend with layer
    0 float. (The whole stage is not run here: PyTorch's INT8 LSTM is slower than FP32 on CPU.)"""
    from voxport.evaluate import metrics
    from voxport.evaluate.inputs import encoder_feeds
    from voxport.models import registry
    from voxport.models.checkpoint import sha256_file
    from voxport.pipeline.passes import PassContext
    from voxport.quantize import torch_dynamic
    from voxport.quantize.dynamic import TorchFlavour
    from voxport.runtime.backends.torch import TorchBackend

    before = settings()
    source = enc_ctx.source("speaker_encoder")
    module = registry.load_torch_artifact(enc_ctx.bundle_dir / source.file, source.model)
    spec = registry.graph_specs(module, source.model)["speaker_encoder"]
    pctx = PassContext(enc_ctx.bundle_dir, enc_ctx.component("speaker_encoder"), enc_ctx.records)
    flavour = TorchFlavour(source, module, spec, "speaker_encoder", pctx)
    assert flavour.candidates == ["lstm.layers.0", "lstm.layers.1", "lstm.layers.2", "linear"]
    assert flavour.extra["split_lstm_max_abs_vs_fp32"] < 1e-5
    layers = ["lstm.layers.1", "linear"]
    flavour.write(layers)
    record = source.replace(file=flavour.out.name, precision="int8-dynamic", stage="quantize-dynamic",
                            model=flavour.model(layers), sha256=sha256_file(flavour.out))
    backend = TorchBackend()
    backend.load(record, enc_ctx.bundle_dir)
    counts = torch_dynamic.count_quantized(backend._spec.module)
    assert counts == {"DynamicQuantizedLSTM": 1, "DynamicQuantizedLinear": 1}
    (feed,) = encoder_feeds(enc_ctx.corpus, module.cfg, 1)
    ref = flavour._runner(module)(feed)["embeddings"]
    out = backend.infer(feed)["embeddings"]
    assert min(metrics.cosine(a, b) for a, b in zip(ref, out, strict=True)) > 0.99
    naive = flavour.runner(flavour.candidates)(feed)["embeddings"]  # layer 0 INT8: broken
    assert min(metrics.cosine(a, b) for a, b in zip(ref, naive, strict=True)) < 0.9
    assert settings() == before


@pytest.mark.slow
def test_decoder_step_dynamic_int8_passes_its_gate(bundle: Path, corpus, tmp_path: Path):
    ctx = make_ctx(bundle, corpus, tmp_path, ("synthesizer", "speaker_encoder"),
                   texts=["Voice cloning in a few seconds."])
    parent = ctx.find("synthesizer", "decoder_step", "onnx")
    record = run_stage(ctx, "quantize_dynamic", parent, {"graph": "decoder_step"})
    assert record.graph == "decoder_step" and record.quality["passed"]
    assert record.quality["mel_snr_db_min"] >= 20.0 and record.quality["stop_agreement_min"] >= 0.95
    runtime = record.parity["integer_ops"]["runtime"]
    assert sum(v for k, v in runtime.items() if "Integer" in k or "DynamicQuantize" in k) > 0


def test_dynamic_config_rejects_unknown_keys():
    with pytest.raises(Exception, match="unknown quantize setting"):
        QuantizeConfig.from_cfg({"enigne": "torch"})
