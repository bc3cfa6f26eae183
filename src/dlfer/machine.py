"""What this machine's processor is, as training speed and the CPU kernels' bf16 products depend on it.

Linux's /proc/cpuinfo names the processor and its instruction-set flags; elsewhere only the platform module's
name is known and no flag is assumed.
"""

from __future__ import annotations

import platform
from pathlib import Path


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The instruction-set flags of the first processor in /proc/cpuinfo (or in `cpuinfo`); empty when unknown."""
    for line in _cpuinfo(cpuinfo).splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def has_amx(cpuinfo: str | None = None) -> bool:
    """Whether the CPU has AMX-BF16, the unit on which oneDNN computes finetune.cpu_math: bf16 in bfloat16.

    Without it (AVX512-BF16 alone included, AMD Zen 4) oneDNN keeps its float32 kernels under the bf16 mode:
    see dlfer.model.cpu_kernels.
    """
    return "amx_bf16" in cpu_flags(cpuinfo)


def processor_name(cpuinfo: str | None = None) -> str:
    """The processor's model name, its widest vector unit and AMX where it has it (training speed differs ~2.5x
    between vector units, and bf16 products act only with AMX)."""
    text = _cpuinfo(cpuinfo)
    name = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")),
                platform.processor() or platform.machine())
    flags = cpu_flags(text)
    units = ["AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else None,
             "AMX" if has_amx(text) else None]
    units = [unit for unit in units if unit]
    return f"{name} ({', '.join(units)})" if units else name


def _cpuinfo(cpuinfo: str | None) -> str:
    if cpuinfo is not None:
        return cpuinfo
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
