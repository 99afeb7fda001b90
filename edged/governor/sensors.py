"""Sensors: read the kernel's own files for temperature, firmware throttling, memory and cgroup
limits, so the governor can size threads and context to what the board can actually give.

Every path is resolved under a `root` ("/" in production) so tests point the real code at fake
trees written in the kernel's exact formats. Readers never raise: a file that is missing or
unparseable gives None (logged at DEBUG), because a sensor that is absent on one board (no
get_throttled on a Jetson, no thermal zones in a VM) is normal, not an error.

Sizes are reported in MB meaning MiB (2**20 bytes), matching /proc/meminfo's kB = KiB.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import psutil

log = logging.getLogger(__name__)

MIB = 1024 * 1024

# Thermal zone types naming the CPU sensor, most specific first. "cpu-thermal" is the Raspberry
# Pi (bcm2711/bcm2712) and Jetson Orin name; "CPU-therm" older Jetsons (Nano, Xavier);
# "x86_pkg_temp" the Intel package sensor. k10temp/coretemp only appear as zones on some
# kernels (normally they are hwmon devices, which we do not read).
CPU_ZONE_TYPES = ("cpu-thermal", "CPU-therm", "x86_pkg_temp", "k10temp", "coretemp")
# A zone reading outside this range is a broken or unpopulated sensor, not a temperature.
PLAUSIBLE_TEMP_C = (-40.0, 150.0)

GET_THROTTLED = Path("sys/devices/platform/soc/soc:firmware/get_throttled")
# cgroup v1 reports "no limit" as PAGE_COUNTER_MAX * page size (9223372036854771712 with 4 KiB
# pages); anything this large is unlimited whatever the page size.
CGROUP_V1_UNLIMITED = 2**62


@dataclass(frozen=True)
class ThrottleFlags:
    """Raspberry Pi firmware `get_throttled` bits (raspberrypi.com/documentation, "vcgencmd
    get_throttled"): bits 0-3 are the state now, bits 16-19 the same conditions since boot."""

    under_voltage: bool
    """Bit 0: supply is below 4.63 V now."""
    freq_capped: bool
    """Bit 1: ARM frequency is capped now."""
    throttled: bool
    """Bit 2: the SoC is throttled now."""
    soft_temp_limit: bool
    """Bit 3: the soft temperature limit is active now."""
    under_voltage_occurred: bool
    """Bit 16: under-voltage has occurred since boot."""
    freq_capped_occurred: bool
    """Bit 17: frequency capping has occurred since boot."""
    throttled_occurred: bool
    """Bit 18: throttling has occurred since boot."""
    soft_temp_limit_occurred: bool
    """Bit 19: the soft temperature limit has been reached since boot."""
    raw: int
    """The whole word, for logs and status."""

    @classmethod
    def from_raw(cls, raw: int) -> ThrottleFlags:
        def bit(n: int) -> bool:
            return bool(raw >> n & 1)

        return cls(
            under_voltage=bit(0),
            freq_capped=bit(1),
            throttled=bit(2),
            soft_temp_limit=bit(3),
            under_voltage_occurred=bit(16),
            freq_capped_occurred=bit(17),
            throttled_occurred=bit(18),
            soft_temp_limit_occurred=bit(19),
            raw=raw,
        )


@dataclass(frozen=True)
class Readings:
    """One snapshot of everything the governor decides from. None means "not known here"."""

    temp_c: float | None
    """CPU temperature in °C."""
    temp_zone: str | None
    """Type of the thermal zone read, e.g. "cpu-thermal"."""
    throttle: ThrottleFlags | None
    """Raspberry Pi firmware throttle state; None on boards without it."""
    mem_available_mb: float | None
    """/proc/meminfo MemAvailable."""
    mem_total_mb: float | None
    """/proc/meminfo MemTotal."""
    cgroup_limit_mb: float | None
    """Tightest memory limit on the daemon's cgroup and its ancestors; None if unlimited."""
    cgroup_usage_mb: float | None
    """Memory charged to the daemon's cgroup."""
    psi_some_avg10: float | None
    """Share of the last 10 s (percent) in which some task stalled on memory."""
    cpus: int | None
    """CPUs the daemon may use: affinity or online CPUs, reduced by the cgroup CPU quota;
    None when unknown (a fake root with neither)."""

    @property
    def mem_headroom_mb(self) -> float | None:
        """Memory the daemon can still take: the smaller of MemAvailable and the cgroup's
        remaining allowance, over whichever of the two is known."""
        candidates: list[float] = []
        if self.mem_available_mb is not None:
            candidates.append(self.mem_available_mb)
        if self.cgroup_limit_mb is not None and self.cgroup_usage_mb is not None:
            # Usage can exceed memory.high (the kernel throttles rather than refuses), so clamp.
            candidates.append(max(0.0, self.cgroup_limit_mb - self.cgroup_usage_mb))
        return min(candidates) if candidates else None


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="ascii", errors="strict")
    except (OSError, ValueError) as exc:
        log.debug("cannot read %s: %s", path, exc)
        return None


def _read_int(path: Path) -> int | None:
    text = _read_text(path)
    if text is None:
        return None
    try:
        return int(text.strip())
    except ValueError:
        log.debug("%s: not an integer: %r", path, text[:40])
        return None


def _is_real_root(root: Path) -> bool:
    return root == Path("/")


def _zone_number(zone: Path) -> int:
    suffix = zone.name.removeprefix("thermal_zone")
    return int(suffix) if suffix.isdigit() else 1 << 30


@dataclass(frozen=True)
class ZoneReading:
    """One thermal zone as the kernel shows it."""

    zone: str
    """Directory name, e.g. "thermal_zone0"."""
    type: str | None
    """The zone's `type`, e.g. "cpu-thermal"; None when unreadable."""
    temp_c: float | None
    """°C; None when unreadable or outside PLAUSIBLE_TEMP_C (no sensor behind the zone)."""


def read_zones(root: Path) -> list[ZoneReading]:
    """Every thermal zone in zone-number order, from the thermal sysfs class
    (Documentation/driver-api/thermal/sysfs-api.rst: `temp` is in millidegrees Celsius)."""
    try:
        zones = sorted((root / "sys/class/thermal").glob("thermal_zone*"), key=_zone_number)
    except OSError as exc:
        log.debug("cannot list thermal zones: %s", exc)
        return []
    readings = []
    for zone in zones:
        zone_type = _read_text(zone / "type")
        millideg = _read_int(zone / "temp")
        temp_c = None if millideg is None else millideg / 1000.0
        if temp_c is not None and not PLAUSIBLE_TEMP_C[0] <= temp_c <= PLAUSIBLE_TEMP_C[1]:
            log.debug("%s (%s): ignoring implausible %.1f °C", zone.name, zone_type, temp_c)
            temp_c = None
        readings.append(
            ZoneReading(zone.name, zone_type.strip() if zone_type is not None else None, temp_c)
        )
    return readings


def read_thermal(root: Path) -> tuple[float | None, str | None]:
    """CPU temperature (°C) and the zone type it came from (see `read_zones`)."""
    readable: dict[str, float] = {}  # first zone of each type wins
    for reading in read_zones(root):
        if reading.type is not None and reading.temp_c is not None:
            readable.setdefault(reading.type, reading.temp_c)
    for wanted in CPU_ZONE_TYPES:
        if wanted in readable:
            return readable[wanted], wanted
    for zone_type in readable:  # dicts keep insertion (zone number) order
        if "cpu" in zone_type.lower():
            return readable[zone_type], zone_type
    return None, None


def _parse_throttled(text: str) -> int | None:
    value = text.strip()
    value = value.removeprefix("throttled=")  # `vcgencmd get_throttled` output
    try:
        # int(.., 16) accepts both "0x50005" and the bare "50005" the firmware driver prints.
        return int(value, 16)
    except ValueError:
        return None


def read_throttle(root: Path) -> ThrottleFlags | None:
    """Raspberry Pi firmware throttle flags from the raspberrypi firmware driver's sysfs file."""
    candidates = [root / GET_THROTTLED]
    # The soc node's name depends on the device tree (e.g. "soc@107c000000" on newer ones).
    with contextlib.suppress(OSError):
        candidates += sorted((root / "sys/devices/platform").glob("soc*/*firmware/get_throttled"))
    for path in candidates:
        text = _read_text(path)
        if text is None:
            continue
        raw = _parse_throttled(text)
        if raw is None:
            log.debug("%s: not a hex throttle word: %r", path, text[:40])
            continue
        return ThrottleFlags.from_raw(raw)
    return None


def read_meminfo(root: Path) -> tuple[float | None, float | None]:
    """(MemAvailable, MemTotal) in MB from <root>/proc/meminfo ("MemTotal:  8245032 kB").

    Only on the real root does a missing /proc/meminfo fall back to psutil, so fake trees in
    tests never see the host's memory.
    """
    text = _read_text(root / "proc/meminfo")
    fields: dict[str, float] = {}
    for line in (text or "").splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if name in ("MemAvailable", "MemTotal") and parts:
            try:
                fields[name] = int(parts[0]) / 1024.0  # kB here is KiB
            except ValueError:
                log.debug("/proc/meminfo: bad %s line %r", name, line)
    available, total = fields.get("MemAvailable"), fields.get("MemTotal")
    if (available is None or total is None) and _is_real_root(root):
        try:
            vm = psutil.virtual_memory()
        except Exception as exc:  # psutil raises platform-specific errors
            log.debug("psutil.virtual_memory failed: %s", exc)
        else:
            available = available if available is not None else vm.available / MIB
            total = total if total is not None else vm.total / MIB
    return available, total


@dataclass(frozen=True)
class _CgroupMembership:
    """/proc/self/cgroup parsed: the v2 path ("0::<path>") and v1 controller -> (mount, path)."""

    v2_path: str | None
    v1: dict[str, tuple[str, str]]


def _read_membership(root: Path) -> _CgroupMembership | None:
    text = _read_text(root / "proc/self/cgroup")
    if text is None:
        return None
    v2_path: str | None = None
    v1: dict[str, tuple[str, str]] = {}
    for line in text.splitlines():
        # "hierarchy-ID:controller-list:cgroup-path"; the path may itself contain ':'.
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0" and controllers == "":
            v2_path = path
        elif controllers:
            for controller in controllers.split(","):
                if not controller.startswith("name="):
                    v1[controller] = (controllers, path)
    if v2_path is None and not v1:
        log.debug("%s: no cgroup lines", root / "proc/self/cgroup")
        return None
    return _CgroupMembership(v2_path, v1)


@dataclass(frozen=True)
class _CgroupDir:
    path: Path
    """The cgroup's own directory (or the mount root, see `_find_dir`)."""
    mount: Path
    """The hierarchy's mount root, where walking up to ancestors stops."""

    def self_and_ancestors(self) -> list[Path]:
        """The cgroup and its parents up to the mount root: a parent's limit binds its
        children (cgroup-v2.rst, "Top-down Constraint")."""
        chain = [self.path]
        current = self.path
        while current != self.mount and self.mount in current.parents:
            current = current.parent
            chain.append(current)
        return chain


def _find_dir(mount: Path, cgroup_path: str) -> _CgroupDir | None:
    """The cgroup's directory, or the hierarchy's mount root when the path is not visible.

    A container without its own cgroup namespace sees the host's path in /proc/self/cgroup
    ("/docker/<id>") while its /sys/fs/cgroup is already that cgroup, so the full path is missing.
    """
    leaf = mount / cgroup_path.lstrip("/")
    if leaf.is_dir():
        return _CgroupDir(leaf, mount)
    if mount.is_dir():
        log.debug("cgroup dir %s missing; using mount root %s", leaf, mount)
        return _CgroupDir(mount, mount)
    return None


def _v1_dir(root: Path, membership: _CgroupMembership, controller: str) -> _CgroupDir | None:
    if controller not in membership.v1:
        return None
    mount_name, path = membership.v1[controller]
    # systemd mounts co-mounted controllers as "cpu,cpuacct" with "cpu" as a symlink to it.
    for name in dict.fromkeys((mount_name, controller)):
        found = _find_dir(root / "sys/fs/cgroup" / name, path)
        if found is not None:
            return found
    return None


def _v2_dir(root: Path, membership: _CgroupMembership) -> _CgroupDir | None:
    if membership.v2_path is None:
        return None
    return _find_dir(root / "sys/fs/cgroup", membership.v2_path)


def self_cgroup_dir(root: Path) -> Path | None:
    """The daemon's memory cgroup directory: the v1 memory controller's when there is one
    (hybrid hosts also list an empty "0::" line), else the v2 unified one."""
    membership = _read_membership(root)
    if membership is None:
        return None
    found = _v1_dir(root, membership, "memory") or _v2_dir(root, membership)
    return found.path if found is not None else None


def _v2_bytes(path: Path) -> int | None:
    """A cgroup v2 memory limit: an integer, or "max" meaning no limit (None)."""
    text = _read_text(path)
    if text is None or text.strip() == "max":
        return None
    try:
        return int(text.strip())
    except ValueError:
        log.debug("%s: not bytes or 'max': %r", path, text[:40])
        return None


def _parse_psi_some_avg10(path: Path) -> float | None:
    """Documentation/accounting/psi.rst: lines "some avg10=0.00 avg60=0.00 avg300=0.00 total=0"
    and "full ..."; avg10 is the percentage of the last 10 s with some task stalled."""
    text = _read_text(path)
    for line in (text or "").splitlines():
        kind, *pairs = line.split()
        if kind != "some":
            continue
        for pair in pairs:
            key, _, value = pair.partition("=")
            if key == "avg10":
                try:
                    return float(value)
                except ValueError:
                    break
    if text is not None:
        log.debug("%s: no 'some avg10=' in %r", path, text[:80])
    return None


def _min_known(values: list[int | None]) -> int | None:
    known = [v for v in values if v is not None]
    return min(known) if known else None


def read_cgroup_memory(root: Path) -> tuple[float | None, float | None, float | None]:
    """(limit_mb, usage_mb, psi_some_avg10) for the daemon's cgroup.

    cgroup v2 (Documentation/admin-guide/cgroup-v2.rst, "Memory Interface Files"): the limit is
    the tighter of memory.max (hard, OOM-kills) and memory.high (throttles and reclaims hard,
    which for a latency-bound LLM is as bad), over the cgroup and its ancestors; "max" is no
    limit. Usage is memory.current; pressure is memory.pressure.
    cgroup v1 (Documentation/admin-guide/cgroup-v1/memory.rst): memory.limit_in_bytes, where
    >= 2**62 means unlimited, and memory.usage_in_bytes; v1 has no per-cgroup PSI, so pressure
    comes from the system-wide /proc/pressure/memory.
    """
    limit: int | None = None
    usage: int | None = None
    psi: float | None = None
    membership = _read_membership(root)
    if membership is not None:
        v1_dir = _v1_dir(root, membership, "memory")
        v2_dir = _v2_dir(root, membership)
        if v1_dir is not None:
            limits = [_read_int(d / "memory.limit_in_bytes") for d in v1_dir.self_and_ancestors()]
            limit = _min_known([v for v in limits if v is not None and v < CGROUP_V1_UNLIMITED])
            usage = _read_int(v1_dir.path / "memory.usage_in_bytes")
        elif v2_dir is not None:
            limit = _min_known(
                [
                    _v2_bytes(d / name)
                    for d in v2_dir.self_and_ancestors()
                    for name in ("memory.max", "memory.high")
                ]
            )
            usage = _read_int(v2_dir.path / "memory.current")
            psi = _parse_psi_some_avg10(v2_dir.path / "memory.pressure")
    if psi is None:
        psi = _parse_psi_some_avg10(root / "proc/pressure/memory")
    return (
        None if limit is None else limit / MIB,
        None if usage is None else usage / MIB,
        psi,
    )


def _count_cpu_list(text: str) -> int | None:
    """Count a kernel CPU list ("0-3", "0-1,4-5", "2"), the format of cpu/online
    (Documentation/ABI/testing/sysfs-devices-system-cpu)."""
    count = 0
    try:
        for part in text.strip().split(","):
            if not part:
                continue
            first, _, last = part.partition("-")
            count += (int(last) if last else int(first)) - int(first) + 1
    except ValueError:
        return None
    return count or None


def _v2_cpu_quota(path: Path) -> float | None:
    """cgroup-v2.rst, cpu.max: "$MAX $PERIOD", e.g. "max 100000" (no limit) or
    "150000 100000" (1.5 CPUs)."""
    text = _read_text(path)
    if text is None:
        return None
    parts = text.split()
    if not parts or parts[0] == "max":
        return None
    try:
        quota = int(parts[0])
        period = int(parts[1]) if len(parts) > 1 else 100_000
    except ValueError:
        log.debug("%s: bad cpu.max %r", path, text[:40])
        return None
    return quota / period if quota > 0 and period > 0 else None


def _v1_cpu_quota(cpu_dir: Path) -> float | None:
    """cgroup-v1 CFS bandwidth (Documentation/scheduler/sched-bwc.rst): quota -1 = no limit."""
    quota = _read_int(cpu_dir / "cpu.cfs_quota_us")
    period = _read_int(cpu_dir / "cpu.cfs_period_us")
    if quota is None or period is None or quota <= 0 or period <= 0:
        return None
    return quota / period


def read_cpu_quota(root: Path) -> float | None:
    """The cgroup CPU quota in CPUs (1.5 = one and a half; on cgroup v2 the tightest of the
    cgroup and its ancestors), or None when unlimited or unknown."""
    membership = _read_membership(root)
    if membership is None:
        return None
    v1_dir = _v1_dir(root, membership, "cpu")
    if v1_dir is not None:
        return _v1_cpu_quota(v1_dir.path)
    v2_dir = _v2_dir(root, membership)
    if v2_dir is None:
        return None
    quotas = [_v2_cpu_quota(d / "cpu.max") for d in v2_dir.self_and_ancestors()]
    known = [q for q in quotas if q is not None]
    return min(known) if known else None


def read_cpus(root: Path) -> int | None:
    """CPUs the daemon can use (at least 1), or None when nothing says.

    On the real root that is the scheduler affinity (which already excludes offline CPUs and
    cpuset restrictions); under a fake root it is the count in cpu/online. A cgroup CPU quota
    then caps it, rounded up: 1.5 CPUs of quota still runs 2 threads.
    """
    count: int | None = None
    if _is_real_root(root):
        try:
            count = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):  # not on Linux
            count = os.cpu_count()
    else:
        text = _read_text(root / "sys/devices/system/cpu/online")
        count = _count_cpu_list(text) if text is not None else None
    quota = read_cpu_quota(root)
    if quota is not None:
        count = min(count or math.ceil(quota), math.ceil(quota))
    return None if count is None else max(1, count)


def read_core_capacities(root: Path) -> dict[int, int]:
    """Each CPU's relative capacity from `cpu/cpuN/cpu_capacity` (ARM kernels; the biggest core
    is 1024), or {} where the kernel does not say (x86, older kernels). On a big.LITTLE SoC
    such as the RK3588 the big cores read 1024 and the little ones about 400."""
    capacities: dict[int, int] = {}
    for entry in sorted((root / "sys/devices/system/cpu").glob("cpu[0-9]*")):
        capacity = _read_int(entry / "cpu_capacity")
        if capacity is not None and capacity > 0:
            capacities[int(entry.name[3:])] = capacity
    return capacities


def read_all(root: Path = Path("/")) -> Readings:
    """One snapshot of every sensor under `root`."""
    temp_c, temp_zone = read_thermal(root)
    mem_available_mb, mem_total_mb = read_meminfo(root)
    cgroup_limit_mb, cgroup_usage_mb, psi_some_avg10 = read_cgroup_memory(root)
    return Readings(
        temp_c=temp_c,
        temp_zone=temp_zone,
        throttle=read_throttle(root),
        mem_available_mb=mem_available_mb,
        mem_total_mb=mem_total_mb,
        cgroup_limit_mb=cgroup_limit_mb,
        cgroup_usage_mb=cgroup_usage_mb,
        psi_some_avg10=psi_some_avg10,
        cpus=read_cpus(root),
    )
