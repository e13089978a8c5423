"""`voxport` command line: thin entry points over importable work functions.

Hydra commands (build, bench, serve) take Hydra overrides (`voxport build stack=mockingbird
stack.vocoder.checkpoint=g.pt`, `-m` sweeps, `--help`, `--cfg job`); the audio commands (clone,
vocode, doctor, corpus) take ordinary flags, and those that select artifacts (clone, vocode, doctor)
also take overrides after them, composed from the same conf/ (`voxport doctor target.preference=[torch]`).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from voxport.errors import ConfigError, VoxportError

if TYPE_CHECKING:
    from voxport.runtime.select import TargetConfig

log = logging.getLogger(__name__)
CONF_DIR = Path(__file__).resolve().parent / "conf"

HYDRA_COMMANDS = ("build", "bench", "serve")
COMMANDS = {
    "build": "optimize, export and validate the stack; write the artifact bundle",
    "bench": "time every artifact of a bundle (RTF, memory, FLOP/s); --compare BASELINE.json for CI",
    "clone": "clone a voice: reference audio + text -> wav",
    "serve": "HTTP voice-cloning service over a bundle (loopback by default; docs at /docs)",
    "vocode": "copy synthesis: wav -> mel -> vocoder -> wav (real HiFi-GAN weights)",
    "doctor": "describe this host and which artifact each component would use",
    "corpus": "assemble the real-speech corpus from Debian packages",
    "package": "package a bundle for deployment: format=triton out=DIR writes a Triton model repository",
    "profile": "where an ONNX or OpenVINO artifact's time goes: per op type and node, achieved vs peak ops/s",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        width = max(map(len, COMMANDS))
        lines = [f"  {name:<{width}}  {text}" for name, text in COMMANDS.items()]
        print("usage: voxport <command> [options]\n\ncommands:\n" + "\n".join(lines))
        print("\n`voxport <command> --help` for the options of one command.")
        return 0 if argv[:1] in ([], ["-h"], ["--help"]) else 2
    command, rest = argv[0], argv[1:]
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if command in HYDRA_COMMANDS:
            if command == "bench":
                rest = hydra_compare(rest)
            sys.argv = [f"voxport {command}", *rest]
            return run_hydra(command) or 0
        return globals()[f"cmd_{command}"](rest)
    except VoxportError as exc:
        # One line, naming the problem; the traceback is for bugs, not for bad input.
        print(f"voxport {command}: error: {exc}", file=sys.stderr)
        return 1


def hydra_compare(args: list[str]) -> list[str]:
    """`--compare PATH` / `--compare=PATH` -> the Hydra override `compare=PATH`."""
    out, i = [], 0
    while i < len(args):
        if args[i] == "--compare" and i + 1 < len(args):
            out.append(f"compare={args[i + 1]}")
            i += 2
            continue
        out.append("compare=" + args[i].split("=", 1)[1] if args[i].startswith("--compare=") else args[i])
        i += 1
    return out


def parser(command: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=f"voxport {command}", description=COMMANDS[command])


SELECTION_HELP = ("Which artifact serves each graph comes from the config's `target` (conf/target/; target=cpu: "
                  "preference cpu,torch, not strict). Overrides (key=value) after the flags are composed from "
                  "conf/ as for `voxport build`, e.g. `target=cuda target.preference=[torch] target.strict=true`.")


def selection_parser(command: str) -> argparse.ArgumentParser:
    """A parser for a command that selects artifacts: --bundle, --prefer, --strict and overrides."""
    ap = argparse.ArgumentParser(prog=f"voxport {command}", description=COMMANDS[command], epilog=SELECTION_HELP)
    ap.add_argument("--bundle", type=Path, default=None,
                    help="bundle from `voxport build` (default: the config's out_dir, artifacts/default)")
    ap.add_argument("--prefer", default=None, metavar="TIERS",
                    help="shortcut for target.preference=[TIERS]: tiers of trt, onnx-cuda, cpu, onnx, torch in "
                         "order, comma-separated (default: target.preference; target=cpu: cpu,torch)")
    ap.add_argument("--strict", action="store_true",
                    help="shortcut for target.strict=true: refuse any fallback from the first preference")
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (see below)")
    return ap


def parse_selection(ap: argparse.ArgumentParser, argv: list[str]) -> tuple[argparse.Namespace, TargetConfig, Path]:
    """(flags, the `target` of the composed config, the bundle directory). Flags win over overrides."""
    from voxport.pipeline.schema import RunConfig
    from voxport.runtime.select import TargetConfig

    args = ap.parse_intermixed_args(argv)
    overrides = list(args.overrides)
    if args.prefer:
        overrides.append(f"target.preference=[{args.prefer}]")
    if args.strict:
        overrides.append("target.strict=true")
    cfg = compose(overrides)
    return args, TargetConfig.from_cfg(cfg.target), args.bundle or Path(RunConfig.from_cfg(cfg).out_dir)


def compose(overrides: Sequence[str]) -> Any:
    """The config `voxport build` composes from conf/ with these overrides; a bad override (unknown
    key, unknown group option, syntax) is a one-line ConfigError."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return hydra_compose("config", overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigError(hydra_message(exc)) from None


def hydra_message(exc: Exception) -> str:
    """Hydra's multi-line composition error as one line."""
    cause = exc.__cause__
    key = getattr(cause, "full_key", None)
    if key and "not in struct" in str(cause):
        return f"unknown config key '{key}' (`voxport build --cfg job` prints every key)"
    lines = []
    for line in str(exc).splitlines():  # its first paragraph; the search path and doc links are noise
        if not line.strip() or line.startswith(("See https://", "Config search path")):
            break
        lines.append(line.strip())
    options = getattr(exc, "options", None)
    return " ".join(lines) + (f" (options: {', '.join(options)})" if options else "")



def run_hydra(command: str) -> int:
    import hydra
    from omegaconf import DictConfig

    # An absolute path: the editable install maps the package, and Hydra's module lookup of a
    # relative path ("voxport.conf") would need conf/ to be a Python package.
    @hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
    def _main(cfg: DictConfig) -> Any:
        logging.getLogger().addFilter(_drop_quantizer_chatter)
        try:
            if command == "build":
                return _build(cfg)
            if command == "bench":
                return _bench(cfg)
            from voxport.runtime.serve.app import serve

            return serve(cfg)
        except VoxportError as exc:
            print(f"voxport {command}: error: {exc}", file=sys.stderr)
            raise SystemExit(1) from None

    _main()
    return 0


def _drop_quantizer_chatter(record: logging.LogRecord) -> bool:
    """ONNX Runtime's quantizer logs one INFO line on the root logger per tensor it leaves float
    (dozens per build); our stages record which layers stayed float, so only its warnings pass."""
    return not (record.name == "root" and record.levelno < logging.WARNING
                and "onnxruntime" in record.pathname.replace("\\", "/").split("/"))


def _build(cfg: Any) -> None:
    from voxport.pipeline.engine import build_bundle
    from voxport.pipeline.summary import record_sweep_job

    sweep = _sweep_job()
    if sweep is not None:  # `-m`: every variant builds its own bundle inside the sweep directory
        cfg.out_dir = str(sweep[2])
    bundle = build_bundle(cfg)
    print(bundle.summary())
    if sweep is not None:
        table = record_sweep_job(sweep[0], sweep[1], bundle.records)
        print(f"\nsweep ranking so far ({sweep[0]}/sweep_summary.md):\n{table}")
    print(f"\nbundle: {bundle.path}/manifest.json")


def _sweep_job() -> tuple[Path, str, Path] | None:
    """(sweep directory, variant name, bundle directory) of a `-m` job, else None."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    hc = HydraConfig.get()
    return Path(hc.sweep.dir), hc.job.override_dirname or str(hc.job.num), Path(hc.runtime.output_dir) / "bundle"


def _bench(cfg: Any) -> None:
    from voxport.benchmarks.config import BenchConfig
    from voxport.benchmarks.run import run_bench
    from voxport.pipeline.schema import RunConfig

    run = run_bench(cfg)
    print(run.table)
    print("wrote " + ", ".join(map(str, run.paths)))
    run.raise_for_failures(RunConfig.from_cfg(cfg).compare, BenchConfig.from_cfg(cfg.bench).max_regression)


def cmd_corpus(argv: list[str]) -> int:
    from voxport.evaluate.corpus import build_corpus, default_corpus_dir

    ap = parser("corpus")
    ap.add_argument("--out", type=Path, default=None, help=f"default: {default_corpus_dir()}")
    ap.add_argument("--force", action="store_true", help="rebuild even if present")
    args = ap.parse_args(argv)
    path = build_corpus(args.out, force=args.force)
    print(f"corpus: {path}/manifest.json")
    return 0


def cmd_vocode(argv: list[str]) -> int:
    from voxport.evaluate import metrics
    from voxport.models import audio

    ap = selection_parser("vocode")
    ap.add_argument("--wav", type=Path, required=True, help="input speech (any rate; resampled)")
    ap.add_argument("--out", type=Path, required=True, help="output wav")
    args, target, bundle = parse_selection(ap, argv)
    from voxport.runtime.cloner import VocoderOnly

    vocoder = VocoderOnly(bundle, preference=target.preference, strict=target.strict, threads=target.threads)
    wav = audio.load_wav(args.wav, vocoder.sample_rate)
    mel = audio.mel_spectrogram(wav, vocoder.mel_cfg)
    out = vocoder.vocode(mel)
    audio.save_wav(args.out, out, vocoder.sample_rate)
    n = min(len(wav), len(out))
    served = vocoder.served
    print(f"vocoder: {served.file} ({served.format} {served.precision}, {served.weights} weights) "
          f"on {', '.join(served.providers)}; {served.reason}")
    print(f"copy synthesis of {n / vocoder.sample_rate:.2f} s: "
          f"MR-STFT distance to input {metrics.mr_stft_distance(wav[:n], out[:n]):.3f}, "
          f"log-mel distance {metrics.log_mel_distance_db(wav[:n], out[:n], vocoder.sample_rate):.2f} dB")
    print(f"wrote {args.out}")
    return 0


def cmd_clone(argv: list[str]) -> int:
    from voxport.models import audio
    from voxport.runtime.cloner import VoiceCloner

    ap = selection_parser("clone")
    ap.add_argument("--ref", type=Path, required=True, help="reference speech of the voice to clone")
    ap.add_argument("--text", required=True, help="text to speak (English or Chinese)")
    ap.add_argument("--out", type=Path, required=True, help="output wav")
    ap.add_argument("--style", type=int, default=0, help="GST style token 0..9, or -1 (from speaker)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the prenet dropout masks")
    ap.add_argument("--max-steps", type=int, default=None, help="maximum decoder steps")
    args, target, bundle = parse_selection(ap, argv)
    ref = audio.load_wav(args.ref, 16000)  # validate the reference before loading any model
    cloner = VoiceCloner(bundle, preference=target.preference, strict=target.strict, threads=target.threads)
    wav = cloner.clone(ref, 16000, args.text, style_idx=args.style, seed=args.seed,
                       max_decoder_steps=args.max_steps)
    audio.save_wav(args.out, wav, cloner.sample_rate)
    for served in cloner.served.values():
        print(f"{served.key}: {served.file} ({served.weights} weights) on {', '.join(served.providers)}")
    if "seeded" in cloner.weights.values():
        seeded = [c for c, w in cloner.weights.items() if w == "seeded"]
        print(f"note: {', '.join(seeded)} weights are seeded (untrained): the output is not speech")
    print(f"wrote {args.out} ({len(wav) / cloner.sample_rate:.2f} s at {cloner.sample_rate} Hz)")
    return 0


def cmd_doctor(argv: list[str]) -> int:
    from voxport.runtime.doctor import report

    _, target, bundle = parse_selection(selection_parser("doctor"), argv)
    print(report(bundle, target.preference, strict=target.strict))
    return 0


def cmd_profile(argv: list[str]) -> int:
    from voxport.benchmarks.profiler import ProfileConfig, markdown, profile_bundle

    ap = argparse.ArgumentParser(prog="voxport profile", description=COMMANDS["profile"], epilog=(
        "The artifact is opened as the runtime opens it (its record's speed.session) and fed SECONDS of held-out "
        "real speech; writes <bundle>/profiles/<artifact>.json and .md. Peaks are theoretical: cores x clock x "
        "OP/cycle/core from the CPU flags (README, Profiling)."))
    ap.add_argument("--bundle", type=Path, default=None, help="bundle (default: the config's out_dir)")
    ap.add_argument("--artifact", action="append", default=None, metavar="FILE",
                    help="ONNX or OpenVINO artifact file of the bundle, repeatable (default: every such vocoder)")
    ap.add_argument("--seconds", type=float, default=3.0, help="seconds of held-out speech fed (default 3)")
    ap.add_argument("--top", type=int, default=15, help="nodes listed by time (default 15)")
    ap.add_argument("--repeats", type=int, default=5, help="profiled runs, medians over them (default 5)")
    ap.add_argument("--threads", type=int, default=0, help="pin intra-op threads (default: the record's)")
    ap.add_argument("--corpus", default=None, help="real-speech corpus directory (default: the usual one)")
    args = ap.parse_args(argv)
    if args.bundle is None:
        from voxport.pipeline.schema import RunConfig

        args.bundle = Path(RunConfig.from_cfg(compose([])).out_dir)
    cfg = ProfileConfig(seconds=args.seconds, top=args.top, repeats=args.repeats, threads=args.threads)
    for profile, paths in profile_bundle(args.bundle, args.artifact, cfg, args.corpus):
        print(markdown(profile, args.top) + "\n\nwrote " + ", ".join(map(str, paths)) + "\n")
    return 0


def cmd_package(argv: list[str]) -> int:
    from voxport.export.triton.repository import SETTINGS_HELP, PackageConfig, package_triton, parse_settings

    ap = argparse.ArgumentParser(prog="voxport package", description=COMMANDS["package"], epilog=SETTINGS_HELP,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--force", action="store_true", help="replace a non-empty out directory (same as force=true)")
    ap.add_argument("settings", nargs="*", metavar="key=value", help="format=triton out=DIR [bundle_dir=DIR] ...")
    args = ap.parse_intermixed_args(argv)
    settings = parse_settings(args.settings) | ({"force": "true"} if args.force else {})
    if "bundle_dir" not in settings:
        from voxport.pipeline.schema import RunConfig

        settings["bundle_dir"] = RunConfig.from_cfg(compose([])).out_dir
    print(package_triton(PackageConfig.from_settings(settings, Path(settings["bundle_dir"]))).summary())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
