"""The governor's sensors read the kernel's own files. This machine has no thermal zones or
cgroup v2 memory files, so each test writes a fake tree in the kernel's exact formats under
tmp_path and points the real readers at it."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pytest

from edged.governor.sensors import (
    Readings,
    ThrottleFlags,
    read_all,
    read_cgroup_memory,
    read_core_capacities,
    read_cpus,
    read_meminfo,
    read_thermal,
    read_throttle,
    self_cgroup_dir,
)

# The Pi 5 and Jetson sensor trees are read by the same code on ARM: part of the ARM subset.
pytestmark = pytest.mark.arm64

SERVICE = "system.slice/edged.service"


def write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def write_zones(root: Path, zones: list[tuple[str, str]]) -> None:
    for n, (zone_type, temp) in enumerate(zones):
        write(root, f"sys/class/thermal/thermal_zone{n}/type", zone_type + "\n")
        write(root, f"sys/class/thermal/thermal_zone{n}/temp", temp + "\n")


def write_meminfo(root: Path, total_kb: int, available_kb: int) -> None:
    write(
        root,
        "proc/meminfo",
        f"MemTotal:       {total_kb:>8} kB\n"
        "MemFree:         5123456 kB\n"
        f"MemAvailable:   {available_kb:>8} kB\n"
        "Buffers:          123456 kB\n"
        "Cached:          1234567 kB\n"
        "SwapTotal:        524284 kB\n",
    )


def build_pi5(root: Path) -> None:
    write_zones(root, [("cpu-thermal", "61500")])
    write(root, "sys/devices/platform/soc/soc:firmware/get_throttled", "0x50005\n")
    write_meminfo(root, total_kb=8245032, available_kb=6512340)
    write(root, "proc/self/cgroup", f"0::/{SERVICE}\n")
    cg = f"sys/fs/cgroup/{SERVICE}"
    write(root, f"{cg}/memory.max", "2147483648\n")
    write(root, f"{cg}/memory.high", "max\n")
    write(root, f"{cg}/memory.current", "734003200\n")
    write(
        root,
        f"{cg}/memory.pressure",
        "some avg10=1.25 avg60=0.80 avg300=0.21 total=1234567\n"
        "full avg10=0.50 avg60=0.30 avg300=0.10 total=456789\n",
    )
    write(root, f"{cg}/cpu.max", "max 100000\n")
    write(root, "sys/devices/system/cpu/online", "0-3\n")


def build_orin_nano(root: Path) -> None:
    write_zones(
        root,
        [
            ("cv0-thermal", "-256000"),  # a zone with no sensor behind it can read -256 °C
            ("cpu-thermal", "48281"),
            ("gpu-thermal", "47500"),
            ("soc0-thermal", "46968"),
            ("tj-thermal", "49000"),
        ],
    )
    write_meminfo(root, total_kb=7802164, available_kb=5898240)
    write(
        root,
        "proc/self/cgroup",
        "12:pids:/system.slice/edged.service\n"
        "9:memory:/system.slice/edged.service\n"
        "4:cpu,cpuacct:/system.slice/edged.service\n"
        "1:name=systemd:/system.slice/edged.service\n"
        "0::/system.slice/edged.service\n",
    )
    mem = f"sys/fs/cgroup/memory/{SERVICE}"
    write(root, f"{mem}/memory.limit_in_bytes", "9223372036854771712\n")
    write(root, f"{mem}/memory.usage_in_bytes", "524288000\n")
    cpu = f"sys/fs/cgroup/cpu,cpuacct/{SERVICE}"
    write(root, f"{cpu}/cpu.cfs_quota_us", "-1\n")
    write(root, f"{cpu}/cpu.cfs_period_us", "100000\n")
    write(root, "proc/pressure/memory", "some avg10=0.00 avg60=0.00 avg300=0.00 total=0\n")
    write(root, "sys/devices/system/cpu/online", "0-5\n")


def build_x86_pc(root: Path) -> None:
    write_zones(
        root, [("acpitz", "27800"), ("x86_pkg_temp", "55000"), ("INT3400 Thermal", "20000")]
    )
    write_meminfo(root, total_kb=32768000, available_kb=20000000)
    write(root, "proc/self/cgroup", "0::/\n")
    write(root, "sys/fs/cgroup/cpu.max", "150000 100000\n")
    write(root, "sys/devices/system/cpu/online", "0-7\n")


def test_pi5_readings_decoded_from_kernel_files(tmp_path: Path) -> None:
    build_pi5(tmp_path)
    r = read_all(tmp_path)

    assert r.temp_c == 61.5
    assert r.temp_zone == "cpu-thermal"
    # 0x50005 = bits 0, 2, 16, 18: under-voltage and throttled now, and both since boot.
    assert r.throttle == ThrottleFlags(
        under_voltage=True,
        freq_capped=False,
        throttled=True,
        soft_temp_limit=False,
        under_voltage_occurred=True,
        freq_capped_occurred=False,
        throttled_occurred=True,
        soft_temp_limit_occurred=False,
        raw=0x50005,
    )
    assert r.mem_total_mb == pytest.approx(8245032 / 1024)
    assert r.mem_available_mb == pytest.approx(6512340 / 1024)
    assert r.cgroup_limit_mb == 2048
    assert r.cgroup_usage_mb == 700
    assert r.psi_some_avg10 == 1.25
    assert r.cpus == 4
    assert r.mem_headroom_mb == pytest.approx(min(6512340 / 1024, 1348))
    assert self_cgroup_dir(tmp_path) == tmp_path / "sys/fs/cgroup" / SERVICE


def test_orin_nano_picks_cpu_zone_and_reads_cgroup_v1(tmp_path: Path) -> None:
    build_orin_nano(tmp_path)
    r = read_all(tmp_path)

    assert (r.temp_c, r.temp_zone) == (pytest.approx(48.281), "cpu-thermal")
    assert r.throttle is None
    assert self_cgroup_dir(tmp_path) == tmp_path / "sys/fs/cgroup/memory" / SERVICE
    assert r.cgroup_limit_mb is None  # 9223372036854771712 is v1's "unlimited"
    assert r.cgroup_usage_mb == 500
    assert r.psi_some_avg10 == 0.0  # v1 has no per-cgroup PSI: system-wide file
    assert r.cpus == 6
    assert r.mem_headroom_mb == pytest.approx(5898240 / 1024)


def test_x86_pc_picks_package_sensor_and_cpu_quota_rounds_up(tmp_path: Path) -> None:
    build_x86_pc(tmp_path)
    r = read_all(tmp_path)

    assert (r.temp_c, r.temp_zone) == (55.0, "x86_pkg_temp")
    assert self_cgroup_dir(tmp_path) == tmp_path / "sys/fs/cgroup"
    assert r.cgroup_limit_mb is None
    assert r.cpus == 2  # 150000/100000 = 1.5 CPUs of quota -> 2 threads


def test_empty_root_gives_none_everywhere_and_never_raises(tmp_path: Path) -> None:
    r = read_all(tmp_path)

    unknown = {f.name: getattr(r, f.name) for f in dataclasses.fields(r)}
    assert unknown == dict.fromkeys(unknown)
    assert r.mem_headroom_mb is None
    assert self_cgroup_dir(tmp_path) is None


def test_garbage_files_are_skipped_not_raised(tmp_path: Path) -> None:
    write_zones(tmp_path, [("cpu-thermal", "not a number"), ("CPU-therm", "44500")])
    write(tmp_path, "sys/devices/platform/soc/soc:firmware/get_throttled", "zz\n")
    write(tmp_path, "proc/meminfo", "MemTotal: lots kB\n")
    write(tmp_path, "proc/self/cgroup", "garbage\n")
    write(tmp_path, "sys/devices/system/cpu/online", "\n")

    assert read_thermal(tmp_path) == (44.5, "CPU-therm")
    assert read_throttle(tmp_path) is None
    assert read_meminfo(tmp_path) == (None, None)
    assert read_cgroup_memory(tmp_path) == (None, None, None)
    assert read_cpus(tmp_path) is None


def test_absurd_temperature_zone_is_ignored(tmp_path: Path) -> None:
    write_zones(tmp_path, [("cpu-thermal", "200000"), ("Cpu0 Sensor", "51000")])
    assert read_thermal(tmp_path) == (51.0, "Cpu0 Sensor")


def test_no_cpu_zone_means_no_temperature(tmp_path: Path) -> None:
    write_zones(tmp_path, [("acpitz", "27800"), ("gpu-thermal", "47500")])
    assert read_thermal(tmp_path) == (None, None)


@pytest.mark.parametrize("text", ["0x50005\n", "50005\n", "throttled=0x50005\n"])
def test_throttle_word_accepted_in_every_printed_form(tmp_path: Path, text: str) -> None:
    write(tmp_path, "sys/devices/platform/soc/soc:firmware/get_throttled", text)
    flags = read_throttle(tmp_path)
    assert flags is not None and flags.raw == 0x50005


def test_memory_high_below_memory_max_wins(tmp_path: Path) -> None:
    build_pi5(tmp_path)
    write(tmp_path, f"sys/fs/cgroup/{SERVICE}/memory.high", "1073741824\n")
    assert read_cgroup_memory(tmp_path) == (1024, 700, 1.25)


def test_parent_slice_limit_binds_the_service(tmp_path: Path) -> None:
    build_pi5(tmp_path)
    write(tmp_path, "sys/fs/cgroup/system.slice/memory.max", "1610612736\n")
    write(tmp_path, "sys/fs/cgroup/system.slice/cpu.max", "100000 100000\n")
    r = read_all(tmp_path)
    assert r.cgroup_limit_mb == 1536
    assert r.cpus == 1


def test_usage_above_memory_high_gives_zero_headroom() -> None:
    r = Readings(None, None, None, 4000.0, 8000.0, 1024.0, 1100.0, None, 4)
    assert r.mem_headroom_mb == 0.0


@pytest.mark.parametrize(("online", "cpus"), [("0-1,4-5", 4), ("0", 1), ("0-3,6", 5)])
def test_online_cpu_lists_counted(tmp_path: Path, online: str, cpus: int) -> None:
    write(tmp_path, "sys/devices/system/cpu/online", online + "\n")
    assert read_cpus(tmp_path) == cpus


def test_v1_cpu_quota_caps_cpus(tmp_path: Path) -> None:
    build_orin_nano(tmp_path)
    write(tmp_path, f"sys/fs/cgroup/cpu,cpuacct/{SERVICE}/cpu.cfs_quota_us", "250000\n")
    assert read_cpus(tmp_path) == 3


def test_container_without_cgroupns_falls_back_to_mount_root(tmp_path: Path) -> None:
    # /proc/self/cgroup names the host's path, but the container only sees its own cgroup.
    write(tmp_path, "proc/self/cgroup", "0::/docker/0123abcd\n")
    write(tmp_path, "sys/fs/cgroup/memory.max", "536870912\n")
    write(tmp_path, "sys/fs/cgroup/memory.current", "104857600\n")
    assert self_cgroup_dir(tmp_path) == tmp_path / "sys/fs/cgroup"
    assert read_cgroup_memory(tmp_path) == (512, 100, None)


def test_real_machine_readings_do_not_raise() -> None:
    started = time.monotonic()
    r = read_all(Path("/"))
    assert isinstance(r, Readings)
    assert r.cpus >= 1
    assert time.monotonic() - started < 1.0


def test_core_capacities_of_a_big_little_board_and_of_boards_without_them(tmp_path: Path) -> None:
    # RK3588 (Rock 5B, Orange Pi 5): cpu0-3 Cortex-A55 at 414, cpu4-7 Cortex-A76 at 1024; cpu8
    # is offline-style junk and cpufreq is not a CPU.
    rk = tmp_path / "rk3588"
    for cpu in range(8):
        write(rk, f"sys/devices/system/cpu/cpu{cpu}/cpu_capacity", "414\n" if cpu < 4 else "1024\n")
    write(rk, "sys/devices/system/cpu/cpu8/cpu_capacity", "garbage\n")
    write(rk, "sys/devices/system/cpu/cpufreq/policy0/scaling_cur_freq", "1800000\n")
    assert read_core_capacities(rk) == {0: 414, 1: 414, 2: 414, 3: 414} | {
        c: 1024 for c in range(4, 8)
    }
    # x86 and older kernels have no cpu_capacity files: no preference, not an error.
    x86 = tmp_path / "x86"
    write(x86, "sys/devices/system/cpu/cpu0/online", "1\n")
    assert read_core_capacities(x86) == {}
    assert read_core_capacities(tmp_path / "missing") == {}
