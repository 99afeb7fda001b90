"""tools/arm64_check.sh's own guards, checked on the host.

The fake /proc/cpuinfo must match the CPU model qemu emulates: onnxruntime picks its kernels from
cpuinfo, so a Pi 5 cpuinfo on the emulated Cortex-A72 would make it run dotprod instructions the
A72 lacks and die, a failure of the setup rather than of the code under test. Bad arguments are
refused before anything needs root.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "tools" / "arm64_check.sh"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=30, check=False
    )


def _blocks(cpuinfo: str) -> list[dict[str, str]]:
    blocks = []
    for chunk in cpuinfo.strip().split("\n\n"):
        fields = {}
        for line in chunk.splitlines():
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
        blocks.append(fields)
    return blocks


# Pi 4: ARMv8.0-A, no dot product, no LSE atomics, no half-precision arithmetic.
A72_HAS = {"fp", "asimd", "crc32"}
A72_LACKS = {"asimddp", "atomics", "fphp", "asimdhp", "lrcpc"}
# Pi 5: ARMv8.2-A with dotprod and atomics, but no SVE, i8mm or bf16.
A76_HAS = {"asimd", "asimddp", "atomics", "asimdhp", "lrcpc"}
A76_LACKS = {"sve", "i8mm", "bf16"}


@pytest.mark.parametrize(
    ("cpu", "part", "board", "has", "lacks"),
    [
        ("cortex-a72", "0xd08", "Raspberry Pi 4", A72_HAS, A72_LACKS),
        ("cortex-a76", "0xd0b", "Raspberry Pi 5", A76_HAS, A76_LACKS),
    ],
)
def test_fake_cpuinfo_matches_the_emulated_cpu(
    cpu: str, part: str, board: str, has: set[str], lacks: set[str]
) -> None:
    out = _run("--print-cpuinfo", cpu)
    assert out.returncode == 0, out.stderr
    *processors, trailer = _blocks(out.stdout)
    nproc = int(subprocess.run(["nproc", "--all"], capture_output=True, text=True).stdout)
    # One entry per CPU the guest can see through sysfs, numbered from 0.
    assert [p["processor"] for p in processors] == [str(i) for i in range(nproc)]
    for p in processors:
        features = set(p["Features"].split())
        assert p["CPU implementer"] == "0x41" and p["CPU part"] == part
        assert has <= features, f"{cpu} cpuinfo lacks {has - features}"
        assert not features & lacks, f"{cpu} cpuinfo claims {features & lacks}"
    assert trailer["Model"].startswith(board)


def test_unknown_cpu_model_is_refused_naming_the_known_ones() -> None:
    out = _run("--cpu", "cortex-a53")
    assert out.returncode == 2
    assert "'cortex-a53'" in out.stderr and "cortex-a72, cortex-a76" in out.stderr


def test_unknown_argument_is_refused() -> None:
    out = _run("--cpus", "cortex-a72")
    assert out.returncode == 2 and "unknown argument '--cpus'" in out.stderr


def test_help_documents_every_option() -> None:
    out = _run("--help")
    assert out.returncode == 0
    for option in ("--cpu", "--onnxruntime", "--rebuild", "--keep-going", "--print-cpuinfo"):
        assert option in out.stdout
