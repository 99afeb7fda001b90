"""The doctor's rules: plain inputs (cpuinfo text, sensor readings, what a probe found) in,
typed `Check` results out, and how a list of them is shown. Nothing here reads a file or opens
a socket, so every rule is tested with fake cpuinfo texts and readings."""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from edged.engine.prepacked import cpu_flags
from edged.governor.memory_check import MemoryNeed
from edged.governor.sensors import Readings, ThrottleFlags, ZoneReading

Status = Literal["ok", "warn", "fail", "skip"]
TlsMode = Literal["off", "verified", "insecure"]
LABELS: dict[str, str] = {"ok": "OK", "warn": "WARN", "fail": "FAIL", "skip": "SKIP"}


@dataclass(frozen=True)
class Check:
    name: str
    """Short and stable (`broker`, `state_dir`): scripts read `--json` by it."""
    status: Status
    """ok, warn (works, but worse than it could), fail (will not work), skip (not applicable)."""
    summary: str
    """One line for the owner: what was found, and for warn/fail what to change."""
    detail: dict[str, Any] = field(default_factory=dict)
    """The numbers behind the summary, for `--json`."""


# -- CPU ------------------------------------------------------------------------------------

# Arm Ltd (implementer 0x41) MIDR part numbers, from Linux arch/arm64/include/asm/cputype.h:
# the cores of the boards edged runs on (Pi 3/4/5, Jetson Orin, RK3588) and their relatives.
ARM_PARTS = {
    "0xd03": "Cortex-A53",
    "0xd04": "Cortex-A35",
    "0xd05": "Cortex-A55",
    "0xd07": "Cortex-A57",
    "0xd08": "Cortex-A72",
    "0xd09": "Cortex-A73",
    "0xd0a": "Cortex-A75",
    "0xd0b": "Cortex-A76",
    "0xd0c": "Neoverse-N1",
    "0xd0d": "Cortex-A77",
    "0xd40": "Neoverse-V1",
    "0xd41": "Cortex-A78",
    "0xd42": "Cortex-A78AE",
    "0xd44": "Cortex-X1",
    "0xd46": "Cortex-A510",
    "0xd47": "Cortex-A710",
    "0xd49": "Neoverse-N2",
    "0xd4b": "Cortex-A78C",
    "0xd80": "Cortex-A520",
    "0xd81": "Cortex-A720",
}
# The flags that decide which onnxruntime kernels run, with the names people search for.
NOTABLE_FLAGS = {
    "aarch64": (("asimd", "NEON"), ("asimddp", "dotprod"), ("i8mm", "i8mm"), ("sve", "SVE")),
    "x86_64": (
        ("avx2", "AVX2"),
        ("avx512f", "AVX-512"),
        ("avx512_vnni", "AVX-512 VNNI"),
        ("avx_vnni", "AVX-VNNI"),
    ),
}
# MLAS's int4 (MatMulNBits) kernel sets on x86, best first: onnxruntime picks the best one the
# CPU has (core/mlas/lib/platform.cpp, QNBitGemmDispatch).
X86_INT4_KERNELS = (
    (("avx512_vnni", "avx512bw"), "AVX-512 VNNI"),
    (("avx512f", "avx512bw"), "AVX-512"),
    (("avx_vnni", "avx2"), "AVX-VNNI"),
    (("avx2", "fma"), "AVX2"),
)


@dataclass(frozen=True)
class CpuInfo:
    arch: str
    """aarch64, x86_64 or unknown, from the text's own keys (ARM kernels print `Features` and
    `CPU part`, x86 `flags`), so a Pi's cpuinfo reads as a Pi whatever machine parses it."""
    model: str
    """x86 `model name`; on ARM the core names from `CPU part` ("Cortex-A55 + Cortex-A76")."""
    cores: int
    """`processor` entries."""
    flags: tuple[str, ...]
    board: str | None
    """The Raspberry Pi firmware's `Model` line, when there is one."""


def _arm_model(fields: Sequence[tuple[str, str]]) -> str:
    names: dict[str, None] = {}  # ordered set: a big.LITTLE SoC lists two parts
    implementer = "0x41"
    for key, value in fields:
        if key == "CPU implementer":
            implementer = value.lower()
        elif key == "CPU part":
            part = value.lower()
            known = ARM_PARTS.get(part) if implementer == "0x41" else None
            names[known or f"implementer {implementer} part {part}"] = None
    return " + ".join(names) or "unknown Arm CPU"


def parse_cpuinfo(text: str) -> CpuInfo:
    """/proc/cpuinfo's text, as x86 and arm64 kernels print it."""
    fields = []
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.append((key.strip(), value.strip()))
    first: dict[str, str] = {}
    for key, value in fields:
        first.setdefault(key, value)
    cores = sum(1 for key, _ in fields if key == "processor")
    if "CPU part" in first or "Features" in first:
        arch, model = "aarch64", _arm_model(fields)
    elif "flags" in first:
        arch, model = "x86_64", first.get("model name", "unknown x86 CPU")
    else:
        arch, model = "unknown", first.get("model name", "unknown CPU")
    return CpuInfo(arch, model, cores, cpu_flags(text), first.get("Model"))


def cpu_check(info: CpuInfo | None) -> Check:
    if info is None:
        return Check("cpu", "warn", "cannot read /proc/cpuinfo: CPU features unknown")
    notable = NOTABLE_FLAGS.get(info.arch, ())
    features = ", ".join(name if flag in info.flags else f"no {name}" for flag, name in notable)
    board = f" on {info.board}" if info.board else ""
    detail = {**asdict(info), "features": {name: flag in info.flags for flag, name in notable}}
    summary = f"{info.model}{board}, {info.cores} cores ({info.arch})"
    return Check("cpu", "ok", f"{summary}: {features}" if features else summary, detail)


def int4_kernels_check(info: CpuInfo | None) -> Check:
    """Whether onnxruntime's fast int4 matmul kernels apply on this CPU."""
    if info is None:
        return Check("int4_kernels", "skip", "CPU features unknown")
    if info.arch == "aarch64":
        return _arm_int4(info)
    if info.arch == "x86_64":
        for needs, name in X86_INT4_KERNELS:
            if all(flag in info.flags for flag in needs):
                return Check(
                    "int4_kernels",
                    "ok",
                    f"onnxruntime's {name} int4 kernels apply (int8 multiply-accumulate)",
                    {"kernels": name},
                )
        return Check(
            "int4_kernels",
            "warn",
            "no AVX2: onnxruntime has no int4 kernels for this CPU and dequantizes the weights "
            "to fp32 for every matmul, which makes decode slow; see `decode` for the rate",
            {"kernels": None},
        )
    return Check("int4_kernels", "skip", f"no int4 kernel knowledge for {info.arch}")


def _arm_int4(info: CpuInfo) -> Check:
    # MLAS gives MatMulNBits its int8 (CompInt8) kernels, and KleidiAI's, only when the CPU has
    # the SDOT/UDOT instructions (onnxruntime core/mlas/lib/qnbitgemm_kernel_neon.cpp,
    # InitializeWithDotSupport; UseKleidiAI checks HasArmNeonDot). Without them the int4 weights
    # go through the fp32 path: dequantized, then fp32 multiply-adds.
    if "asimddp" not in info.flags:
        return Check(
            "int4_kernels",
            "warn",
            "no dotprod (asimddp): onnxruntime's KleidiAI and int8 int4 kernels do not apply "
            "(a Pi 4's Cortex-A72 is ARMv8.0): int4 matmuls take the fp32 fallback, which "
            "dequantizes the weights at every step, so decode is slower than on a dotprod CPU "
            "(Pi 5) at the same clock; see `decode` for this board's rate",
            {"kernels": "fp32 fallback", "dotprod": False, "i8mm": "i8mm" in info.flags},
        )
    extra = (
        " and i8mm (matrix-multiply kernels for prompt processing)" if "i8mm" in info.flags else ""
    )
    return Check(
        "int4_kernels",
        "ok",
        f"dotprod{extra}: onnxruntime's KleidiAI int4 kernels apply",
        {"kernels": "KleidiAI", "dotprod": True, "i8mm": "i8mm" in info.flags},
    )


# -- board: cores, memory, temperature --------------------------------------------------------


def cores_check(cpus: int | None, quota: float | None, threads: int | None) -> Check:
    """`cpus`: what the process may use after the cgroup quota; `threads`: model.threads
    (0 = all, None = no model configured)."""
    detail = {"cpus": cpus, "cpu_quota": quota, "model_threads": threads}
    if cpus is None:
        return Check("cores", "warn", "cannot tell how many CPUs this process may use", detail)
    limit = f"cgroup cpu.max allows {quota:g} CPUs" if quota is not None else "no CPU quota"
    summary = f"{cpus} CPUs usable ({limit})"
    if threads is not None and threads > cpus:
        return Check(
            "cores",
            "warn",
            f"{summary}, but model.threads = {threads}: more threads than CPUs take turns and "
            f"decode slows; set model.threads to {cpus} or 0 (all usable)",
            detail,
        )
    if threads is not None:
        summary += "; inference uses all" if threads == 0 else f"; inference uses {threads}"
    return Check("cores", "ok", summary, detail)


def memory_check(readings: Readings) -> Check:
    detail = {
        "mem_available_mb": readings.mem_available_mb,
        "mem_total_mb": readings.mem_total_mb,
        "cgroup_limit_mb": readings.cgroup_limit_mb,
        "cgroup_usage_mb": readings.cgroup_usage_mb,
        "psi_some_avg10": readings.psi_some_avg10,
        "headroom_mb": readings.mem_headroom_mb,
    }
    if readings.mem_available_mb is None:
        return Check("memory", "warn", "cannot read MemAvailable from /proc/meminfo", detail)
    total = f" of {readings.mem_total_mb:.0f}" if readings.mem_total_mb is not None else ""
    parts = [f"MemAvailable {readings.mem_available_mb:.0f}{total} MB"]
    if readings.cgroup_limit_mb is not None:
        usage = readings.cgroup_usage_mb or 0.0
        parts.append(f"cgroup limit {readings.cgroup_limit_mb:.0f} MB ({usage:.0f} MB in use)")
    else:
        parts.append("no cgroup memory limit")
    if readings.psi_some_avg10 is not None:
        parts.append(f"pressure {readings.psi_some_avg10:g}% (avg10)")
    return Check("memory", "ok", "; ".join(parts), detail)


def thermal_check(zones: Sequence[ZoneReading], cpu_zone: str | None) -> Check:
    """`cpu_zone`: the zone type the governor reads (sensors.read_thermal), if any."""
    readable = [z for z in zones if z.type is not None and z.temp_c is not None]
    detail = {"zones": [asdict(z) for z in zones], "cpu_zone": cpu_zone}
    if not readable:
        found = f"{len(zones)} thermal zones, none readable" if zones else "no thermal zones"
        return Check(
            "thermal",
            "warn",
            f"{found} under /sys/class/thermal: the governor cannot see the temperature and "
            "will not back off when hot (normal in a VM, not on a board)",
            detail,
        )
    temps = ", ".join(f"{z.type} {z.temp_c:.1f} °C" for z in readable[:4])
    summary = f"{len(readable)} of {len(zones)} zones readable: {temps}"
    if cpu_zone is None:
        return Check(
            "thermal",
            "warn",
            f"{summary}; none is a CPU zone, so the governor has no CPU temperature",
            detail,
        )
    return Check("thermal", "ok", f"{summary}; the governor reads {cpu_zone}", detail)


def throttle_check(flags: ThrottleFlags | None) -> Check:
    if flags is None:
        return Check(
            "throttling",
            "skip",
            "no firmware throttle flags (get_throttled exists on Raspberry Pi boards only)",
        )
    names = ("under-voltage", "frequency capped", "throttled", "soft temperature limit")
    now_bits = (flags.under_voltage, flags.freq_capped, flags.throttled, flags.soft_temp_limit)
    since_bits = (
        flags.under_voltage_occurred,
        flags.freq_capped_occurred,
        flags.throttled_occurred,
        flags.soft_temp_limit_occurred,
    )
    now = [n for n, on in zip(names, now_bits, strict=True) if on]
    since = [n for n, on in zip(names, since_bits, strict=True) if on]
    word = f"get_throttled = {flags.raw:#x}"
    detail = {**asdict(flags), "now": now, "since_boot": since}
    if not now and not since:
        return Check(
            "throttling", "ok", f"no under-voltage or throttling since boot ({word})", detail
        )
    said = ([f"now: {', '.join(now)}"] if now else []) + (
        [f"since boot: {', '.join(since)}"] if since else []
    )
    power = "; under-voltage: use the board's rated power supply" if since_bits[0] else ""
    return Check("throttling", "warn", f"{'; '.join(said)} ({word}){power}", detail)


# -- the service: config, broker, state directory ---------------------------------------------


def config_check(source: str | None, problems: Sequence[str], node_id: str | None = None) -> Check:
    if source is None:
        return Check(
            "config",
            "skip",
            "no config (give --config FILE; /etc/edged/edged.yaml does not exist): the broker "
            "and state directory are not checked",
        )
    detail = {"source": source, "problems": list(problems)}
    errors = [p for p in problems if not p.startswith("warning: ")]
    if problems:
        # Errors first; warnings (an EDGED_ variable that is not read) only warn.
        first = errors[0] if errors else problems[0]
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        return Check("config", "fail" if errors else "warn", f"{first}{more}", detail)
    return Check("config", "ok", f"{source}: valid (node_id {node_id})", detail)


@dataclass(frozen=True)
class BrokerResult:
    """What connecting to the broker found."""

    host: str
    port: int
    error: str | None
    """Why the broker did not accept the connection; None when it sent a good CONNACK."""
    tls: TlsMode
    protocol: str | None = None
    """The MQTT version the broker accepted ("5" or "3.1.1")."""
    elapsed_ms: float | None = None


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def broker_check(result: BrokerResult) -> Check:
    where = f"{result.host}:{result.port}"
    detail = asdict(result)
    if result.error is not None:
        return Check("broker", "fail", f"{where}: {result.error}", detail)
    took = f" in {result.elapsed_ms:.0f} ms" if result.elapsed_ms is not None else ""
    summary = f"{where} accepted the connection (MQTT {result.protocol}){took}"
    if result.tls == "insecure":
        return Check(
            "broker",
            "warn",
            f"{summary}, TLS without the host name check (mqtt.tls.insecure = true)",
            detail,
        )
    if result.tls == "off" and not _is_loopback(result.host):
        return Check(
            "broker",
            "warn",
            f"{summary} over plain TCP: vitals and queries cross the network unencrypted "
            "(set mqtt.tls)",
            detail,
        )
    tls = ", TLS certificate verified" if result.tls == "verified" else ", no TLS (local broker)"
    return Check("broker", "ok", summary + tls, detail)


@dataclass(frozen=True)
class StateDirResult:
    path: str
    error: str | None
    """Why a file cannot be created, written, synced and removed there; None when it can."""
    existed: bool
    free_mb: float | None
    user: str
    """Who the check ran as: the daemon's service user may differ."""


DEGRADED_STORE = "edged run would serve degraded, its answered store in RAM"


def state_dir_check(result: StateDirResult) -> Check:
    detail = asdict(result)
    if result.error is not None:
        # Not fatal to the daemon (edged.service.store_place), but a power cut loses answers.
        summary = f"delivery.state_dir = '{result.path}': {result.error}"
        return Check("state_dir", "fail", f"{summary}; {DEGRADED_STORE}", detail)
    free = f", {result.free_mb:.0f} MB free" if result.free_mb is not None else ""
    made = "" if result.existed else " (it does not exist yet; the daemon creates it)"
    return Check(
        "state_dir", "ok", f"{result.path} is writable by {result.user}{free}{made}", detail
    )


# -- the model ------------------------------------------------------------------------------


def model_check(path: str, description: str | None, error: str | None) -> Check:
    if error is not None:
        return Check("model", "fail", error, {"path": path})
    return Check(
        "model", "ok", f"{path}: {description}; every file matches its sha256", {"path": path}
    )


def model_memory_check(
    need: MemoryNeed | None, headroom_mb: float | None, error: str | None
) -> Check:
    if error is not None or need is None:
        return Check("model_memory", "fail", error or "memory need unknown", {})
    detail = {
        "need_mb": round(need.total_mb, 1),
        "files_mb": round(need.files_mb, 1),
        "kv_mb": round(need.kv_mb, 1),
        "headroom_mb": None if headroom_mb is None else round(headroom_mb, 1),
    }
    if headroom_mb is None:
        return Check(
            "model_memory",
            "warn",
            f"needs about {need.total_mb:.0f} MB; how much this node may use is unknown",
            detail,
        )
    return Check(
        "model_memory",
        "ok",
        f"fits: needs about {need.total_mb:.0f} MB (files, prepacked weights, KV cache), "
        f"{headroom_mb:.0f} MB available",
        detail,
    )


@dataclass(frozen=True)
class DecodeResult:
    decode_tps: float | None
    tokens: int
    threads: int
    load_s: float
    first_token_ms: float | None


def decode_check(result: DecodeResult | None, error: str | None, skipped: str | None) -> Check:
    if skipped is not None:
        return Check("decode", "skip", skipped)
    if error is not None or result is None:
        return Check("decode", "fail", f"the model did not run: {error}")
    detail = asdict(result)
    if result.decode_tps is None:
        return Check("decode", "warn", "decode rate not measured (no decode steps)", detail)
    first = f", first token {result.first_token_ms:.0f} ms" if result.first_token_ms else ""
    return Check(
        "decode",
        "ok",
        f"{result.decode_tps:.1f} tokens/s decoding {result.tokens} tokens on "
        f"{result.threads} threads (load {result.load_s:.1f} s{first})",
        detail,
    )


# -- output ---------------------------------------------------------------------------------


def passed(checks: Sequence[Check]) -> bool:
    """Warnings pass; any failure does not."""
    return not any(c.status == "fail" for c in checks)


def verdict(checks: Sequence[Check]) -> str:
    counts = {s: sum(1 for c in checks if c.status == s) for s in LABELS}
    failed = [c.name for c in checks if c.status == "fail"]
    warnings = "warning" if counts["warn"] == 1 else "warnings"
    tally = f"{counts['ok']} ok, {counts['warn']} {warnings}, {counts['skip']} skipped"
    if failed:
        return f"not ready: {len(failed)} failed ({', '.join(failed)}), {tally}"
    return f"ready: {tally}"


def render_table(checks: Sequence[Check]) -> str:
    width = max((len(c.name) for c in checks), default=0)
    lines = [f"{LABELS[c.status]:<4}  {c.name:<{width}}  {c.summary}" for c in checks]
    return "\n".join([*lines, verdict(checks)])


def render_json(checks: Sequence[Check]) -> str:
    return json.dumps(
        {"ok": passed(checks), "checks": [asdict(c) for c in checks]},
        indent=2,
        ensure_ascii=False,
    )
