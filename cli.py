"""`voxport` command line: thin entry points over importable work functions.

Hydra commands (build, bench, serve) take Hydra overrides (`voxport build stack=mockingbird
stack.vocoder.checkpoint=g.pt`, `-m` sweeps, `--help`, `--cfg job`); the audio commands (clone,
vocode, doctor, corpus) take ordinary flags.
"""

from __future__ import annotations

import argparse
import logging
import sys

from voxport.errors import VoxportError

HYDRA_COMMANDS = ("build", "bench", "serve")
COMMANDS = {
    "build": "optimize, export and validate the stack; write the artifact bundle",
    "bench": "time every artifact of a bundle (RTF, memory, FLOP/s); --compare BASELINE.json for CI",
    "clone": "clone a voice: reference audio + text -> wav",
    "serve": "HTTP voice-cloning service over a bundle (loopback by default; docs at /docs)",
    "vocode": "copy synthesis: wav -> mel -> vocoder -> wav (real HiFi-GAN weights)",
    "doctor": "describe this host and which artifact each component would use",
    "corpus": "assemble the real-speech corpus from Debian packages",
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
            from voxport import commands

            if command == "bench":
                rest = hydra_compare(rest)
            sys.argv = [f"voxport {command}", *rest]
            return commands.run_hydra(command) or 0
        from voxport import commands

        return getattr(commands, f"cmd_{command}")(rest)
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


if __name__ == "__main__":
    raise SystemExit(main())
