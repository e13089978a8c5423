"""Optional, time-boxed fine-tune of a pruned vocoder by copy synthesis on the calibration corpus.

Loss = mel L1 (x45, HiFi-GAN's weight) + multi-resolution STFT (spectral convergence + log
magnitude L1 at 512/1024/2048), between the student's waveform and a target waveform: the FP32
teacher's output on the same mel (default; the gate judges quality RELATIVE to FP32, and the
teacher gives a target for every clip, narrowband ones included), or the recording itself.
Random 32-frame crops of real calibration speech, Adam. It stops at `seconds` of wall time, so it
fits any budget, and it is off by default (0): never part of CI. RNG use is forked and gradient
mode is scoped, so the caller's global torch state is unchanged.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from voxport.errors import ConfigError
from voxport.evaluate.inputs import SpeechClip
from voxport.models.audio import MelConfig, _mel_basis
from voxport.models.vocoder import HiFiGANGenerator

log = logging.getLogger(__name__)

_RESOLUTIONS = ((512, 128, 512), (1024, 256, 1024), (2048, 512, 2048))
_MEL_WEIGHT = 45.0


@lru_cache(maxsize=4)
def _window(n: int) -> torch.Tensor:
    return torch.hann_window(n)


def _stft_mag(wav: torch.Tensor, n_fft: int, hop: int, win: int) -> torch.Tensor:
    spec = torch.stft(wav, n_fft, hop, win, _window(win), return_complex=True)
    return spec.abs().clamp_min(1e-7)


def mr_stft_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B, S) waveforms: mean over resolutions of spectral convergence + log-magnitude L1."""
    total = pred.new_zeros(())
    for n_fft, hop, win in _RESOLUTIONS:
        p, t = _stft_mag(pred, n_fft, hop, win), _stft_mag(target, n_fft, hop, win)
        total = total + torch.linalg.norm(t - p) / torch.linalg.norm(t) + (t.log() - p.log()).abs().mean()
    return total / len(_RESOLUTIONS)


def log_mel(wav: torch.Tensor, cfg: MelConfig) -> torch.Tensor:
    """Differentiable natural-log mel of (B, S) waveforms with cfg's STFT and filterbank."""
    basis = torch.from_numpy(_mel_basis(cfg.sample_rate, cfg.n_fft, cfg.n_mels, cfg.fmin, cfg.fmax)).float()
    spec = torch.stft(wav, cfg.n_fft, cfg.hop_length, cfg.win_length, _window(cfg.win_length), return_complex=True)
    return torch.log((basis @ spec.abs().clamp_min(1e-5)).clamp_min(1e-5))


def finetune(student: HiFiGANGenerator, teacher: HiFiGANGenerator, clips: Sequence[SpeechClip],
             seconds: float, lr: float = 1e-5, crop_frames: int = 32, batch: int = 2, seed: int = 1234,
             target: str = "fp32") -> dict[str, Any]:
    """Train `student` in place for at most `seconds` of wall time; returns what was done."""
    if target not in ("fp32", "recording"):
        raise ConfigError(f"prune.finetune_target must be 'fp32' or 'recording', got '{target}'")
    usable = [c for c in clips if c.mel.shape[-1] > crop_frames]
    if seconds <= 0 or not usable:
        return {"seconds": 0.0, "steps": 0}
    hop = student.cfg.hop_length
    with torch.no_grad():  # targets once: teacher outputs on whole clips (no crop edge effects)
        wavs = [teacher(torch.from_numpy(c.mel[None].astype(np.float32)))[0, 0] if target == "fp32"
                else torch.from_numpy(c.wav[: c.mel.shape[-1] * hop].astype(np.float32)) for c in usable]
    mels = [torch.from_numpy(c.mel.astype(np.float32)) for c in usable]
    optimizer = torch.optim.Adam(student.parameters(), lr=lr, betas=(0.8, 0.99))
    gen = torch.Generator().manual_seed(seed)
    start, steps, first, last = time.perf_counter(), 0, None, None
    student.train()
    try:
        with torch.enable_grad():
            while time.perf_counter() - start < seconds:
                mel_b, wav_b = [], []
                for _ in range(batch):
                    i = int(torch.randint(len(mels), (1,), generator=gen))
                    s = int(torch.randint(mels[i].shape[-1] - crop_frames + 1, (1,), generator=gen))
                    mel_b.append(mels[i][:, s : s + crop_frames])
                    wav_b.append(wavs[i][s * hop : (s + crop_frames) * hop])
                target_wav = torch.stack(wav_b)
                pred = student(torch.stack(mel_b))[:, 0]
                loss = (_MEL_WEIGHT * F.l1_loss(log_mel(pred, student.cfg.mel), log_mel(target_wav, student.cfg.mel))
                        + mr_stft_loss(pred, target_wav))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                steps += 1
                last = float(loss.detach())
                first = last if first is None else first
    finally:
        student.eval()
        for p in student.parameters():
            p.grad = None
    elapsed = time.perf_counter() - start
    log.info("fine-tune: %d steps in %.0f s, loss %.3f -> %.3f", steps, elapsed, first or 0.0, last or 0.0)
    return {"seconds": elapsed, "steps": steps, "loss_first": first, "loss_last": last, "lr": lr,
            "crop_frames": crop_frames, "batch": batch, "target": target, "clips": [c.id for c in usable]}
