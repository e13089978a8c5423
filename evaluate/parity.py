"""Component-level validation of an artifact against its PyTorch original, on real inputs.

Each component gets the figures a user of it cares about: waveform SNR and multi-resolution STFT distance for the
vocoder, embedding cosine for the speaker encoder, mel SNR and stop-step agreement over a fixed
number of decoder steps (same prenet masks) for the synthesizer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from voxport.evaluate import metrics
from voxport.models.graph import GraphSpec
from voxport.runtime.backends.base import Runner


def vocoder(
    spec: GraphSpec, run_artifact: Runner, feeds: Sequence[Mapping[str, np.ndarray]], tol: Mapping[str, Any]
) -> tuple[dict[str, Any], list[str]]:
    """Waveform parity on real-speech mels: SNR and the worst MR-STFT distance.

    The reference is the PyTorch model evaluated in float64. Two float32 evaluations of the same
    HiFi-GAN (PyTorch's and ONNX Runtime's) differ by summation order, and on some real clips
    PyTorch float32 itself is only ~90 dB from the exact result, so an fp32-vs-fp32 SNR measures
    two rounding noises, not the export. Both figures, and that noise floor, are recorded.
    """
    import copy

    import torch

    from voxport.export.onnx import torch_runner

    run_ref = torch_runner(spec)
    exact = copy.deepcopy(spec.module).double().eval()
    snr64, snr32, floor, stft, max_abs, failures = [], [], [], [], [], []
    for i, feed in enumerate(feeds):
        ref, out = run_ref(feed)["wav"], run_artifact(feed)["wav"]
        if ref.shape != out.shape:
            failures.append(f"vocoder[{i}]: wav shape {out.shape} != reference {ref.shape}")
            continue
        with torch.inference_mode():
            ref64 = exact(torch.from_numpy(feed["mel"]).double())[0].numpy()
        snr64.append(metrics.snr_db(ref64, out))
        snr32.append(metrics.snr_db(ref, out))
        floor.append(metrics.snr_db(ref64, ref))
        stft.append(metrics.mr_stft_distance(ref.ravel(), out.ravel()))
        max_abs.append(metrics.max_abs_diff(ref, out))
    figures = {
        "inputs": len(feeds),
        "wav_snr_db_min": min(snr64, default=float("nan")),
        "wav_snr_db_min_vs_torch_fp32": min(snr32, default=float("nan")),
        "torch_fp32_snr_db_min_vs_fp64": min(floor, default=float("nan")),
        "mr_stft_distance_max": max(stft, default=float("nan")),
        "wav_max_abs_vs_torch_fp32": max(max_abs, default=float("nan")),
        "reference": "PyTorch float64 evaluation of the same weights",
    }
    # A clip below `min_snr_db` still passes when the export is about as close to the exact result
    # as PyTorch FP32 itself (`accept_torch_floor`): a fine-tuned pruned HiFi-GAN measured ONNX
    # 94.4 dB from float64 where PyTorch FP32 was 90.5 dB; the export was not what was inexact.
    # "About": within `torch_floor_slack_db`, since two FP32 engines summing in different orders
    # differ from float64 by different amounts (AVX-512 host, a pruned and fine-tuned model: ORT
    # 98.4 dB, 3.1 dB further than PyTorch). 6 dB is twice PyTorch's own error; an export bug
    # (a wrong padding, a weight left out) costs tens of dB.
    accept_floor = bool(tol.get("accept_torch_floor", False))
    slack = float(tol.get("torch_floor_slack_db", 0.0))
    below = [i for i, v in enumerate(snr64) if v < tol["min_snr_db"]]
    failing = [i for i in below if not (accept_floor and snr64[i] >= floor[i] - slack)]
    figures["clips_passed_by_torch_floor"] = len(below) - len(failing)
    if not snr64 or failing:
        worst = min((snr64[i] - floor[i] for i in failing), default=float("nan"))
        floor_note = (f" and {-worst:.1f} dB less exact than PyTorch FP32 itself (allowed: {slack:g} dB)"
                      if accept_floor and failing else "")
        failures.append(f"vocoder: waveform SNR {figures['wav_snr_db_min']:.1f} dB < {tol['min_snr_db']} dB"
                        + floor_note)
    return figures, failures


def speaker_encoder(
    spec: GraphSpec, run_artifact: Runner, feeds: Sequence[Mapping[str, np.ndarray]], tol: Mapping[str, Any]
) -> tuple[dict[str, Any], list[str]]:
    """Partial-embedding cosine (worst partial) and utterance-embedding cosine (worst utterance)."""
    from voxport.export.onnx import torch_runner

    run_ref = torch_runner(spec)
    partial_cos, utter_cos, failures = [], [], []
    for i, feed in enumerate(feeds):
        ref, out = run_ref(feed)["embeddings"], run_artifact(feed)["embeddings"]
        if ref.shape != out.shape:
            failures.append(f"speaker_encoder[{i}]: shape {out.shape} != reference {ref.shape}")
            continue
        partial_cos.append(min(metrics.cosine(a, b) for a, b in zip(ref, out, strict=True)))
        utter_cos.append(metrics.cosine(_utterance(ref), _utterance(out)))
    figures = {
        "inputs": len(feeds),
        "partial_cosine_min": min(partial_cos, default=float("nan")),
        "embedding_cosine_min": min(utter_cos, default=float("nan")),
    }
    if utter_cos and figures["embedding_cosine_min"] < tol["min_cosine"]:
        failures.append(
            f"speaker_encoder: embedding cosine {figures['embedding_cosine_min']:.7f} < {tol['min_cosine']}"
        )
    return figures, failures


def _utterance(partials: np.ndarray) -> np.ndarray:
    mean = partials.mean(axis=0)
    return mean / np.linalg.norm(mean)


def synthesizer(
    specs: Mapping[str, GraphSpec], runners: Mapping[str, Runner], cases: Sequence[tuple[list[int], np.ndarray]],
    steps: int, seed: int, tol: Mapping[str, Any], cfg: Any,
) -> tuple[dict[str, Any], list[str]]:
    """The three graphs together, through the host loop, against PyTorch: same text ids, same real
    speaker embedding, same seeded prenet masks, a fixed number of decoder steps (stop ignored)."""
    from voxport.models.prenet_masks_torch import TorchMasks
    from voxport.models.synthesizer_reference import torch_runner
    from voxport.runtime.synthesizer_loop import run_host_loop

    ref_runners = [torch_runner(specs[n]) for n in ("encoder", "decoder_step", "postnet")]
    test_runners = [runners[n] for n in ("encoder", "decoder_step", "postnet")]
    mel_snr, dec_snr, stop_agree, mel_l1, failures = [], [], [], [], []
    for i, (ids, embedding) in enumerate(cases):
        results = []
        for run_enc, run_dec, run_post in (ref_runners, test_runners):
            results.append(run_host_loop(
                run_enc, run_dec, run_post, np.asarray([ids], dtype=np.int64),
                np.asarray(embedding, dtype=np.float32)[None], 0, TorchMasks(seed),  # a fresh one per side
                cfg, max_decoder_steps=steps, stop_on_token=False,
            ))
        ref, out = results
        if ref.mel.shape != out.mel.shape:
            failures.append(f"synthesizer[{i}]: mel shape {out.mel.shape} != reference {ref.mel.shape}")
            continue
        mel_snr.append(metrics.snr_db(ref.mel, out.mel))
        dec_snr.append(metrics.snr_db(ref.decoder_mel, out.decoder_mel))
        mel_l1.append(metrics.mel_l1(ref.mel, out.mel))
        stop_agree.append(metrics.stop_step_agreement(ref.stops.ravel(), out.stops.ravel()))
    figures = {
        "inputs": len(cases), "decoder_steps": steps,
        "mel_snr_db_min": min(mel_snr, default=float("nan")),
        "decoder_mel_snr_db_min": min(dec_snr, default=float("nan")),
        "mel_l1_max": max(mel_l1, default=float("nan")),
        "stop_agreement_min": min(stop_agree, default=float("nan")),
    }
    if mel_snr and figures["mel_snr_db_min"] < tol["min_mel_snr_db"]:
        failures.append(f"synthesizer: mel SNR {figures['mel_snr_db_min']:.1f} dB < {tol['min_mel_snr_db']} dB")
    if stop_agree and figures["stop_agreement_min"] < tol["min_stop_agreement"]:
        failures.append(
            f"synthesizer: stop-step agreement {figures['stop_agreement_min']:.3f} < {tol['min_stop_agreement']}"
        )
    return figures, failures
