"""dlfer.machine: the processor's name, vector unit and AMX, read from /proc/cpuinfo's text."""

import pytest

from dlfer import machine


def cpuinfo(flags: str) -> str:
    return f"processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: {flags}\n" * 2


@pytest.mark.parametrize("flags, shown, amx", [
    ("fpu sse2 avx2 fma", "AMD EPYC (AVX2)", False),
    ("fpu avx2 avx512f avx512_bf16", "AMD EPYC (AVX-512)", False),  # Zen 4: AVX512-BF16 without AMX
    ("fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile", "AMD EPYC (AVX-512, AMX)", True),
    ("fpu sse2", "AMD EPYC", False),
])
def test_the_processor_is_named_with_its_vector_unit_and_amx(flags, shown, amx):
    assert machine.processor_name(cpuinfo(flags)) == shown
    assert machine.has_amx(cpuinfo(flags)) is amx


def test_without_cpuinfo_no_flag_is_assumed():
    assert machine.cpu_flags("") == set()
    assert not machine.has_amx("")
    assert machine.processor_name("")  # the platform module's name
