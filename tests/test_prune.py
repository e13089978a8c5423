"""Pruning: the FLOP counter, structured channel pruning (a smaller dense model that the registry
rebuilds), unstructured magnitude pruning (exact sparsity), and both stages on the real HiFi-GAN
with the listener gate in both directions. Short clips keep it fast; timings are never asserted.
"""

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_stage, stage_context
from torch import nn

from voxport.errors import ConfigError, GateError
from voxport.evaluate import inputs, metrics
from voxport.models import registry
from voxport.models.checkpoint import sha256_file
from voxport.models.vocoder import V1_22K_UNIVERSAL, VocoderConfig, load_vocoder, seeded_vocoder
from voxport.models.weights import bundled_weights
from voxport.pipeline.engine import BuildContext
from voxport.pipeline.records import Record, read_record, write_record
from voxport.prune.channels import _obs, prune_vocoder
from voxport.prune.finetune import finetune, gate_log_mel_loss
from voxport.prune.flops import count_macs, vocoder_flops_per_second
from voxport.prune.magnitude import magnitude_prune, weight_sparsity

GATES = {"vocoder": {"fp32": {"max_log_mel_increase_db": 0.3, "max_pesq_drop": 0.1, "require_speedup": False}}}
FAST = {"calibration_clips": 4, "calibration_seconds": 1.0, "graph": "vocoder"}
SHORT = {"gate_seconds": 1.5, "vocoder_clips": 1, "max_clip_seconds": 0.5, "timing_seconds": 0.5}


def torch_settings() -> tuple:
    return (torch.get_num_threads(), torch.is_grad_enabled(), torch.get_default_dtype(),
            torch.are_deterministic_algorithms_enabled(), torch.is_inference_mode_enabled(),
            torch.random.get_rng_state().clone())


def same_settings(a: tuple, b: tuple) -> bool:
    return a[:-1] == b[:-1] and torch.equal(a[-1], b[-1])


@pytest.fixture(scope="module")
def real_vocoder():
    return load_vocoder(bundled_weights("hifigan_v1_universal"), V1_22K_UNIVERSAL)


@pytest.fixture(scope="module")
def source_dir(real_vocoder, tmp_path_factory) -> Path:
    """A vocoder-only bundle: the PyTorch FP32 source artifact and its record."""
    out = tmp_path_factory.mktemp("source")
    path = registry.save_torch_artifact(real_vocoder, out / "vocoder_fp32.pt")
    write_record(Record(component="vocoder", graph="vocoder", format="torch", precision="fp32", file=path.name,
                        sha256=sha256_file(path), weights="real", stage="source",
                        model=registry.describe("hifigan", real_vocoder.cfg)), out)
    return out


@pytest.fixture
def ctx(source_dir: Path, corpus, tmp_path: Path) -> BuildContext:
    for name in ("vocoder_fp32.pt", "vocoder_fp32.pt.json"):
        os.link(source_dir / name, tmp_path / name)
    return stage_context(tmp_path, corpus, [read_record(tmp_path / "vocoder_fp32.pt")], GATES, **SHORT)


# ---------------------------------------------------------------------------------------------
# FLOP counter


def test_flop_counter_on_known_layers():
    conv = nn.Conv1d(4, 8, 3, dilation=2, padding=2)
    assert count_macs(conv, (torch.zeros(1, 4, 10),)).macs == 8 * 10 * 4 * 3
    grouped = nn.Conv1d(4, 8, 5, groups=2, padding=2)
    assert count_macs(grouped, (torch.zeros(2, 4, 10),)).macs == 2 * 8 * 10 * 2 * 5
    up = nn.ConvTranspose1d(4, 2, 16, stride=8, padding=4)
    assert count_macs(up, (torch.zeros(1, 4, 5),)).macs == 4 * 5 * 2 * 16
    assert count_macs(nn.Linear(6, 3), (torch.zeros(2, 7, 6),)).macs == 2 * 7 * 6 * 3
    lstm = nn.LSTM(5, 7, num_layers=2, batch_first=True)
    assert count_macs(lstm, (torch.zeros(1, 9, 5),)).macs == 9 * (4 * 7 * (5 + 7) + 4 * 7 * (7 + 7))
    net = nn.Sequential(nn.Conv1d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv1d(8, 2, 1))
    report = count_macs(net, (torch.zeros(1, 4, 10),))
    assert report.per_layer == {"0": 8 * 10 * 4 * 3, "2": 2 * 10 * 8}
    assert report.flops == 2 * report.macs


def test_vocoder_flops_match_the_architecture(real_vocoder):
    # V1: per frame, conv_pre 512x80x7, four upsamplers, 12 resblocks of 6 convs (k 3/7/11), conv_post.
    per_frame = 512 * 80 * 7 + 32 * 7 * 256  # conv_pre at the frame rate, conv_post at the sample rate
    ch, rate = 512, 1
    for u, k in zip((8, 8, 2, 2), (16, 16, 4, 4), strict=True):
        per_frame += ch * (ch // 2) * k * rate
        ch, rate = ch // 2, rate * u
        per_frame += 2 * 3 * (3 + 7 + 11) * ch * ch * rate
    figures = vocoder_flops_per_second(real_vocoder, frames=86)
    assert figures["macs_per_audio_second"] == pytest.approx(per_frame * 22050 / 256)
    assert figures["params"] == sum(p.numel() for p in real_vocoder.parameters())


# ---------------------------------------------------------------------------------------------
# Structured pruning


def test_obs_removal_of_a_redundant_channel_is_lossless():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 4000, generator=gen)
    x[5] = 0.5 * x[0] - 2.0 * x[3] + 0.3  # channel 5 is an affine combination of channels 0 and 3
    conv = nn.Conv1d(6, 4, 3, padding=1)
    moments = (x.sum(1).double(), (x @ x.T).double(), torch.tensor(4000.0, dtype=torch.float64))
    order, costs, w, b = _obs(conv.weight, conv.bias, moments, 1, damp=1e-9)
    # Any of 0, 3, 5 is redundant given the other two; the others carry independent noise.
    assert order[0] in (0, 3, 5) and costs[0] < 1e-6
    keep = [c for c in range(6) if c != order[0]]
    with torch.no_grad():
        ref = conv(x[None])
        out = nn.functional.conv1d(x[None, keep], w[:, keep], b, padding=1)
    # Exact away from the two edge samples, where zero padding breaks the affine relation's constant.
    assert torch.allclose(ref[..., 1:-1], out[..., 1:-1], atol=1e-4)


@pytest.mark.parametrize("importance,allocation", [pytest.param("obs", "global", marks=pytest.mark.slow),
                                                   ("l1", "uniform")])
def test_structured_pruning_cuts_flops_by_the_fraction_and_rebuilds(real_vocoder, corpus, importance, allocation):
    before = {k: v.clone() for k, v in real_vocoder.state_dict().items()}
    clips = inputs.speech_clips(corpus, real_vocoder.cfg.mel, 2, 0.5, split="calib")
    mels = [torch.from_numpy(c.mel[None].astype(np.float32)) for c in clips]
    pruned, details = prune_vocoder(real_vocoder, 0.2, importance, allocation, mels)
    base, small = vocoder_flops_per_second(real_vocoder), vocoder_flops_per_second(pruned)
    reduction = 1 - small["flops_per_audio_second"] / base["flops_per_audio_second"]
    assert reduction == pytest.approx(0.2, abs=0.005)
    assert small["params"] < base["params"]
    widths = details["inner_channels"]
    # Each removed inner channel takes a convs1 filter (c x k) and its bias, and a convs2 column (c x k).
    removed = sum((c - w) * (2 * c * k + 1) for (c, k), row in zip(_blocks(real_vocoder.cfg), widths, strict=True)
                  for w in row)
    assert base["params"] - small["params"] == removed
    # The record's model config alone rebuilds it (the runtime's path), and it still vocodes.
    model = registry.describe("hifigan", pruned.cfg)
    rebuilt = registry.build_module(model)
    rebuilt.load_state_dict(pruned.state_dict())
    assert VocoderConfig.from_dict(model["config"]).resblock_inner_channels == tuple(map(tuple, widths))
    mel = torch.from_numpy(clips[0].mel[None].astype(np.float32))
    with torch.no_grad():
        wav = rebuilt(mel)
    assert wav.shape == (1, 1, 256 * mel.shape[-1]) and torch.isfinite(wav).all()
    assert all(torch.equal(before[k], v) for k, v in real_vocoder.state_dict().items())  # parent untouched


def _blocks(cfg: VocoderConfig) -> list[tuple[int, int]]:
    return [(cfg.upsample_initial_channel >> (i + 1), k) for i in range(len(cfg.upsample_rates))
            for k in cfg.resblock_kernel_sizes]


def test_finetune_is_deterministic_bounded_and_leaves_torch_settings_alone(corpus):
    cfg = VocoderConfig("1", (8, 8, 2, 2), (16, 16, 4, 4), 32, (3,), ((1, 3),), mel=V1_22K_UNIVERSAL.mel)
    teacher = seeded_vocoder(cfg, 1)
    clips = inputs.speech_clips(corpus, cfg.mel, 2, 1.0, split="calib")
    settings = torch_settings()
    runs = []
    for _ in range(2):
        student = seeded_vocoder(cfg, 2)
        before_w = student.conv_pre.weight.clone()
        stats = finetune(student, teacher, clips, steps=3, seconds=60, lr=1e-4, crop_frames=8, context_frames=2)
        assert same_settings(settings, torch_settings())
        assert stats["steps_done"] == 3 and not stats["time_cap_hit"] and len(stats["losses"]) == 3
        assert not torch.equal(before_w, student.conv_pre.weight) and not student.training
        runs.append(student.state_dict())
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])  # same seed, same steps: same weights
    # The wall-time cap stops a run and says so; zero steps is off.
    capped = finetune(seeded_vocoder(cfg, 2), teacher, clips, steps=10_000, seconds=0.5, crop_frames=8,
                      context_frames=2)
    assert capped["time_cap_hit"] and 1 <= capped["steps_done"] < 10_000
    assert finetune(student, teacher, clips, steps=0)["steps_done"] == 0
    with pytest.raises(ConfigError, match="mel frames"):
        finetune(student, teacher, clips, steps=1, crop_frames=400, context_frames=8)


def test_gate_log_mel_loss_is_the_gate_metric(corpus):
    """The fine-tune optimises exactly what the gate measures: metrics.log_mel_distance_db."""
    clips = inputs.speech_clips(corpus, V1_22K_UNIVERSAL.mel, 2, 1.0, split="calib")
    rng = np.random.default_rng(0)
    for clip in clips:
        ref = clip.wav.astype(np.float32)
        for test in (ref + 0.01 * rng.standard_normal(ref.size).astype(np.float32), 0.5 * ref, np.roll(ref, 7)):
            expected = metrics.log_mel_distance_db(ref, test, 22050)
            got = float(gate_log_mel_loss(torch.from_numpy(test)[None], torch.from_numpy(ref)[None], 22050))
            assert got == pytest.approx(expected, rel=2e-3, abs=2e-3)
    pred = torch.from_numpy(clips[0].wav.astype(np.float32) * 0.7)[None].requires_grad_(True)
    gate_log_mel_loss(pred, torch.from_numpy(clips[0].wav.astype(np.float32))[None], 22050).backward()
    assert pred.grad is not None and torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0


def test_gate_allocation_cuts_where_the_listener_hears_least(real_vocoder, corpus):
    """Allocation `gate` probes each pair alone and spends the budget where the listener's cost per
    FLOP is lowest. The listener here charges for the 32-channel level only: the plan must leave
    that level whole, still reach the target exactly, and record every probe."""
    clips = inputs.speech_clips(corpus, real_vocoder.cfg.mel, 1, 0.3, split="calib")
    mels = [torch.from_numpy(c.mel[None].astype(np.float32)) for c in clips]
    probes = []

    def listen(model):
        widths = model.cfg.resblock_inner_channels
        probes.append(widths)
        cost = sum(32 - w for row in widths[9:] for w in row)  # only level 4 (resblocks 9-11) is heard
        return float(cost), {"probe_cost": cost}

    pruned, details = prune_vocoder(real_vocoder, 0.1, "obs", "gate", mels, listen=listen, probe=0.5)
    assert len(probes) == 36  # every pair probed once, alone
    widths = details["inner_channels"]
    assert [list(r) for r in widths[9:]] == [[32, 32, 32]] * 3
    base, small = vocoder_flops_per_second(real_vocoder), vocoder_flops_per_second(pruned)
    assert 1 - small["flops_per_audio_second"] / base["flops_per_audio_second"] == pytest.approx(0.1, abs=0.005)
    pairs = details["sensitivity"]["pairs"]
    assert len(pairs) == 36 and {p["pair"] for p in pairs if p["cut"]}.isdisjoint(
        {f"resblocks.{j}.convs1/2.{k}" for j in (9, 10, 11) for k in range(3)})
    with pytest.raises(ConfigError, match="allocation 'gate'"):
        prune_vocoder(real_vocoder, 0.1, "obs", "gate", mels)  # no listener


def test_level_time_weights_rank_pairs_per_unit_of_time_saved(real_vocoder, corpus):
    """With `level_time_weights`, a pair's FLOPs count as its level's weight: the listener below
    charges exactly a pair's FLOP share (every pair equally cheap per FLOP), so weighting the
    full-rate level 8x must put the whole cut there, and `fraction` is then a share of the
    time-weighted FLOPs (the generator's other layers count once)."""
    clips = inputs.speech_clips(corpus, real_vocoder.cfg.mel, 1, 0.3, split="calib")
    mels = [torch.from_numpy(c.mel[None].astype(np.float32)) for c in clips]
    base = vocoder_flops_per_second(real_vocoder)["flops_per_audio_second"]

    def listen(model):
        share = 1 - vocoder_flops_per_second(model)["flops_per_audio_second"] / base
        return share, {}

    weights = [1.0, 1.0, 1.0, 8.0]
    pruned, details = prune_vocoder(real_vocoder, 0.05, "obs", "gate", mels, listen=listen, probe=0.5,
                                    level_time_weights=weights)
    cut = {p["pair"] for p in details["sensitivity"]["pairs"] if p["cut"]}
    assert cut and all(p.startswith(("resblocks.9.", "resblocks.10.", "resblocks.11.")) for p in cut)
    assert details["level_time_weights"] == weights and "time-weighted" in details["target_unit"]
    level4 = 0.108  # the full-rate level's share of HiFi-GAN V1's FLOPs (README)
    removed = 1 - vocoder_flops_per_second(pruned)["flops_per_audio_second"] / base
    assert removed * 8 / (1 + 7 * level4) == pytest.approx(0.05, abs=0.004)
    with pytest.raises(ConfigError, match="4 positive numbers"):
        prune_vocoder(real_vocoder, 0.05, "obs", "gate", mels, listen=listen, level_time_weights=[1.0, 8.0])
    with pytest.raises(ConfigError, match="needs prune.allocation 'gate'"):
        prune_vocoder(real_vocoder, 0.05, "obs", "global", mels, level_time_weights=weights)


# ---------------------------------------------------------------------------------------------
# Unstructured magnitude pruning


@pytest.mark.parametrize("scope", [pytest.param("global", marks=pytest.mark.slow), "layer"])
def test_magnitude_pruning_hits_the_target_sparsity(scope):
    model = seeded_vocoder(V1_22K_UNIVERSAL, 3)
    stats = magnitude_prune(model, 0.6, scope)
    n = stats["prunable_weights"]
    assert stats["sparsity"] == pytest.approx(round(0.6 * n) / n, abs=1e-6)
    per_layer = weight_sparsity(model)["per_layer"]
    if scope == "layer":
        assert all(abs(s - 0.6) < 0.01 for s in per_layer.values())
    else:  # one ranking: layers differ (small-weight layers lose more)
        assert max(per_layer.values()) - min(per_layer.values()) > 0.1
    assert all(model.state_dict()[k].dtype == torch.float32 for k in model.state_dict())  # dense, zeros inside


# ---------------------------------------------------------------------------------------------
# Stages on the real vocoder


@pytest.mark.slow
def test_unstructured_90_fails_the_gate_lists_metrics_and_leaves_nothing(ctx: BuildContext):
    before = sorted(p.name for p in ctx.bundle_dir.iterdir())
    settings = torch_settings()
    with pytest.raises(GateError) as info:
        run_stage(ctx, "prune_magnitude", ctx.records[0], {**FAST, "sparsity": 0.9, "scope": "global"})
    assert same_settings(settings, torch_settings())
    text = str(info.value)
    assert "\n" not in text and "log-mel distance" in text and "PESQ drop" in text and "no fine-tune" in text
    q = info.value.metrics["quality"]
    assert q["log_mel_distance_increase_db"] > 0.3 and q["pesq_drop"] > 0.1
    assert info.value.metrics["size"]["flops_reduction"] == 0.0  # zeros in dense kernels save nothing
    assert sorted(p.name for p in ctx.bundle_dir.iterdir()) == before
    assert len(ctx.records) == 1


@pytest.mark.slow
def test_structured_stage_writes_smaller_torch_and_onnx_artifacts(ctx: BuildContext):
    settings = torch_settings()
    cfg = {**FAST, "sparsity": None, "default_sparsity": 0.05, "importance": "obs", "allocation": "global"}
    torch_record = run_stage(ctx, "prune_structured", ctx.records[0], cfg)
    assert same_settings(settings, torch_settings())
    onnx_record = run_stage(ctx, "onnx_export", torch_record, {"graph": "vocoder"})
    assert (torch_record.format, onnx_record.format) == ("torch", "onnx")
    assert onnx_record.parent == torch_record.file == "vocoder_pruned_obs_structured_5.pt"
    for r in (torch_record, onnx_record):
        assert (ctx.bundle_dir / r.file).is_file() and (ctx.bundle_dir / (r.file + ".json")).is_file()
        assert r.speed["flops_reduction"] == pytest.approx(0.05, abs=0.005)
        assert r.speed["params"] < r.speed["parent_params"] and 0 < r.sparsity < 0.1
        assert r.speed["speedup_vs_torch_fp32"] > 0 and r.quality["log_mel_distance_increase_db"] <= 0.3
    assert onnx_record.speed["parent_median_s"] > 0  # timed beside the pruned PyTorch model it came from
    assert onnx_record.parity["wav_snr_db_min"] >= 100.0
    rebuilt = registry.load_torch_artifact(ctx.bundle_dir / torch_record.file, torch_record.model)
    assert rebuilt.cfg.resblock_inner_channels is not None


@pytest.mark.parametrize("bad,needle", [
    ({"allocation": "ears"}, "prune.allocation"), ({"sensitivity_probe": 1.0}, "sensitivity_probe"),
    ({"sensitivity_clips": 0}, "sensitivity_clips"), ({"sensitivity_seconds": 0}, "sensitivity_seconds"),
    ({"finetune_steps": -1}, "finetune_steps"), ({"finetune_steps": 2.5}, "finetune_steps"),
    ({"finetune_seconds": 0}, "finetune_seconds"), ({"finetune_lr": 0}, "finetune_lr"),
    ({"finetune_context_frames": -1}, "finetune_context_frames"), ({"finetune_batch": 0}, "finetune_batch"),
    ({"finetune_stft_weight": -1}, "finetune_stft_weight"), ({"finetune_target": "mel"}, "finetune_target"),
    ({"sensitivity_pesq_weight": -0.5}, "sensitivity_pesq_weight"),
])
def test_bad_allocation_and_finetune_settings_are_named(bad, needle):
    from voxport.prune.config import PruneConfig

    with pytest.raises(ConfigError, match=needle):
        PruneConfig(**bad)


def test_every_allocation_and_finetune_setting_keys_the_stage_cache():
    from voxport.pipeline.passes import pass_kind

    kind = pass_kind("prune_structured")
    base = kind.key_fields(kind.config({}))
    for name, value in (("allocation", "gate"), ("sensitivity_probe", 0.25), ("sensitivity_clips", 8),
                        ("sensitivity_seconds", 3.0), ("sensitivity_pesq_weight", 1.0), ("finetune_steps", 10),
                        ("finetune_seconds", 60.0),
                        ("finetune_lr", 1e-5), ("finetune_crop_frames", 16), ("finetune_context_frames", 4),
                        ("finetune_batch", 2), ("finetune_stft_weight", 1.0), ("finetune_target", "recording")):
        assert kind.key_fields(kind.config({name: value})) != base, name
    gate = {"allocation": "gate"}
    assert kind.key_fields(kind.config({**gate, "level_time_weights": [1, 1, 1, 6]})) != kind.key_fields(
        kind.config(gate))
    with pytest.raises(ConfigError, match="level_time_weights needs prune.allocation 'gate'"):
        kind.config({"level_time_weights": [1, 1, 1, 6]})
    with pytest.raises(ConfigError, match="numbers > 0"):
        kind.config({**gate, "level_time_weights": [1, 1, 1, 0]})


@pytest.mark.slow
def test_gate_allocated_finetuned_stage_records_its_probes_and_curve(ctx: BuildContext):
    """The whole pass on the real V1 weights: 36 probes judged by the real gate on calibration
    speech, a short distillation fine-tune, the engine's held-out judgement; the record keeps every
    probe and every step's loss, and the curve PNG sits beside the model as a sidecar."""
    cfg = {**FAST, "sparsity": 0.05, "allocation": "gate", "sensitivity_clips": 1, "sensitivity_seconds": 0.5,
           "finetune_steps": 2, "finetune_crop_frames": 8, "finetune_context_frames": 2}
    record = run_stage(ctx, "prune_structured", ctx.records[0], cfg)
    assert record.file == "vocoder_pruned_obs_structured_5_finetuned.pt"
    pruning = record.config["pruning"]
    pairs = pruning["sensitivity"]["pairs"]
    assert len(pairs) == 36 and all("log_mel_increase_db" in p and "pesq_drop" in p for p in pairs)
    assert sum(p["cut"] for p in pairs) > 0 and pruning["allocation"] == "gate"
    tuned = pruning["finetune"]
    assert tuned["steps_done"] == 2 and len(tuned["losses"]) == 2 and not tuned["time_cap_hit"]
    png = ctx.bundle_dir / tuned["curve_png"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and record.config["sidecars"] == [png.name]
    assert record.speed["flops_reduction"] == pytest.approx(0.05, abs=0.005)
    assert record.quality["log_mel_distance_increase_db"] <= 0.3  # judged on held-out clips by the engine
