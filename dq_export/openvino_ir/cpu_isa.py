"""The CPU's int8 instructions, and the weight range that keeps int8 exact on it.

CPUs without VNNI (AVX2, AVX-512F alone) compute an int8 dot product with ``vpmaddubsw``,
which adds two u8 x s8 products into a saturating int16: 255 x 127 x 2 overflows it. OpenVINO
documents the effect ("saturation issue", and NNCF's ``overflow_fix``): measured here on
tiny-sd W8A8, the UNet output's cosine to FP32 fell from 0.999 to 0.97 on an AVX2 CPU. Weights
quantized to 7 bits ([-63, 63]) cannot overflow (255 x 63 x 2 < 2^15) and cost one bit of
weight resolution. VNNI (AVX512_VNNI, AVX_VNNI, AMX) accumulates in int32 and needs no fix.
"""

from __future__ import annotations

from pathlib import Path

VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def cpu_flags() -> set[str]:
    """The ``flags`` of /proc/cpuinfo (empty where there is none)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return set()


def has_vnni(flags: set[str] | None = None) -> bool:
    """Whether int8 dot products accumulate without saturation on this CPU. Where the flags
    cannot be read (not Linux), assume a CPU with VNNI (every Xeon since Cascade Lake)."""
    flags = cpu_flags() if flags is None else flags
    return not flags or any(f in flags for f in VNNI_FLAGS)


def weight_range_for_this_cpu() -> str:
    """``--weight-range auto``: "half" (7-bit weights) where int8 would saturate, else "full"."""
    return "full" if has_vnni() else "half"
