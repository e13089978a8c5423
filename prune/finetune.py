"""Distillation fine-tune of a pruned vocoder on CPU: the FP32 model teaches, the student listens.

The student learns to reproduce the TEACHER's waveform (default; `target: recording` uses the
recording itself) on random crops of real calibration speech, never held-out clips. Two things
decide whether this helps what the gate hears, both measured on the real V1 weights:

- **The loss is the gate's own metric, made differentiable** (`gate_log_mel_loss`): per frame, the
  RMS over 80 Slaney bands from 0 Hz to half the sample rate of the dB difference of mel power,
  with a floor 80 dB below the target's peak; the mean over frames. HiFi-GAN's own mel L1 (the
  model's 0-8 kHz mel, natural log, an absolute floor) ignores the band above 8 kHz that the gate
  judges and weighs near-silence by its absolute level; the multi-resolution STFT term
  (`stft_weight`, off by default) adds spectral convergence and log-magnitude L1 at 512/1024/2048.
- **Every crop carries context** (`context_frames` on each side) that the loss does not see: the
  teacher's target comes from the whole clip, so at a bare crop's edges the student would be taught
  to make up for context it was never given (HiFi-GAN V1 reads about +-13 mel frames).

At 20 % of the FLOPs removed (OBS global pruning, held-out log-mel increase vs FP32 +0.46 dB):
Adam at 2e-5 first RAISES the validation loss (1.90 -> 2.34 after 20 steps: every weight moves by
about lr in the first steps, whatever its gradient) yet ends at +0.36 dB after 85 steps; the old
loss (mel L1 + MR-STFT on bare 32-frame crops) took the same model to +1.31 dB in 85 steps.

Deterministic for a given seed and thread count: the crops come from a seeded generator and the
run is a fixed number of `steps`; `seconds` caps the wall time, and a run stopped by it says so
(`time_cap_hit`). RNG use is forked and gradient mode is scoped, so the caller's torch state is
unchanged.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from voxport.errors import ConfigError
from voxport.evaluate import metrics
from voxport.evaluate.inputs import SpeechClip
from voxport.models.vocoder import HiFiGANGenerator
from voxport.pipeline.records import atomic_path

log = logging.getLogger(__name__)

_RESOLUTIONS = metrics.MR_STFT_RESOLUTIONS
TARGETS = ("fp32", "recording")


@lru_cache(maxsize=4)
def _window(n: int) -> torch.Tensor:
    return torch.hann_window(n)


@lru_cache(maxsize=4)
def _gate_basis(sample_rate: int) -> torch.Tensor:
    return torch.from_numpy(metrics._mel_basis(sample_rate)).float()


def _stft_power(wav: torch.Tensor, n_fft: int, hop: int) -> torch.Tensor:
    spec = torch.stft(wav, n_fft, hop, n_fft, _window(n_fft), center=True, pad_mode="reflect", return_complex=True)
    return spec.real.square() + spec.imag.square()  # (B, bins, frames)


def gate_log_mel_loss(pred: torch.Tensor, target: torch.Tensor, sample_rate: int) -> torch.Tensor:
    """metrics.log_mel_distance_db of (B, S) waveforms, differentiable (the mean over the batch)."""
    basis = _gate_basis(sample_rate)
    n_fft, hop = metrics.LOG_MEL_N_FFT, metrics.LOG_MEL_HOP
    p_t = basis @ _stft_power(target, n_fft, hop)
    p_s = basis @ _stft_power(pred, n_fft, hop)
    floor = metrics.LOG_MEL_FLOOR * p_t.detach().amax(dim=(1, 2), keepdim=True)
    diff = 10.0 * (torch.log10(torch.maximum(p_t, floor)) - torch.log10(torch.maximum(p_s, floor)))
    # The small constant keeps sqrt's gradient finite where a frame matches exactly.
    return torch.sqrt(diff.square().mean(dim=1) + 1e-6).mean()


def mr_stft_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B, S) waveforms: mean over resolutions of spectral convergence + log-magnitude L1."""
    total = pred.new_zeros(())
    for n_fft, hop, win in _RESOLUTIONS:
        p = torch.stft(pred, n_fft, hop, win, _window(win), return_complex=True).abs().clamp_min(1e-7)
        t = torch.stft(target, n_fft, hop, win, _window(win), return_complex=True).abs().clamp_min(1e-7)
        total = total + torch.linalg.norm(t - p) / torch.linalg.norm(t) + (t.log() - p.log()).abs().mean()
    return total / len(_RESOLUTIONS)


def finetune(student: HiFiGANGenerator, teacher: HiFiGANGenerator, clips: Sequence[SpeechClip], steps: int,
             seconds: float = 600.0, lr: float = 3e-6, crop_frames: int = 32, context_frames: int = 8,
             batch: int = 4, seed: int = 1234, target: str = "fp32", stft_weight: float = 0.0) -> dict[str, Any]:
    """Train `student` in place for `steps` Adam steps (at most `seconds` of wall time); returns
    what was done, with the loss of every step (the curve)."""
    if target not in TARGETS:
        raise ConfigError(f"prune.finetune_target must be one of {TARGETS}, got '{target}'")
    if steps < 0 or seconds <= 0 or lr <= 0 or crop_frames < 1 or context_frames < 0 or batch < 1:
        raise ConfigError(f"fine-tune needs steps >= 0, seconds > 0, lr > 0, crop_frames >= 1, context_frames >= 0 "
                          f"and batch >= 1; got steps={steps}, seconds={seconds}, lr={lr}, crop_frames={crop_frames}, "
                          f"context_frames={context_frames}, batch={batch}")
    span = crop_frames + 2 * context_frames
    usable = [c for c in clips if c.mel.shape[-1] >= span]
    if steps == 0:
        return {"steps": 0, "steps_done": 0, "seconds": 0.0, "losses": []}
    if not usable:
        raise ConfigError(f"fine-tune needs calibration clips of at least {span} mel frames "
                          f"(crop_frames + 2 x context_frames)")
    hop, rate = student.cfg.hop_length, student.cfg.mel.sample_rate
    with torch.no_grad():  # targets once, on whole clips: what the teacher makes with all its context
        wavs = [teacher(torch.from_numpy(c.mel[None].astype(np.float32)))[0, 0] if target == "fp32"
                else torch.from_numpy(c.wav[: c.mel.shape[-1] * hop].astype(np.float32)) for c in usable]
    mels = [torch.from_numpy(c.mel.astype(np.float32)) for c in usable]
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(student.parameters(), lr=lr)
    inner = slice(context_frames * hop, (context_frames + crop_frames) * hop)
    losses: list[float] = []
    start, capped = time.perf_counter(), False
    student.train()
    try:
        with torch.enable_grad():
            for _ in range(steps):
                if time.perf_counter() - start > seconds:
                    capped = True
                    break
                mel_b, wav_b = [], []
                for _ in range(batch):
                    i = int(torch.randint(len(mels), (1,), generator=gen))
                    s = int(torch.randint(mels[i].shape[-1] - span + 1, (1,), generator=gen))
                    mel_b.append(mels[i][:, s : s + span])
                    first = (s + context_frames) * hop
                    wav_b.append(wavs[i][first : first + crop_frames * hop])
                pred, goal = student(torch.stack(mel_b))[:, 0, inner], torch.stack(wav_b)
                loss = gate_log_mel_loss(pred, goal, rate)
                if stft_weight:
                    loss = loss + stft_weight * mr_stft_loss(pred, goal)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(float(loss.detach()))
    finally:
        student.eval()
        for p in student.parameters():
            p.grad = None
    elapsed = time.perf_counter() - start
    if capped:
        log.warning("fine-tune: TIME CAP HIT after %d of %d steps (%.0f s): the result depends on this "
                    "machine's speed", len(losses), steps, elapsed)
    log.info("fine-tune: %d steps in %.0f s, loss %.3f -> %.3f", len(losses), elapsed,
             losses[0] if losses else 0.0, losses[-1] if losses else 0.0)
    return {"steps": steps, "steps_done": len(losses), "seconds": round(elapsed, 1), "time_cap_hit": capped,
            "losses": [round(v, 5) for v in losses], "loss": "gate log-mel distance (dB)"
            + (f" + {stft_weight} x MR-STFT" if stft_weight else ""), "lr": lr, "crop_frames": crop_frames,
            "context_frames": context_frames, "batch": batch, "target": target, "seed": seed,
            "clips": [c.id for c in usable]}


def save_curve(result: dict[str, Any], path: Path) -> Path:
    """The fine-tune's loss per step (and its running mean) as a PNG beside the record, atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    losses = np.asarray(result.get("losses") or [], dtype=float)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    try:
        if losses.size:
            ax.plot(np.arange(1, losses.size + 1), losses, lw=0.8, alpha=0.5, label="step")
            k = min(10, losses.size)
            ax.plot(np.arange(k, losses.size + 1), np.convolve(losses, np.ones(k) / k, mode="valid"),
                    lw=1.8, label=f"mean of {k}")
            ax.legend()
        ax.set_xlabel("Adam step")
        ax.set_ylabel(result.get("loss", "loss"))
        ax.set_title(f"fine-tune: {result.get('steps_done', 0)} of {result.get('steps', 0)} steps, "
                     f"{result.get('seconds', 0)} s" + (" (TIME CAP HIT)" if result.get("time_cap_hit") else ""))
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return path
