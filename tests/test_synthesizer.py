"""Synthesizer: checkpoint layout per variant, variant detection, graphs, host loop, masks, parity.

The golden file tests/data/tacotron_mockingbird_golden.json was made outside the repo by running
the reference Tacotron code (MockingBird HEAD 28dc5e1 for C/D, v0.0.1 724194a for B, RTVC 865eba8
for A) on `seeded_synthesizer(cfg, weight_seed)` weights, with the masks of `draw_prenet_masks`
injected through a patched `F.dropout`. If seeding or mask drawing changes, it must be remade.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from voxport.errors import CheckpointError, ConfigError
from voxport.models.prenet_masks import NumpyMasks, as_mask_source
from voxport.models.prenet_masks_torch import TorchMasks, draw_prenet_masks
from voxport.models.synthesizer import (
    NATURAL_LOG_STOP_THRESHOLD,
    SynthesizerConfig,
    Tacotron,
    detect_variant,
    load_synthesizer,
    seeded_synthesizer,
    synthesizer_from_state_dict,
)
from voxport.models.synthesizer_graphs import (
    DECODER_INPUTS,
    DECODER_OUTPUTS,
    STATE_NAMES,
    graph_specs,
    initial_decoder_state,
)
from voxport.models.synthesizer_reference import generate
from voxport.models.tacotron_layers import MultiHeadAttention
from voxport.runtime.synthesizer_loop import run_host_loop, trim_lengths

GOLDEN = json.loads((Path(__file__).parent / "data" / "tacotron_mockingbird_golden.json").read_text())
CHARS = np.array([[41, 36, 56, 74, 35, 28, 42, 56, 74, 40, 28, 58, 1], [35, 48, 28, 41, 1] + [0] * 8])


def _speaker(batch: int, seed: int = 5) -> torch.Tensor:
    spk = torch.randn(batch, 256, generator=torch.Generator().manual_seed(seed))
    return spk / spk.norm(dim=1, keepdim=True)


@pytest.fixture(scope="module")
def model_d():
    cfg = SynthesizerConfig()
    return seeded_synthesizer(cfg, 1), cfg


# Shapes from models.md §2.6 (variants table and full HEAD key list).
COMMON_SHAPES = {
    "step": (1,), "stop_threshold": (), "decoder.r": (),
    "encoder.pre_net.fc1.weight": (256, 512), "encoder.cbhg.conv1d_bank.4.conv.weight": (256, 256, 5),
    "encoder.cbhg.conv_project1.conv.weight": (256, 1280, 3), "encoder.cbhg.highways.3.W2.bias": (256,),
    "encoder.cbhg.rnn.weight_hh_l0_reverse": (384, 128), "decoder.prenet.fc1.weight": (256, 80),
    "decoder.attn_net.conv.weight": (32, 1, 31), "decoder.attn_net.L.weight": (128, 32),
    "decoder.attn_net.v.weight": (1, 128), "decoder.res_rnn2.weight_ih": (4096, 1024),
    "decoder.mel_proj.weight": (1600, 1024), "postnet.conv1d_bank.2.conv.weight": (512, 80, 3),
    "postnet.conv_project1.conv.weight": (512, 2560, 3), "postnet.conv_project2.bnorm.running_var": (80,),
    "postnet.pre_highway.weight": (512, 80), "postnet.rnn.weight_ih_l0": (768, 512),
    "post_proj.weight": (80, 512),
}
GST_SHAPES = {"gst.encoder.convs.0.weight": (32, 1, 3, 3), "gst.encoder.convs.5.weight": (128, 128, 3, 3),
              "gst.encoder.bns.2.running_mean": (64,), "gst.encoder.gru.weight_ih_l0": (768, 512),
              "gst.stl.embed": (10, 64), "gst.stl.attention.W_key.weight": (512, 64)}
# variant: (n_symbols, keys, params, encoder_proj, attn_rnn.weight_ih, rnn_input, stop_proj, W_query)
VARIANT_SHAPES = {
    "A": (66, 170, 30_870_177, (128, 512), (384, 768), (1024, 640), (1, 1536), None),
    "B": (70, 220, 31_948_161, (128, 512), (384, 768), (1024, 640), (1, 1536), (512, 256)),
    "C": (75, 220, 32_737_665, (128, 1024), (384, 1280), (1024, 1152), (1, 2048), (512, 256)),
    "D": (75, 220, 32_868_737, (128, 1024), (384, 1280), (1024, 1152), (1, 2048), (512, 512)),
}


@pytest.mark.parametrize("variant", "ABCD")
def test_variant_state_dict_matches_checkpoint_layout(variant):
    n_symbols, n_keys, n_params, proj, attn_ih, rnn_in, stop, w_query = VARIANT_SHAPES[variant]
    model = Tacotron(SynthesizerConfig(variant=variant, n_symbols=n_symbols))
    sd = model.state_dict()
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    assert len(sd) == n_keys
    assert sum(p.numel() for p in model.parameters()) == n_params
    expected = COMMON_SHAPES | {"encoder.embedding.weight": (n_symbols, 512), "encoder_proj.weight": proj,
                                "decoder.attn_rnn.weight_ih": attn_ih, "decoder.rnn_input.weight": rnn_in,
                                "decoder.stop_proj.weight": stop}
    if w_query is None:
        assert not any(k.startswith("gst.") for k in sd)
    else:
        expected |= GST_SHAPES | {"gst.stl.attention.W_query.weight": w_query}
    assert {k: shapes[k] for k in expected} == expected
    assert "encoder.cbhg.pre_highway.weight" not in sd  # only the postnet CBHG has it
    assert (sd["step"].dtype, sd["decoder.r"].dtype, sd["stop_threshold"].dtype) == (
        torch.int64, torch.int32, torch.float32)


@pytest.mark.parametrize(("variant", "n_symbols"), [("A", 66), ("A", 70), ("B", 70), ("B", 75), ("C", 75),
                                                    ("D", 70), ("D", 75)])
def test_detect_variant_round_trip(variant, n_symbols):
    sd = Tacotron(SynthesizerConfig(variant=variant, n_symbols=n_symbols)).state_dict()
    assert detect_variant(sd) == (variant, n_symbols)


def test_detect_variant_names_the_offending_key():
    sd = Tacotron(SynthesizerConfig(variant="D")).state_dict()
    with pytest.raises(CheckpointError, match="'encoder.embedding.weight'.*80"):
        detect_variant(sd | {"encoder.embedding.weight": torch.zeros(80, 512)})
    with pytest.raises(CheckpointError, match="'gst.stl.attention.W_query.weight'"):
        detect_variant(sd | {"gst.stl.attention.W_query.weight": torch.zeros(512, 384)})
    with pytest.raises(CheckpointError, match="'encoder_proj.weight'"):
        detect_variant(sd | {"encoder_proj.weight": torch.zeros(128, 768)})
    with pytest.raises(CheckpointError, match="'encoder.embedding.weight'"):
        detect_variant({k: v for k, v in sd.items() if k != "encoder.embedding.weight"})


def test_forced_variant_with_wrong_symbol_table_is_refused():
    sd = seeded_synthesizer(SynthesizerConfig(variant="D", n_symbols=70), 0).state_dict()
    with pytest.raises(CheckpointError, match=r"'encoder.embedding.weight'.*\(70, 512\).*\(75, 512\)"):
        synthesizer_from_state_dict(sd, variant="D", n_symbols=75)
    with pytest.raises(CheckpointError, match="'encoder_proj.weight'"):
        synthesizer_from_state_dict(sd, variant="B", n_symbols=70)


def test_load_synthesizer_reads_variant_buffers_and_weights(tmp_path):
    source = seeded_synthesizer(SynthesizerConfig(variant="B", n_symbols=70, r=3), 4)
    source.step.fill_(200_000)
    path = tmp_path / "mb_v001.pt"
    torch.save({"model_state": source.state_dict(), "optimizer_state": {}}, path)
    model, cfg = load_synthesizer(path, max_decoder_steps=50)
    assert (cfg.variant, cfg.n_symbols, cfg.r, cfg.stop_threshold) == ("B", 70, 3, -3.4)
    assert cfg.max_decoder_steps == 50
    assert not model.training and int(model.step[0]) == 200_000
    loaded = model.state_dict()
    assert all(torch.equal(v, loaded[k]) for k, v in source.state_dict().items())
    # An explicit trim threshold wins over the checkpoint buffer, and the buffer follows it.
    model, cfg = load_synthesizer(path, stop_threshold=-3.0)
    assert cfg.stop_threshold == -3.0 and float(model.stop_threshold) == -3.0


def test_seeded_weights_are_deterministic_and_leave_global_rng_alone():
    cfg = SynthesizerConfig(variant="A", n_symbols=66)
    rng_before = torch.random.get_rng_state()
    a, b, c = seeded_synthesizer(cfg, 7).state_dict(), seeded_synthesizer(cfg, 7).state_dict(), \
        seeded_synthesizer(cfg, 8).state_dict()
    assert torch.equal(rng_before, torch.random.get_rng_state())
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["decoder.mel_proj.weight"], c["decoder.mel_proj.weight"])
    assert float(a["decoder.mel_proj.weight"].abs().max()) <= (6 / (1024 + 1600)) ** 0.5  # Xavier bound
    assert torch.equal(a["encoder.cbhg.conv1d_bank.0.bnorm.weight"], torch.ones(256))


def _case_id(case: dict) -> str:
    return f"{case['variant']}{case['n_symbols']}_style{case['style_idx']}"


@pytest.mark.parametrize("case", GOLDEN["cases"], ids=_case_id)
def test_matches_reference_mockingbird_code(case):
    cfg = SynthesizerConfig(variant=case["variant"], n_symbols=case["n_symbols"])
    model = seeded_synthesizer(cfg, GOLDEN["weight_seed"])
    stop_rule = case["stop_bias"] is not None
    if stop_rule:
        model.decoder.stop_proj.bias.data.fill_(case["stop_bias"])
    chars = torch.tensor(GOLDEN["chars"]).clamp(max=cfg.n_symbols - 1)
    res = generate(model, chars, _speaker(2, GOLDEN["speaker_seed"]), case["style_idx"],
                   torch.Generator().manual_seed(GOLDEN["mask_seed"]), cfg,
                   max_decoder_steps=GOLDEN["max_steps"], stop_on_token=stop_rule)
    assert res.n_steps == case["n_steps"] and res.stopped == stop_rule
    np.testing.assert_allclose(res.decoder_mel.mean(axis=1), case["decoder_frame_mean"], atol=2e-6)
    np.testing.assert_allclose(res.mel.mean(axis=1), case["post_frame_mean"], atol=2e-6)
    np.testing.assert_allclose(res.mel.max(axis=1), case["post_frame_max"], atol=2e-6)
    for b, m, t, value in case["post_samples"]:
        assert res.mel[b, m, t] == pytest.approx(value, abs=2e-6)


def _straightforward(model, chars, spk, style_idx, enc_masks, dec_masks):
    """Plain PyTorch loop over the model's own methods: no graph wrappers, numpy or name plumbing."""
    with torch.no_grad():
        seq, proj = model.encode(chars, spk, style_idx, enc_masks)
        b, t = chars.shape
        attn_h, h1, c1, h2, c2 = torch.zeros(b, 128), *(torch.zeros(b, 1024) for _ in range(4))
        context, cumulative, frame = torch.zeros(b, seq.shape[2]), torch.zeros(b, t), torch.zeros(b, 80)
        mels, stops = [], []
        for masks in dec_masks:
            mel, stop, _, attn_h, h1, c1, h2, c2, context, cumulative = model.decoder(
                2, frame, masks, attn_h, h1, c1, h2, c2, context, cumulative, seq, proj, chars)
            mels.append(mel)
            stops.append(stop)
            frame = mel[:, :, -1]
        return model.postprocess(torch.cat(mels, dim=2)), torch.stack(stops)


@pytest.mark.parametrize("style_idx", [-1, 4])
def test_host_loop_equals_straightforward_forward(model_d, style_idx):
    model, cfg = model_d
    chars, spk = torch.from_numpy(CHARS), _speaker(2)
    enc_masks, dec_masks = draw_prenet_masks(torch.Generator().manual_seed(9), 2, CHARS.shape[1], 12, cfg)
    expected_mel, expected_stops = _straightforward(model, chars, spk, torch.full((2,), style_idx), enc_masks,
                                                    dec_masks)
    res = generate(model, chars, spk, style_idx, torch.Generator().manual_seed(9), cfg, max_decoder_steps=12)
    assert res.mel.shape == (2, 80, 24) and res.n_steps == 12 and not res.stopped
    assert np.abs(res.mel - expected_mel.numpy()).max() < 1e-6
    assert np.abs(res.stops - expected_stops.numpy()).max() < 1e-7
    np.testing.assert_allclose(res.alignments.sum(axis=2), 1.0, atol=1e-5)


def test_masks_make_runs_reproducible(model_d):
    model, cfg = model_d
    spk = _speaker(2)
    runs = [generate(model, CHARS, spk, -1, torch.Generator().manual_seed(s), cfg, max_decoder_steps=6)
            for s in (3, 3, 4)]
    assert np.array_equal(runs[0].mel, runs[1].mel)
    assert np.abs(runs[0].mel - runs[2].mel).max() > 1e-4
    enc, dec = draw_prenet_masks(torch.Generator().manual_seed(0), 3, 50, 40, cfg)
    assert enc.shape == (2, 3, 50, 256) and dec.shape == (40, 2, 3, 256)
    assert set(torch.unique(torch.cat([enc.flatten(), dec.flatten()])).tolist()) == {0.0, 2.0}


def test_mask_sources_draw_in_loop_order_and_reproduce(model_d):
    model, cfg = model_d
    spk = _speaker(2)
    # TorchMasks draws exactly what a bare torch.Generator drew (the goldens' masks), in the same order.
    enc, dec = draw_prenet_masks(torch.Generator().manual_seed(9), 2, 13, 3, cfg)
    source = TorchMasks(9)
    assert np.array_equal(source.encoder(2, 13, cfg), enc.numpy())
    assert all(np.array_equal(source.decoder(2, cfg), d.numpy()) for d in dec)
    assert isinstance(as_mask_source(torch.Generator()), TorchMasks)
    with pytest.raises(ConfigError, match="MaskSource"):
        as_mask_source(9)
    # NumpyMasks: the runtime's source; same shapes and values, reproducible by seed, torch-free.
    a, b = NumpyMasks(0), NumpyMasks(0)
    enc_np = a.encoder(3, 50, cfg)
    dec_np = np.stack([a.decoder(3, cfg) for _ in range(40)])
    assert enc_np.shape == (2, 3, 50, 256) and dec_np.shape == (40, 2, 3, 256)
    assert enc_np.dtype == dec_np.dtype == np.float32
    assert set(np.unique(np.concatenate([enc_np.ravel(), dec_np.ravel()])).tolist()) == {0.0, 2.0}
    assert 0.45 < float(np.mean(dec_np == 0)) < 0.55  # dropout p = 0.5
    assert np.array_equal(b.encoder(3, 50, cfg), enc_np) and np.array_equal(b.decoder(3, cfg), dec_np[0])
    runs = [generate(model, CHARS, spk, -1, NumpyMasks(s), cfg, max_decoder_steps=6) for s in (3, 3, 4)]
    assert np.array_equal(runs[0].mel, runs[1].mel)
    assert np.abs(runs[0].mel - runs[2].mel).max() > 1e-4
    assert 0.47 < float((enc > 0).float().mean()) < 0.53


def test_style_paths(model_d):
    model, _ = model_d
    chars, spk = torch.from_numpy(CHARS), _speaker(2)
    masks = torch.full((2, 2, CHARS.shape[1], 256), 2.0)
    with torch.no_grad():
        seqs = {s: model.encode(chars, spk, torch.full((2,), s), masks)[0] for s in (-1, 3, 10)}
        # MockingBird HEAD's token path: a zero query attending to the single key tanh(embed[i]).
        att: MultiHeadAttention = model.gst.stl.attention
        token3 = att(torch.zeros(1, 1, 512), torch.tanh(model.gst.stl.embed[3]).reshape(1, 1, 64))
    torch.testing.assert_close(seqs[3][:, :, 512:], token3.expand(2, CHARS.shape[1], 512), atol=1e-6, rtol=0)
    assert torch.equal(seqs[-1], seqs[10])  # any index outside 0..9 takes the speaker path
    assert not torch.allclose(seqs[-1][0, 0, 512:], seqs[-1][1, 0, 512:])  # D: style depends on speaker
    assert torch.equal(seqs[-1][:, :, 256:512], spk.unsqueeze(1).expand(2, CHARS.shape[1], 256))


def test_variant_b_without_style_adds_nothing():
    cfg = SynthesizerConfig(variant="B", n_symbols=75)
    model = seeded_synthesizer(cfg, 2)
    chars, spk = torch.from_numpy(CHARS), _speaker(2)
    masks = torch.full((2, 2, CHARS.shape[1], 256), 2.0)
    with torch.no_grad():
        plain = torch.cat([model.encoder(chars, masks), spk.unsqueeze(1).expand(-1, CHARS.shape[1], -1)], -1)
        seq_none = model.encode(chars, spk, torch.tensor([-1, -1]), masks)[0]
        seq_style = model.encode(chars, spk, torch.tensor([-1, 2]), masks)[0]
    assert torch.equal(seq_none, plain)
    assert torch.equal(seq_style[0], plain[0]) and not torch.allclose(seq_style[1], plain[1])


def test_graph_specs_names_shapes_and_axes(model_d):
    model, cfg = model_d
    specs = graph_specs(model, cfg)
    assert [(s.component, s.name, s.artifact_stem) for s in specs] == [
        ("synthesizer", "encoder", "synthesizer_encoder"),
        ("synthesizer", "decoder_step", "synthesizer_decoder_step"),
        ("synthesizer", "postnet", "synthesizer_postnet")]
    assert specs[1].input_names == DECODER_INPUTS and specs[1].output_names == DECODER_OUTPUTS
    state = initial_decoder_state(1, 12, cfg)
    assert tuple(state) == STATE_NAMES and state["context"].shape == (1, 1024)
    expected = {"encoder": [(1, 12, 1024), (1, 12, 128)],
                "decoder_step": [(1, 80, 2), (1,), (1, 12), (1, 128), *[(1, 1024)] * 5, (1, 12)],
                "postnet": [(1, 80, 24)]}
    for spec in specs:
        assert len(spec.example_inputs) == len(spec.input_names)
        assert set(spec.dynamic_axes) <= set(spec.input_names) | set(spec.output_names)
        with torch.no_grad():
            outputs = spec.module(*spec.example_inputs)
        assert isinstance(outputs, tuple)
        assert [tuple(o.shape) for o in outputs] == expected[spec.name]
    assert specs[0].dynamic_axes["encoder_masks"] == {1: "batch", 2: "text"}


def _fake_graphs(stop_schedule, batch=2, n_text=5):
    """Runners that check the loop's feeds and emit a scripted stop probability per step."""
    seen = {"steps": 0}

    def encoder(feeds):
        assert feeds["encoder_masks"].shape == (2, batch, n_text, 256)
        assert feeds["style_idx"].shape == (batch,)
        return {"encoder_seq": np.zeros((batch, n_text, 1024), np.float32),
                "encoder_seq_proj": np.zeros((batch, n_text, 128), np.float32)}

    def decoder(feeds):
        k = seen["steps"]
        assert feeds["decoder_masks"].shape == (2, batch, 256)
        assert np.all(feeds["attn_hidden"] == k) and np.all(feeds["cumulative"] == k)  # state threaded
        assert np.all(feeds["prev_frame"] == (k - 1 if k else 0))  # last frame of the previous step fed back
        seen["steps"] += 1
        out = {"mel_frames": np.full((batch, 80, 2), float(k), np.float32),
               "stop": np.asarray(stop_schedule(k), np.float32),
               "attention": np.zeros((batch, n_text), np.float32)}
        return out | {f"{n}_out": feeds[n] + 1 for n in STATE_NAMES}

    return encoder, decoder, lambda feeds: {"mel_post": feeds["mel"]}


@pytest.mark.parametrize(("schedule", "steps", "stopped"), [
    (lambda k: [0.9, 0.9], 7, True),  # first step with t = k·r > 10 is k = 6 → 7 steps
    (lambda k: [0.9, 0.9 if k >= 9 else 0.2], 10, True),  # all items must be past the threshold
    (lambda k: [0.9, 0.5], 30, False),  # 0.5 is not > 0.5
])
def test_stop_rule(schedule, steps, stopped):
    cfg = SynthesizerConfig(max_decoder_steps=30)
    chars = np.array([[2, 3, 4, 5, 1], [2, 3, 1, 0, 0]])
    res = run_host_loop(*_fake_graphs(schedule), chars, np.zeros((2, 256), np.float32), -1,
                        NumpyMasks(0), cfg)
    assert (res.n_steps, res.stopped, res.mel.shape) == (steps, stopped, (2, 80, 2 * steps))
    no_stop = run_host_loop(*_fake_graphs(schedule), chars, np.zeros((2, 256), np.float32), -1,
                            NumpyMasks(0), cfg, max_decoder_steps=12, stop_on_token=False)
    assert (no_stop.n_steps, no_stop.stopped) == (12, False)


def test_trim_lengths_drops_only_trailing_quiet_frames():
    mel = np.zeros((4, 80, 6), np.float32)
    mel[1, :, 3:] = -4.0
    mel[2] = -4.0
    mel[3, :, 1:3] = -4.0
    mel[3, 5, 1] = -1.0  # one loud bin keeps a frame
    assert trim_lengths(mel, -3.4) == (6, 3, 0, 6)


def test_loop_rejects_bad_inputs(model_d):
    model, cfg = model_d
    spk = np.zeros((2, 256), np.float32)
    with pytest.raises(ConfigError, match="speaker_embedding"):
        generate(model, CHARS, spk[:1], -1, torch.Generator(), cfg, max_decoder_steps=2)
    with pytest.raises(ConfigError, match="chars"):
        generate(model, CHARS[0], spk, -1, torch.Generator(), cfg, max_decoder_steps=2)


def test_config_round_trip_and_validation():
    cfg = SynthesizerConfig.default_stack(max_decoder_steps=300)
    assert SynthesizerConfig.from_dict(cfg.to_dict()) == cfg
    assert (cfg.variant, cfg.mel_domain, cfg.max_decoder_steps) == ("D", "natural_log", 300)
    assert cfg.stop_threshold == NATURAL_LOG_STOP_THRESHOLD == pytest.approx(-8.35, abs=0.01)
    assert (SynthesizerConfig(variant="B").project_dims, cfg.project_dims) == (512, 1024)
    with pytest.raises(ConfigError, match="unknown synthesizer config key"):
        SynthesizerConfig.from_dict(cfg.to_dict() | {"hop": 200})
    for bad in ({"variant": "E"}, {"n_symbols": 80}, {"r": 21}, {"max_decoder_steps": 0},
                {"mel_domain": "db"}, {"prenet_dropout": 1.0}):
        with pytest.raises(ConfigError):
            SynthesizerConfig(**bad)
