"""The host a bench ran on: fingerprint, usable cores, clock, and theoretical peaks (FP32 and INT8).

Peak FP32 FLOP/s = cores x clock x FLOP per cycle per core, where FLOP per cycle per core =
fp32 lanes of the widest vector unit (AVX-512: 16, AVX/AVX2: 8, SSE: 4) x 2 (a fused multiply-add
is two FLOPs) x FMA units per core. Two FMA units is assumed (Zen 2/3/4, Intel since Haswell;
some AVX-512 Xeons have one: pass `fma_units=1`). Without FMA, one multiply and one add per cycle
per lane give the same 2 FLOP per lane-cycle, so the figure is lanes x 2 x units either way.
The clock is the highest the kernel reports: cpufreq's cpuinfo_max_freq (what `lscpu` shows as
"CPU max MHz") when present, else the mean "cpu MHz" of /proc/cpuinfo (the nominal clock in most
virtual machines). It is an upper bound: no convolution kernel reaches it.

Theoretical peak INT8 OP/s (2 OP per multiply-accumulate) = cores x clock x INT8 OP per cycle per
core, from the best integer dot-product path the flags offer:
- AMX (`amx_int8`): one TMUL per core, 1024 INT8 MACs per cycle = 2048 OP/cycle/core (Intel's figure
  for Sapphire Rapids; not multiplied by the FMA units);
- AVX-512 VNNI (`avx512_vnni`): `vpdpbusd` on 512 bits does 64 u8 x s8 MACs = 128 OP per instruction,
  one per port per cycle, x FMA ports (2) = 256 OP/cycle/core; AVX-VNNI (`avx_vnni`, 256 bits): 128;
- without VNNI (`avx512bw`, `avx2`, `ssse3`): `vpmaddubsw` (u8 x s8 pairs to int16: 64 / 32 / 16 MACs per
  instruction) needs a `vpmaddwd` to widen the sums to int32, two instructions per MAC group on the same
  ports: 128 / 64 / 32 OP/cycle/core with 2 ports. On AVX2 that is 2x the FP32 peak (64 vs 32).
Zen 4 runs 512-bit instructions as two 256-bit halves: its AVX-512 figures are half of these (fma_units=1).
"""

from __future__ import annotations

import os
import platform
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

_LANES = (("avx512f", 16), ("avx2", 8), ("avx", 8))
# INT8 paths, best first: (flag, name, OP per instruction, instructions per MAC group, times FMA ports?)
_INT8_PATHS = (
    ("amx_int8", "AMX (TMUL: 1024 INT8 MACs/cycle/core)", 2048, 1, False),
    ("avx512_vnni", "AVX-512 VNNI (vpdpbusd: 64 INT8 MACs per 512-bit instruction)", 128, 1, True),
    ("avx_vnni", "AVX-VNNI (vpdpbusd: 32 INT8 MACs per 256-bit instruction)", 64, 1, True),
    ("avx512bw", "AVX-512BW without VNNI (vpmaddubsw + vpmaddwd: 64 INT8 MACs per 2 instructions)", 128, 2, True),
    ("avx2", "AVX2 without VNNI (vpmaddubsw + vpmaddwd: 32 INT8 MACs per 2 instructions)", 64, 2, True),
    ("ssse3", "SSSE3 (pmaddubsw + pmaddwd: 16 INT8 MACs per 2 instructions)", 32, 2, True),
)


@dataclass(frozen=True)
class PeakEstimate:
    flops_per_s: float
    cores: int
    clock_mhz: float
    clock_source: str
    fp32_lanes: int
    fma_units: int
    flops_per_cycle_per_core: int
    method: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def usable_cores() -> int:
    """Cores this process may run on (affinity mask), not the machine's total."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cpu_clock_mhz() -> tuple[float, str]:
    """(MHz, where it came from): cpufreq max if the kernel exposes it, else /proc/cpuinfo's mean."""
    max_freq = Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")
    try:
        return int(max_freq.read_text().strip()) / 1000.0, "cpufreq cpuinfo_max_freq"
    except (OSError, ValueError):
        pass
    try:
        mhz = [float(line.split(":", 1)[1]) for line in Path("/proc/cpuinfo").read_text().splitlines()
               if line.startswith("cpu MHz")]
    except (OSError, ValueError):
        mhz = []
    if mhz:
        return sum(mhz) / len(mhz), "/proc/cpuinfo cpu MHz (mean over cores)"
    return 0.0, "unknown"


def estimate_peak(flags: tuple[str, ...] | list[str], cores: int, clock_mhz: float,
                  fma_units: int = 2, clock_source: str = "given") -> PeakEstimate:
    """Peak FP32 FLOP/s from vector width, FMA units, cores and clock (see the module docstring)."""
    if cores < 1 or clock_mhz < 0 or fma_units < 1:
        raise ValueError(f"cores {cores}, clock {clock_mhz} MHz, fma_units {fma_units}: out of range")
    lanes = next((n for flag, n in _LANES if flag in flags), 4)
    per_cycle = lanes * 2 * fma_units
    widest = next((flag for flag, n in _LANES if flag in flags), "sse")
    method = (f"{cores} cores x {clock_mhz:.0f} MHz ({clock_source}) x {per_cycle} FP32 FLOP/cycle/core "
              f"({widest}: {lanes} lanes x 2 FLOP per FMA x {fma_units} FMA units, assumed)")
    return PeakEstimate(cores * clock_mhz * 1e6 * per_cycle, cores, clock_mhz, clock_source, lanes,
                        fma_units, per_cycle, method)


@dataclass(frozen=True)
class Int8Peak:
    ops_per_s: float
    ops_per_cycle_per_core: int
    isa: str
    method: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def estimate_int8_peak(flags: tuple[str, ...] | list[str], cores: int, clock_mhz: float,
                       fma_units: int = 2, clock_source: str = "given") -> Int8Peak:
    """Theoretical peak INT8 OP/s (2 OP per MAC) from the best integer path of `flags` (module docstring)."""
    if cores < 1 or clock_mhz < 0 or fma_units < 1:
        raise ValueError(f"cores {cores}, clock {clock_mhz} MHz, fma_units {fma_units}: out of range")
    path = next((p for p in _INT8_PATHS if p[0] in flags), None)
    if path is not None:
        _, isa, per_instruction, instructions, per_port = path
        ports = fma_units if per_port else 1
        per_cycle = per_instruction * ports // instructions
        how = (f"{per_instruction} OP per instruction / {instructions} instruction(s) x {ports} port(s)"
               if per_port else f"{per_instruction} OP/cycle per core")
    else:  # no integer SIMD: integer kernels run no faster than the float path
        fp32 = estimate_peak(flags, cores, clock_mhz, fma_units, clock_source)
        per_cycle, isa, how = fp32.flops_per_cycle_per_core, "no INT8 SIMD (the FP32 figure)", "as FP32"
    method = (f"{cores} cores x {clock_mhz:.0f} MHz ({clock_source}) x {per_cycle} INT8 OP/cycle/core "
              f"({isa}: {how}; 2 OP per MAC)")
    return Int8Peak(cores * clock_mhz * 1e6 * per_cycle, per_cycle, isa, method)


def fingerprint(threads: int) -> dict[str, Any]:
    """CPU model, cores, flags, GPUs, library versions, clock and peak estimate: in every report."""
    import importlib.metadata

    from voxport.runtime.host import detect

    host = detect().to_dict()
    clock, source = cpu_clock_mhz()
    cores = usable_cores()
    peak = estimate_peak(host["cpu_flags"], cores, clock, clock_source=source)
    int8 = estimate_int8_peak(host["cpu_flags"], cores, clock, clock_source=source)
    versions = dict(host.pop("library_versions"))
    for dist in ("numpy", "voxport", "matplotlib", "pytest-benchmark"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return {**host, "usable_cores": cores, "threads": threads, "clock_mhz": clock, "clock_source": source,
            "peak_fp32_flops": peak.flops_per_s, "peak_method": peak.method,
            "peak_int8_ops": int8.ops_per_s, "peak_int8_method": int8.method, "machine": platform.machine(),
            "kernel": platform.release(), "python": platform.python_version(), "library_versions": versions}
