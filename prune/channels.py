"""Structured channel pruning of HiFi-GAN: a smaller DENSE generator with fewer FLOPs.

What can shrink without touching anything else is the inner width of each ResBlock1 pair,
x + convs2(lrelu(convs1(lrelu(x)))): the output channels of convs1 are the input channels of
convs2 and nothing else reads them, so dropping channel c removes row c of convs1 and column c
of convs2. Residual widths (ups outputs, block inputs/outputs) stay as trained. The result is
expressed by `VocoderConfig.resblock_inner_channels`, so the runtime rebuilds it from its record.

Which channels go, and what happens to the rest (measured on the real V1 weights, held-out
speech, gate +0.3 dB log-mel / -0.1 PESQ vs FP32; see the report in the stage module):
  l1   drop the lowest-L1 convs1 filters, the same fraction in every pair, nothing else. Already
       10 % of the channels costs +4.2 dB log-mel: HiFi-GAN has no redundant filters by norm.
  obs  Optimal-Brain-Surgeon style, per pair, on second moments of convs2's input measured on
       real calibration speech: greedily drop the channel whose loss, after re-expressing it by
       least squares through the channels that stay (their convs2 columns and the bias absorb
       it), costs least; then spend the FLOP budget where that relative cost per FLOP saved is
       lowest across all pairs ("global", see `_global_plan`), or the same fraction everywhere
       ("uniform").
`fraction` is always the share of the generator's total MACs to remove.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from voxport.errors import ConfigError
from voxport.models.vocoder import HiFiGANGenerator, ResBlock1
from voxport.prune.flops import count_macs

log = logging.getLogger(__name__)

IMPORTANCE = ("obs", "l1")
ALLOCATION = ("global", "uniform", "gate")
Key = tuple[int, int]  # (resblock index, pair index)
# A pruned generator -> (cost, figures): cost in shares of the gate (0 = inaudible, 1 = the whole
# budget), measured on CALIBRATION speech; figures are recorded as they are.
Listen = Callable[[HiFiGANGenerator], tuple[float, dict[str, Any]]]


def input_moments(generator: HiFiGANGenerator, mels: Sequence[torch.Tensor]) -> dict[Key, tuple[torch.Tensor, ...]]:
    """(sum x, sum x x^T, samples) of every convs2 input over real-speech mels, float64."""
    acc: dict[Key, list[Any]] = {}
    handles = []
    for j, block in enumerate(generator.resblocks):
        for k, conv in enumerate(block.convs2):
            def hook(_m: nn.Module, args: tuple, _out: torch.Tensor, key: Key = (j, k)) -> None:
                x = args[0].transpose(0, 1).reshape(args[0].shape[1], -1)  # (C, batch * time)
                s1, s2 = x.sum(1).double(), (x @ x.T).double()
                if key in acc:
                    acc[key][0] += s1
                    acc[key][1] += s2
                    acc[key][2] += x.shape[1]
                else:
                    acc[key] = [s1, s2, x.shape[1]]
            handles.append(conv.register_forward_hook(hook))
    try:
        with torch.no_grad():
            for mel in mels:
                generator(mel)
    finally:
        for h in handles:
            h.remove()
    return {key: (v[0], v[1], torch.tensor(float(v[2]), dtype=torch.float64)) for key, v in acc.items()}


def _obs(weight: torch.Tensor, bias: torch.Tensor, moments: tuple[torch.Tensor, ...], steps: int,
         damp: float, stop_at_dip: bool = False) -> tuple[list[int], list[float], torch.Tensor, torch.Tensor]:
    """Greedy OBS removal of `steps` input channels of a conv: (order, costs, new weight, new bias).

    z = [x; 1] has second moment H; with P = H^-1, dropping channel c and re-expressing it through
    the rest by least squares raises the output MSE by ||W[:, c]||^2 / P_cc (zero-lag approximation
    over the kernel taps), and the rest absorbs it as W_j -= W_c P_jc / P_cc (the bias for j = 1).
    stop_at_dip: end early at the first removal cheaper than the one before (see `_global_plan`).
    """
    s1, s2, n = moments
    c_in = weight.shape[1]
    h = torch.empty(c_in + 1, c_in + 1, dtype=torch.float64)
    h[:c_in, :c_in], h[:c_in, c_in], h[c_in, :c_in], h[c_in, c_in] = s2 / n, s1 / n, s1 / n, 1.0
    # Damping keeps H invertible where channels are dead or collinear (ridge regression).
    h[:c_in, :c_in] += damp * torch.diagonal(h[:c_in, :c_in]).mean() * torch.eye(c_in, dtype=torch.float64)
    p = torch.linalg.inv(h)
    w, b = weight.detach().double().clone(), bias.detach().double().clone()
    alive = torch.ones(c_in, dtype=torch.bool)
    order, costs = [], []
    for _ in range(steps):
        cost = w.pow(2).sum(dim=(0, 2)) / torch.diagonal(p)[:c_in]
        cost[~alive] = float("inf")
        c = int(torch.argmin(cost))
        if stop_at_dip and costs and float(cost[c]) < costs[-1]:
            break
        r = p[:, c] / p[c, c]
        wc = w[:, c, :].clone()
        w -= wc[:, None, :] * r[None, :c_in, None]
        b -= wc.sum(dim=1) * r[c_in]
        w[:, c, :] = 0.0
        p = p - torch.outer(p[:, c], p[c, :]) / p[c, c]
        p[c, :], p[:, c], p[c, c] = 0.0, 0.0, 1.0
        alive[c] = False
        order.append(c)
        costs.append(float(cost[c]))
    return order, costs, w.float(), b.float()


def _macs_per_channel(generator: HiFiGANGenerator) -> tuple[dict[Key, float], int]:
    """MACs per second-ish pass that one inner channel of each pair costs, and the total."""
    report = count_macs(generator, (torch.zeros(1, generator.cfg.num_mels, 64),))
    per = {}
    for j, block in enumerate(generator.resblocks):
        for k, conv in enumerate(block.convs1):
            pair = report.per_layer[f"resblocks.{j}.convs1.{k}"] + report.per_layer[f"resblocks.{j}.convs2.{k}"]
            per[(j, k)] = pair / conv.out_channels
    return per, report.macs


def _global_plan(generator: HiFiGANGenerator, moments: dict, fraction: float, damp: float,
                 macs: dict[Key, float], total: int) -> dict[Key, int]:
    """Channels to drop per pair: cheapest relative output error per MAC saved, across all pairs.

    Each pair's greedy OBS sequence is used only up to its first dip (a removal that costs less
    than the one before it: the compensations so far have reshuffled the pair's weights and the
    quadratic model no longer orders its channels). Measured against letting every pair run on
    with a running maximum, this keeps the 256-channel first level nearly intact and halves the
    log-mel increase (15 % of FLOPs: +0.25 dB instead of +0.40 dB).
    """
    candidates = []
    for j, block in enumerate(generator.resblocks):
        for k, conv in enumerate(block.convs2):
            key = (j, k)
            w = conv.weight.detach().double()
            s1, s2, n = moments[key]
            energy = max(float(torch.einsum("oct,cd,odt->", w, s2 / n, w)), 1e-30)  # E||convs2 out||^2
            _, costs, _, _ = _obs(conv.weight, conv.bias, moments[key], conv.in_channels - 1, damp, stop_at_dip=True)
            candidates += [(cost / energy / macs[key], i, key) for i, cost in enumerate(costs)]
    candidates.sort()
    plan: dict[Key, int] = {}
    saved = 0.0
    for _score, _i, key in candidates:  # ascending and monotone per pair: each pair's steps come in order
        if saved >= fraction * total:
            break
        plan[key] = plan.get(key, 0) + 1
        saved += macs[key]
    if saved < fraction * total:
        raise ConfigError(f"structured pruning cannot remove {fraction:.0%} of the FLOPs with allocation 'global' "
                          f"(at most {saved / total:.1%}); use a smaller prune.sparsity or allocation=uniform")
    return plan


def _gate_plan(generator: HiFiGANGenerator, moments: dict, fraction: float, damp: float, macs: dict[Key, float],
               total: int, listen: Listen, probe: float, weight: Callable[[Key], float] = lambda key: 1.0,
               weighted_total: float | None = None, unit: str = "FLOPs",
               ) -> tuple[dict[Key, int], list[dict[str, Any]]]:
    """Channels to drop per pair, chosen by what the GATE hears, not by a feature-domain error.

    Each pair alone loses `probe` of its channels (OBS-chosen and compensated) and the listener
    scores the whole generator on calibration speech (prune/structured.py: its log-mel increase vs
    FP32 as a share of the gate). Pairs are then cut at `probe`, cheapest cost per MAC saved first,
    the last one only as far as the target needs. A probe is ~4 s of speech through the
    generator, so 36 probes cost ~2.5 min on 2 cores.

    Measured on the real V1 weights (held-out gate clips): OBS's own global allocation ranks by
    squared error of convs2's output, which loud low bands dominate; at ~20 % of the FLOPs it gives
    +0.46 dB log-mel where ranking by log-mel alone gave +0.33 dB. The 256- and 128-channel levels
    take most of the cut: halving most of their pairs costs the gate a few hundredths of a dB each,
    while the 64- and 32-channel pairs cost 0.1-0.6 dB.

    `weight(pair)` is what one of its FLOPs costs in time relative to the others (`_level_weights`):
    pairs are then ranked per unit of time saved and `fraction` is a share of `weighted_total`
    (`_weighted_total`; `total` when no weights are given).
    """
    rows = []
    for j, block in enumerate(generator.resblocks):
        for k, conv in enumerate(block.convs1):
            n = max(1, round(probe * conv.out_channels))
            model, _ = apply_plan(generator, {(j, k): n}, "obs", moments, damp)
            cost, figures = listen(model)
            rows.append({"pair": f"resblocks.{j}.convs1/2.{k}", "key": (j, k), "drop": n, "cost": float(cost),
                         "flops_share": macs[(j, k)] * n / total, "time_weight": weight((j, k)), **figures})
    # Cheapest gate cost per unit of (time-weighted) work saved first.
    rows.sort(key=lambda r: (max(r["cost"], 0.0) / (r["flops_share"] * r["time_weight"]), r["key"]))
    plan: dict[Key, int] = {}
    weighted_total = total if weighted_total is None else weighted_total
    saved, goal = 0.0, fraction * weighted_total
    for row in rows:
        if saved >= goal:
            break
        key, per_channel = row["key"], macs[row["key"]] * row["time_weight"]
        n = min(row["drop"], math.ceil((goal - saved) / per_channel))
        plan[key] = n
        saved += n * per_channel
    if saved < goal:
        raise ConfigError(f"structured pruning cannot remove {fraction:.0%} of the {unit} with allocation 'gate' "
                          f"and sensitivity_probe {probe} (at most {saved / weighted_total:.1%}); raise "
                          "prune.sensitivity_probe")
    table = [{**{k: v for k, v in r.items() if k != "key"}, "cut": plan.get(r["key"], 0)} for r in rows]
    return plan, table


def prune_vocoder(generator: HiFiGANGenerator, fraction: float, importance: str = "obs",
                  allocation: str = "global", mels: Sequence[torch.Tensor] = (), damp: float = 1e-3,
                  listen: Listen | None = None, probe: float = 0.5,
                  level_time_weights: Sequence[float] | None = None,
                  ) -> tuple[HiFiGANGenerator, dict[str, Any]]:
    """A new generator with `fraction` of the MACs removed from resblock inner channels; the parent
    is left untouched. Returns (pruned, details). Allocation `gate` needs `listen` (see `_gate_plan`).

    `level_time_weights` (allocation `gate` only): per upsampling level, what one FLOP of its
    resblocks costs in time relative to the others; `fraction` is then a share of that
    time-weighted total (see `_level_weights`)."""
    if any(not isinstance(b, ResBlock1) for b in generator.resblocks):
        raise ConfigError("structured pruning needs HiFi-GAN resblock '1' (convs1 -> convs2 pairs)")
    if importance not in IMPORTANCE or allocation not in ALLOCATION:
        raise ConfigError(f"prune.importance must be one of {IMPORTANCE} and prune.allocation one of "
                          f"{ALLOCATION}; got '{importance}', '{allocation}'")
    if importance == "obs" and not mels:
        raise ConfigError("prune.importance 'obs' needs calibration speech (mels)")
    if allocation == "gate" and (importance != "obs" or listen is None or not 0.0 < probe < 1.0):
        raise ConfigError("prune.allocation 'gate' needs importance 'obs', a listener (the component's gate on "
                          f"calibration speech) and 0 < prune.sensitivity_probe < 1 (got {probe})")
    if level_time_weights is not None and allocation != "gate":
        raise ConfigError(f"prune.level_time_weights needs prune.allocation 'gate', got '{allocation}'")
    macs, total = _macs_per_channel(generator)
    weight = _level_weights(generator, level_time_weights)
    resblock_share = sum(macs[key] * _width(generator, key) for key in macs) / total
    weighted_total = _weighted_total(generator, macs, total, weight)
    prunable = sum(macs[key] * weight(key) * _width(generator, key) for key in macs) / weighted_total
    unit = "FLOPs" if level_time_weights is None else "time-weighted FLOPs (prune.level_time_weights)"
    if not 0.0 <= fraction < prunable:
        raise ConfigError(f"structured pruning fraction must be in [0, {prunable:.3f}) of the generator's "
                          f"{unit} (the resblock inner channels' share), got {fraction}")
    moments = input_moments(generator, mels) if importance == "obs" else {}
    sensitivity: list[dict[str, Any]] = []
    if importance == "obs" and allocation == "global":
        plan = _global_plan(generator, moments, fraction, damp, macs, total)
    elif allocation == "gate":
        plan, sensitivity = _gate_plan(generator, moments, fraction, damp, macs, total, listen, probe, weight,
                                       weighted_total, unit)
    else:  # the same share of every pair's channels; resblocks hold `resblock_share` of the MACs
        per_pair = fraction / resblock_share
        plan = {(j, k): round(per_pair * c.out_channels) for j, b in enumerate(generator.resblocks)
                for k, c in enumerate(b.convs1)}
    pruned, widths = apply_plan(generator, plan, importance, moments, damp)
    details = {"method": "structured_channels", "importance": importance, "allocation": allocation,
               "target_flops_fraction": fraction, "target_unit": unit, "damp": damp,
               "resblock_flops_share": resblock_share, "inner_channels": [list(r) for r in widths]}
    if level_time_weights is not None:
        details["level_time_weights"] = [float(w) for w in level_time_weights]
    if sensitivity:
        details["sensitivity"] = {"probe": probe, "pairs": sensitivity}
    log.info("structured pruning (%s, %s): %.0f %% of the %s targeted", importance, allocation, 100 * fraction, unit)
    return pruned.eval(), details


def _width(generator: HiFiGANGenerator, key: Key) -> int:
    return generator.resblocks[key[0]].convs1[key[1]].out_channels


def _weighted_total(generator: HiFiGANGenerator, macs: dict[Key, float], total: int,
                    weight: Callable[[Key], float]) -> float:
    """The generator's MACs with each resblock pair's counted `weight` times (the rest, conv_pre,
    upsamplers and conv_post, once): `total` when every weight is 1."""
    return total + sum(macs[key] * (weight(key) - 1.0) * _width(generator, key) for key in macs)


def _level_weights(generator: HiFiGANGenerator, weights: Sequence[float] | None) -> Callable[[Key], float]:
    """Pair -> the time one FLOP of it costs relative to the others, from its upsampling level.

    FLOPs are not time once the INT8 search has run: the lower-rate levels go INT8 and the
    full-rate level stays float (its activations follow the waveform's level, which a static
    8-bit scale cannot; every search on HiFi-GAN V1 so far), and ONNX Runtime's float 32-channel
    convs run at ~55 % of its FP32 peak. Measured with `voxport profile` on the 17 % chain's INT8
    vocoder: a level-4 FLOP cost ~8x a level-1..3 one on AVX-512 VNNI (184 GFLOP/s against 1439
    GOP/s) and ~3x on AVX2 (59 GFLOP/s against 178 GOP/s).
    """
    levels = len(generator.cfg.upsample_rates)
    if weights is None:
        return lambda key: 1.0
    weights = tuple(float(w) for w in weights)
    if len(weights) != levels or any(not w > 0 for w in weights):
        raise ConfigError(f"prune.level_time_weights must give {levels} positive numbers (one per upsampling "
                          f"level), got {list(weights)}")
    per_level = len(generator.resblocks) // levels
    return lambda key: weights[key[0] // per_level]


def apply_plan(generator: HiFiGANGenerator, plan: dict[Key, int], importance: str, moments: dict,
               damp: float = 1e-3) -> tuple[HiFiGANGenerator, list[tuple[int, ...]]]:
    """A new generator with `plan[(j, k)]` inner channels dropped from pair k of resblock j (OBS:
    chosen and compensated by `_obs` on `moments`; l1: lowest-L1 convs1 filters); the parent is
    left untouched. Returns (pruned, inner widths)."""
    state = {k: v.detach().clone() for k, v in generator.state_dict().items()}
    widths = []
    for j, block in enumerate(generator.resblocks):
        row = []
        for k, (c1, c2) in enumerate(zip(block.convs1, block.convs2, strict=True)):
            n_drop = min(plan.get((j, k), 0), c1.out_channels - 1)
            if n_drop == 0:
                row.append(c1.out_channels)
                continue
            if importance == "obs":
                order, _, w2, b2 = _obs(c2.weight, c2.bias, moments[(j, k)], n_drop, damp)
                dropped = torch.zeros(c1.out_channels, dtype=torch.bool)
                dropped[order] = True
                keep = torch.nonzero(~dropped).flatten()
            else:
                score = c1.weight.detach().abs().sum(dim=(1, 2))
                keep = torch.sort(torch.topk(score, c1.out_channels - n_drop).indices).values
                w2, b2 = c2.weight.detach(), c2.bias.detach()
            stem1, stem2 = f"resblocks.{j}.convs1.{k}", f"resblocks.{j}.convs2.{k}"
            state[f"{stem1}.weight"] = state[f"{stem1}.weight"][keep].contiguous()
            state[f"{stem1}.bias"] = state[f"{stem1}.bias"][keep].contiguous()
            state[f"{stem2}.weight"] = w2[:, keep].contiguous()
            state[f"{stem2}.bias"] = b2.clone()
            row.append(int(keep.numel()))
        widths.append(tuple(row))
    pruned = HiFiGANGenerator(dataclasses.replace(generator.cfg, resblock_inner_channels=tuple(widths)))
    pruned.load_state_dict(state, strict=True)
    return pruned.eval(), widths
