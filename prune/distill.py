"""Block-wise (local) distillation of a pruned HiFi-GAN: recover what structured pruning lost, on CPU.

End-to-end copy-synthesis fine-tuning (prune/finetune.py) manages ~4-5 steps a minute on two
shared cores: too slow to recover anything in minutes. Here each upsampling LEVEL of the student
(lrelu -> ups[i] -> mean of its resblocks) is recovered alone, in order, to reproduce the TEACHER's
output of that level from the STUDENT's own input (the output of its already distilled levels), so
the error accumulated upstream is corrected where it arrives: first a least-squares re-fit of every
pruned pair's convs2 (`refit_level`), then optional Adam steps on the level's squared error. Levels
before the first pruned one are skipped (their error is exactly zero). A level is put back as it was
when its new weights take the LAST level's output (the student running on through the later levels)
further from the teacher's over the pool: level 3's own re-fit did that in every trial. conv_post is
left alone: the waveform differs from the teacher's mostly in phase, which a sample-wise loss cannot fix.

Activations come from random crops of real calibration speech (never held-out clips), drawn
once from a seeded generator: a run is deterministic for a given seed, thread count and input,
as long as the wall-time cap (`seconds`) is not hit. When it is hit, training stops where it is,
the remaining levels are only propagated, and the result says so (`time_cap_hit`).

Measured on the real V1 weights (held-out gate clips, vs FP32; OBS global pruning before): the
re-fit lowers every level's squared error on the crops 1.3-6x, but NOT what the gate hears: 20 % of
the FLOPs +0.46 dB / PESQ drop 0.09 without it, +0.38 / 0.18 (damp 1e-3 towards zero), +0.42 / 0.12
(damp 0.1 towards the current weights, the default), +0.38 / 0.21 (damp 0.01, output acceptance);
15 % +0.25 dB without, +0.37 / +0.39 with. The squared error of the last level's output falls 3.5x
at 20 % (0.064 -> 0.018) while the PESQ drop grows: a feature-domain squared error is dominated by
loud low bands, which the log-mel distance and PESQ do not weigh that way. Adam steps on the same
loss barely move in minutes on 2 cores (20 %, 40 steps, lr 3e-5: level 1 error 0.011 -> 0.006) and
lr 3e-4 breaks the trained weights. Off by default (`prune.distill`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from voxport.errors import ConfigError
from voxport.evaluate.inputs import SpeechClip
from voxport.models.vocoder import _LRELU_SLOPE, HiFiGANGenerator
from voxport.pipeline.records import atomic_path

log = logging.getLogger(__name__)


def _level(gen: HiFiGANGenerator, i: int, x: torch.Tensor) -> torch.Tensor:
    """Level i of the generator's forward: (B, C_i, T_i) -> (B, C_i / 2, T_i * u_i)."""
    n = len(gen.cfg.resblock_kernel_sizes)
    x = gen.ups[i](F.leaky_relu(x, _LRELU_SLOPE))
    blocks = gen.resblocks[i * n : (i + 1) * n]
    acc = blocks[0](x)
    for blk in blocks[1:]:
        acc = acc + blk(x)
    return acc / n


def _level_params(gen: HiFiGANGenerator, i: int) -> list[nn.Parameter]:
    n = len(gen.cfg.resblock_kernel_sizes)
    return [*gen.ups[i].parameters(), *gen.resblocks[i * n : (i + 1) * n].parameters()]


def _taps(h: torch.Tensor, conv: nn.Conv1d) -> torch.Tensor:
    """(B, w, T) -> (B * T, w * k + 1): every output sample's receptive field (dilation 1, 'same'
    padding, as convs2 has) and a 1 for the bias, in the order of conv.weight.flatten(1)."""
    k, pad = conv.kernel_size[0], conv.padding[0]
    u = F.pad(h, (pad, pad)).unfold(2, k, 1).permute(0, 2, 1, 3).reshape(-1, h.shape[1] * k)
    return torch.cat([u, u.new_ones(u.shape[0], 1)], dim=1)


def _refit_pair(c1: nn.Conv1d, c2: nn.Conv1d, x_s: torch.Tensor, target: torch.Tensor, damp: float,
                chunk: int) -> None:
    """Least squares for convs2 (all taps and the bias): min ||x_s + c2(h_s) - target||^2, where
    h_s is the STUDENT's own input to convs2 and `target` the TEACHER's state after the pair."""
    n = c2.in_channels * c2.kernel_size[0] + 1
    gram = torch.zeros(n, n, dtype=torch.float64)
    cross = torch.zeros(c2.out_channels, n, dtype=torch.float64)
    for k in range(0, len(x_s), chunk):
        xs = x_s[k : k + chunk]
        h = F.leaky_relu(c1(F.leaky_relu(xs, _LRELU_SLOPE)), _LRELU_SLOPE)
        u = _taps(h, c2).double()
        r = (target[k : k + chunk] - xs).permute(0, 2, 1).reshape(-1, c2.out_channels).double()
        gram += u.T @ u
        cross += r.T @ u
    # Ridge TOWARDS THE WEIGHTS IT HAS (the OBS-compensated ones), not towards zero: a large damp
    # leaves the pair as pruning made it, a small one moves it to the least-squares fit. Towards
    # zero, damp 0.1 shrank the weights audibly (+1.9 dB at 20 %) and 1e-3 over-fitted the crops.
    # Weighting every mel frame alike (1 / frame energy) was tried and did no better (20 %: +0.37 dB,
    # PESQ drop 0.18 vs +0.38 / 0.18 unweighted).
    ridge = damp * torch.diagonal(gram)[:-1].mean().clamp_min(1e-12)
    gram[:-1, :-1] += ridge * torch.eye(n - 1, dtype=torch.float64)  # the bias is not shrunk
    cross[:, :-1] += ridge * c2.weight.detach().flatten(1).double()
    # Symmetric positive definite once damped: Cholesky, a third of the work of a general solve.
    w = torch.cholesky_solve(cross.T, torch.linalg.cholesky(gram)).T  # (C_out, w * k + 1)
    c2.weight.copy_(w[:, :-1].reshape(c2.weight.shape).float())
    c2.bias.copy_(w[:, -1].float())


def refit_level(student: HiFiGANGenerator, teacher: HiFiGANGenerator, i: int, x_s: torch.Tensor,
                x_t: torch.Tensor, damp: float, chunk: int) -> None:
    """Sequential least-squares re-compensation of level i: pair by pair, in forward order, each
    convs2 re-fitted so that the student's state after it matches the teacher's, FROM THE STUDENT'S
    OWN STATE (so the error of every earlier pair and level is corrected where it arrives). OBS
    compensated each pair with the teacher's statistics only and the zero-lag approximation."""
    n = len(student.cfg.resblock_kernel_sizes)
    with torch.no_grad():
        u_s = torch.cat([student.ups[i](F.leaky_relu(x_s[k : k + chunk], _LRELU_SLOPE))
                         for k in range(0, len(x_s), chunk)])
        u_t = teacher.ups[i](F.leaky_relu(x_t, _LRELU_SLOPE))
        for s_blk, t_blk in zip(student.resblocks[i * n : (i + 1) * n], teacher.resblocks[i * n : (i + 1) * n],
                                strict=True):
            xs, xt = u_s, u_t
            for s1, s2, t1, t2 in zip(s_blk.convs1, s_blk.convs2, t_blk.convs1, t_blk.convs2, strict=True):
                xt = xt + t2(F.leaky_relu(t1(F.leaky_relu(xt, _LRELU_SLOPE)), _LRELU_SLOPE))
                _refit_pair(s1, s2, xs, xt, damp, chunk)
                xs = xs + s2(F.leaky_relu(s1(F.leaky_relu(xs, _LRELU_SLOPE)), _LRELU_SLOPE))


def _first_pruned_level(student: HiFiGANGenerator, teacher: HiFiGANGenerator) -> int:
    """The first level whose resblocks lost inner channels (levels before it are exact copies)."""
    n = len(student.cfg.resblock_kernel_sizes)
    for j, (s, t) in enumerate(zip(student.resblocks, teacher.resblocks, strict=True)):
        if [c.out_channels for c in s.convs1] != [c.out_channels for c in t.convs1]:
            return j // n
    return len(student.ups)


def crop_pool(clips: Sequence[SpeechClip], crops: int, crop_frames: int, seed: int) -> torch.Tensor:
    """(crops, n_mels, crop_frames) mel crops of real speech, drawn by a seeded generator."""
    usable = [c for c in clips if c.mel.shape[-1] >= crop_frames]
    if not usable:
        raise ConfigError(f"distillation needs calibration clips of at least {crop_frames} mel frames")
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(crops):
        clip = usable[int(torch.randint(len(usable), (1,), generator=gen))]
        s = int(torch.randint(clip.mel.shape[-1] - crop_frames + 1, (1,), generator=gen))
        out.append(torch.from_numpy(clip.mel[:, s : s + crop_frames].astype(np.float32)))
    return torch.stack(out)


def _relative_error(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (pred - target).pow(2).mean() / target.pow(2).mean().clamp_min(1e-12)


def _pool_error(fn: Any, x: torch.Tensor, target: torch.Tensor, chunk: int) -> float:
    """Relative squared error of fn over the whole pool (no grad), in chunks to bound memory."""
    with torch.no_grad():
        num = sum(float((fn(x[k : k + chunk]) - target[k : k + chunk]).pow(2).sum()) for k in range(0, len(x), chunk))
    return num / max(float(target.pow(2).sum()), 1e-12)


def level_errors(student: HiFiGANGenerator, teacher: HiFiGANGenerator, mels: torch.Tensor) -> list[float]:
    """Relative squared error of every level's output, each model running on its OWN activations
    (as at inference), on mel crops (B, n_mels, T): how far the student has drifted by each level."""
    out = []
    with torch.no_grad():
        x_s, x_t = student.conv_pre(mels), teacher.conv_pre(mels)
        for i in range(len(student.ups)):
            x_s, x_t = _level(student, i, x_s), _level(teacher, i, x_t)
            out.append(float(_relative_error(x_s, x_t)))
    return out


def distill(student: HiFiGANGenerator, teacher: HiFiGANGenerator, clips: Sequence[SpeechClip], steps: int,
            seconds: float, lr: float = 3e-4, crop_frames: int = 16, crops: int = 32, batch: int = 4,
            seed: int = 1234, refit: bool = True, damp: float = 0.1) -> dict[str, Any]:
    """Train `student` in place, level by level, for `steps` Adam steps per level (capped at
    `seconds` of wall time in all). Returns what was done: per level the relative squared error
    of its output over the crop pool before and after, and the loss of every step (the curve)."""
    if steps < 0 or seconds <= 0 or lr <= 0 or crop_frames < 1 or crops < 1 or not 1 <= batch <= crops:
        raise ConfigError(f"distillation needs steps >= 0, seconds > 0, lr > 0, crop_frames >= 1 and "
                          f"1 <= batch <= crops; got steps={steps}, seconds={seconds}, lr={lr}, "
                          f"crop_frames={crop_frames}, crops={crops}, batch={batch}")
    mels = crop_pool(clips, crops, crop_frames, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    first = _first_pruned_level(student, teacher)
    levels: list[dict[str, Any]] = []
    start = time.perf_counter()
    capped = False
    student.train()
    try:
        with torch.no_grad():
            x_s, x_t = student.conv_pre(mels), teacher.conv_pre(mels)
            t_last = x_t
            for i in range(len(teacher.ups)):
                t_last = _level(teacher, i, t_last)

        def rest(x: torch.Tensor, i: int) -> torch.Tensor:  # the student from level i to the last level
            for j in range(i, len(student.ups)):
                x = _level(student, j, x)
            return x

        for i in range(len(student.ups)):
            fwd_s = lambda x, i=i: _level(student, i, x)  # noqa: E731
            with torch.no_grad():
                t_out = _level(teacher, i, x_t)
            entry: dict[str, Any] = {"level": i, "losses": []}
            if i >= first and time.perf_counter() - start > seconds:
                capped = True
            elif i >= first:
                params = _level_params(student, i)
                saved = [p.detach().clone() for p in params]
                entry["error_before"] = _pool_error(fwd_s, x_s, t_out, batch)
                entry["output_error_before"] = _pool_error(lambda x, i=i: rest(x, i), x_s, t_last, batch)
                if refit:
                    refit_level(student, teacher, i, x_s, x_t, damp, batch)
                    entry["error_refit"] = _pool_error(fwd_s, x_s, t_out, batch)
                optimizer = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.99))
                with torch.enable_grad():
                    for _ in range(steps):
                        if time.perf_counter() - start > seconds:
                            capped = True
                            break
                        idx = torch.randperm(len(x_s), generator=gen)[:batch]
                        loss = _relative_error(fwd_s(x_s[idx]), t_out[idx])
                        optimizer.zero_grad(set_to_none=True)
                        loss.backward()
                        optimizer.step()
                        entry["losses"].append(float(loss.detach()))
                for p in params:
                    p.grad = None
                entry["error_after"] = _pool_error(fwd_s, x_s, t_out, batch)
                entry["output_error_after"] = _pool_error(lambda x, i=i: rest(x, i), x_s, t_last, batch)
                # Kept only if the LAST level's output (what conv_post turns into audio) is closer to the
                # teacher's: a smaller error at level i alone has made the output worse (see the docstring).
                if entry["output_error_after"] > entry["output_error_before"]:
                    with torch.no_grad():
                        for p, w in zip(params, saved, strict=True):
                            p.copy_(w)
                    entry["reverted"] = True
                log.info("distill level %s: relative error %.4g, refit %.4g, %d steps %.4g; at the output %.4g -> "
                         "%.4g%s (%.0f s so far)", i, entry["error_before"], entry.get("error_refit", float("nan")),
                         len(entry["losses"]), entry["error_after"], entry["output_error_before"],
                         entry["output_error_after"], " REVERTED" if entry.get("reverted") else "",
                         time.perf_counter() - start)
            levels.append(entry)
            with torch.no_grad():
                x_s = torch.cat([fwd_s(x_s[k : k + batch]) for k in range(0, len(x_s), batch)])
            x_t = t_out
    finally:
        student.eval()
    elapsed = time.perf_counter() - start
    if capped:
        log.warning("DISTILLATION TIME CAP HIT: stopped after %.0f s (prune.distill_seconds=%s) with %d of %d "
                    "planned steps; the result depends on machine speed and is NOT deterministic",
                    elapsed, seconds, sum(len(e["losses"]) for e in levels),
                    steps * sum(1 for e in levels if "error_before" in e))
    return {"method": "blockwise", "steps_per_level": steps, "steps_done": sum(len(e["losses"]) for e in levels),
            "seconds": round(elapsed, 1), "seconds_cap": seconds, "time_cap_hit": capped, "lr": lr,
            "crop_frames": crop_frames, "crops": crops, "batch": batch, "seed": seed,
            "first_trained_level": first, "levels": levels}


def save_curve(result: dict[str, Any], path: Path) -> Path:
    """The run as a PNG (matplotlib Agg), written atomically: left, each trained level's error before,
    after the re-fit and at the end; right, the loss of every Adam step per level (when any ran)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (bars, curve) = plt.subplots(1, 2, figsize=(11, 4), dpi=100)
    try:
        trained = [e for e in result["levels"] if "error_before" in e]
        for n, (key, label) in enumerate((("error_before", "pruned"), ("error_refit", "after re-fit"),
                                          ("error_after", "final"))):
            values = [e.get(key, float("nan")) for e in trained]
            bars.bar([i + 0.27 * (n - 1) for i in range(len(trained))], values, width=0.27, label=label)
        bars.set_xticks(range(len(trained)), [f"level {e['level']}" for e in trained])
        bars.set_yscale("log")
        bars.set_ylabel("relative squared error vs teacher (crop pool)")
        if trained:
            bars.legend()
        for entry in trained:
            if entry["losses"]:
                curve.plot(range(1, len(entry["losses"]) + 1), entry["losses"], label=f"level {entry['level']}")
        curve.set_xlabel("Adam step (per level)")
        curve.set_title(f"{result['steps_done']} steps" if result["steps_done"] else "no Adam steps (distill_steps 0)")
        if curve.lines:
            curve.set_yscale("log")
            curve.legend()
        cap = " - TIME CAP HIT" if result["time_cap_hit"] else ""
        fig.suptitle(f"block-wise distillation, {result['seconds']:.0f} s of {result['seconds_cap']:.0f} s{cap}")
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return path
