"""`edged doctor`: the board read from cpuinfo and sysfs texts in the kernel's formats, and the
whole command through the CLI against a real mosquitto and the tiny int4 model."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from edged.config.models import MqttConfig, TlsConfig
from edged.doctor import DoctorOptions, run_checks
from edged.doctor.checks import (
    Check,
    broker_check,
    cores_check,
    cpu_check,
    int4_kernels_check,
    parse_cpuinfo,
    passed,
)
from edged.doctor.probes import probe_broker
from edged.service.broker import PrivateBroker, free_port
from tests._mqtt import MODEL, REPO, daemon_config
from tests.test_governor_sensors import build_pi5, write, write_meminfo, write_zones
from tests.test_mqtt_tls_and_v311 import Pki, TlsBroker, pki, tls_broker  # noqa: F401 (fixtures)


def board_cpuinfo(features: str, part: str, variant: str, model: str, cores: int = 4) -> str:
    """/proc/cpuinfo as a Raspberry Pi's arm64 kernel prints it (as tools/arm64_check.sh)."""
    text = "".join(
        f"processor\t: {n}\nBogoMIPS\t: 108.00\nFeatures\t: {features}\n"
        f"CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: {variant}\n"
        f"CPU part\t: {part}\nCPU revision\t: 1\n\n"
        for n in range(cores)
    )
    return text + f"Revision\t: d04170\nSerial\t\t: 10000000edged000\nModel\t\t: {model}\n"


PI4 = board_cpuinfo(
    "fp asimd evtstrm crc32 cpuid", "0xd08", "0x0", "Raspberry Pi 4 Model B Rev 1.5"
)
PI5 = board_cpuinfo(
    "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop "
    "asimddp",
    "0xd0b",
    "0x4",
    "Raspberry Pi 5 Model B Rev 1.0",
)
X86_FLAGS = "fpu vme de pse tsc msr sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c avx2 bmi2"
X86_VNNI = (
    "processor\t: 0\nvendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel\t\t: 106\n"
    "model name\t: Intel(R) Xeon(R) Gold 6338 CPU @ 2.00GHz\n"
    f"flags\t\t: {X86_FLAGS} avx512f avx512dq avx512bw avx512vl avx512_vnni\n\n"
)


def by_name(checks: list[Check]) -> dict[str, Check]:
    return {c.name: c for c in checks}


# -- pure checks ------------------------------------------------------------------------------


def test_pi4_warns_that_kleidiai_int4_kernels_do_not_apply() -> None:
    info = parse_cpuinfo(PI4)
    assert (info.arch, info.model, info.cores) == ("aarch64", "Cortex-A72", 4)
    assert info.board == "Raspberry Pi 4 Model B Rev 1.5"
    assert "no dotprod" in cpu_check(info).summary

    kernels = int4_kernels_check(info)
    assert kernels.status == "warn"
    assert "no dotprod (asimddp)" in kernels.summary
    assert "KleidiAI" in kernels.summary and "do not apply" in kernels.summary
    assert "slower" in kernels.summary  # what it costs


def test_pi5_gets_the_kleidiai_int4_kernels() -> None:
    info = parse_cpuinfo(PI5)
    assert (info.model, info.board) == ("Cortex-A76", "Raspberry Pi 5 Model B Rev 1.0")
    assert cpu_check(info).detail["features"] == {
        "NEON": True,
        "dotprod": True,
        "i8mm": False,
        "SVE": False,
    }
    kernels = int4_kernels_check(info)
    assert kernels.status == "ok"
    assert kernels.detail["kernels"] == "KleidiAI"


def test_big_little_names_both_cores_and_i8mm_is_reported() -> None:
    little = board_cpuinfo("fp asimd asimddp i8mm", "0xd05", "0x2", "Some RK3588 board", 2)
    big = board_cpuinfo("fp asimd asimddp i8mm", "0xd0b", "0x4", "Some RK3588 board", 2)
    info = parse_cpuinfo(little.split("Revision")[0] + big)
    assert info.model == "Cortex-A55 + Cortex-A76"
    assert "i8mm" in int4_kernels_check(info).summary


def test_x86_reports_avx512_vnni_and_warns_without_avx2() -> None:
    info = parse_cpuinfo(X86_VNNI)
    assert (info.arch, info.model) == ("x86_64", "Intel(R) Xeon(R) Gold 6338 CPU @ 2.00GHz")
    assert "AVX-512 VNNI" in cpu_check(info).summary
    assert int4_kernels_check(info).status == "ok"
    assert int4_kernels_check(info).detail["kernels"] == "AVX-512 VNNI"

    old = parse_cpuinfo("processor\t: 0\nmodel name\t: Atom\nflags\t\t: fpu sse sse2 avx\n")
    assert int4_kernels_check(old).status == "warn"
    assert "no AVX2" in int4_kernels_check(old).summary


def test_more_threads_than_usable_cpus_is_a_warning_naming_model_threads() -> None:
    check = cores_check(cpus=2, quota=1.5, threads=4)
    assert check.status == "warn"
    assert "model.threads = 4" in check.summary and "1.5 CPUs" in check.summary
    assert cores_check(cpus=4, quota=None, threads=0).status == "ok"


# -- fake board trees ------------------------------------------------------------------------


def test_a_pi5_tree_reads_as_a_pi5_with_quota_cgroup_and_throttling(tmp_path: Path) -> None:
    build_pi5(tmp_path)  # 4 CPUs online, memory.max 2 GiB, cpu-thermal 61.5 °C, 0x50005
    write(tmp_path, "sys/fs/cgroup/system.slice/edged.service/cpu.max", "150000 100000\n")
    write(tmp_path, "proc/cpuinfo", PI5)

    checks = by_name(run_checks(DoctorOptions(config=None, config_source=None, root=tmp_path)))

    assert checks["cpu"].summary.startswith("Cortex-A76 on Raspberry Pi 5 Model B Rev 1.0, 4 cores")
    assert checks["cores"].summary.startswith("2 CPUs usable (cgroup cpu.max allows 1.5 CPUs)")
    assert "cgroup limit 2048 MB (700 MB in use)" in checks["memory"].summary
    assert checks["thermal"].status == "ok"
    assert "cpu-thermal 61.5 °C" in checks["thermal"].summary
    throttling = checks["throttling"]
    assert throttling.status == "warn"
    assert "now: under-voltage, throttled" in throttling.summary
    assert "get_throttled = 0x50005" in throttling.summary
    assert "power supply" in throttling.summary
    assert checks["model"].status == "skip"
    assert passed(list(checks.values()))  # warnings pass


def test_a_model_that_does_not_fit_the_cgroup_fails_and_is_not_loaded(tmp_path: Path) -> None:
    # A Pi 4 whose service may use 96 MiB: the tiny model needs about 150 MB with its runtime.
    write(tmp_path, "proc/cpuinfo", PI4)
    write_zones(tmp_path, [("cpu-thermal", "47236")])
    write_meminfo(tmp_path, total_kb=3884072, available_kb=3311220)
    write(tmp_path, "proc/self/cgroup", "0::/system.slice/edged.service\n")
    write(tmp_path, "sys/fs/cgroup/system.slice/edged.service/memory.max", f"{96 << 20}\n")
    write(tmp_path, "sys/fs/cgroup/system.slice/edged.service/memory.current", "0\n")

    options = DoctorOptions(config=None, config_source=None, model_dir=MODEL, root=tmp_path)
    checks = by_name(run_checks(options))

    assert checks["int4_kernels"].status == "warn"
    assert checks["model"].status == "ok"
    fit = checks["model_memory"]
    assert fit.status == "fail"
    assert "this node may use 96 MB (cgroup limit 96 MB" in fit.summary
    assert checks["decode"].status == "skip"
    assert not passed(list(checks.values()))


# -- the broker probe at the edges ------------------------------------------------------------


@pytest.fixture
def not_mqtt() -> Iterator[int]:
    """A TCP server that answers like a web server and hangs up."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(5)

    def serve() -> None:
        try:
            conn, _ = server.accept()
        except OSError:
            return
        with conn:
            conn.recv(1024)
            conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    server.close()
    thread.join(5)


def test_a_server_that_is_not_mqtt_is_named_so(not_mqtt: int) -> None:
    result = probe_broker(MqttConfig(port=not_mqtt), "edged-doctor-test", timeout_s=3)
    assert result.error is not None
    assert "not an MQTT server" in result.error


def test_tls_towards_a_plain_port_fails_the_handshake(broker: PrivateBroker) -> None:
    cfg = MqttConfig(port=broker.port, tls=TlsConfig())  # mosquitto here speaks plain TCP
    result = probe_broker(cfg, "edged-doctor-test", timeout_s=3)
    assert result.error is not None
    assert result.error.startswith("TLS handshake failed")


def test_tls_is_verified_against_the_configured_ca(
    tls_broker: TlsBroker,  # noqa: F811 (the imported fixture)
    pki: Pki,  # noqa: F811
) -> None:
    def probe(port: int, ca: Path) -> Check:
        # The certificate is for "localhost": connecting by that name checks the host name too.
        cfg = MqttConfig(host="localhost", port=port, tls=TlsConfig(ca_file=ca))
        return broker_check(probe_broker(cfg, "edged-doctor-test", timeout_s=3))

    trusted = probe(tls_broker.tls_port, pki.ca)
    assert trusted.status == "ok"
    assert trusted.summary.endswith("TLS certificate verified")

    stranger = probe(tls_broker.tls_port, pki.other_ca)
    assert stranger.status == "fail"
    assert stranger.summary.startswith(f"localhost:{tls_broker.tls_port}: TLS verify failed")
    assert f"mqtt.tls.ca_file = {pki.other_ca}" in stranger.summary

    no_client_cert = probe(tls_broker.mtls_port, pki.ca)
    assert no_client_cert.status == "fail"
    assert "client certificate" in no_client_cert.summary


# -- the command, end to end ------------------------------------------------------------------


def doctor(config: dict[str, Any], tmp_path: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "edged.yaml"
    path.write_text(yaml.safe_dump(config))
    return subprocess.run(
        [sys.executable, "-m", "edged", "doctor", "--config", str(path), *flags],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )


def test_doctor_passes_with_the_real_broker_and_measures_decode(
    broker: PrivateBroker, tmp_path: Path
) -> None:
    state = tmp_path / "state" / "edged"
    out = doctor(daemon_config(broker.port, state), tmp_path, "--json")

    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads(out.stdout)
    assert report["ok"] is True
    checks = {c["name"]: c for c in report["checks"]}
    assert checks["config"]["status"] == "ok"
    assert checks["broker"]["status"] == "ok"
    assert f"127.0.0.1:{broker.port} accepted the connection" in checks["broker"]["summary"]
    assert checks["state_dir"]["status"] == "ok"
    assert not (tmp_path / "state").exists()  # the probe left nothing behind
    assert checks["model"]["status"] == "ok"
    decode = checks["decode"]
    assert decode["status"] == "ok"
    assert decode["detail"]["tokens"] == 16
    assert decode["detail"]["threads"] == 1  # model.threads from the config
    assert decode["detail"]["decode_tps"] > 0


def test_a_closed_port_fails_naming_host_and_port(tmp_path: Path) -> None:
    port = free_port()
    out = doctor(daemon_config(port, tmp_path / "state"), tmp_path, "--no-speed")

    assert out.returncode == 1, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    broker_line = next(line for line in lines if line.startswith("FAIL  broker"))
    assert f"127.0.0.1:{port}: connection refused" in broker_line
    assert lines[-1].startswith("not ready: 1 failed (broker)")


def test_a_file_in_place_of_the_state_dir_fails_naming_delivery_state_dir(
    broker: PrivateBroker, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    state.write_text("not a directory\n")
    out = doctor(daemon_config(broker.port, state), tmp_path, "--json", "--no-speed")

    assert out.returncode == 1, out.stdout + out.stderr
    report = json.loads(out.stdout)
    assert report["ok"] is False
    checks = {c["name"]: c for c in report["checks"]}
    assert checks["broker"]["status"] == "ok"
    assert checks["state_dir"]["status"] == "fail"
    assert checks["state_dir"]["summary"] == (
        f"delivery.state_dir = '{state}': exists and is not a directory; "
        "edged run would serve degraded, its answered store in RAM"
    )


def test_config_problems_are_a_failed_check_not_a_traceback(tmp_path: Path) -> None:
    config = daemon_config(free_port(), tmp_path / "state")
    config["mqtt"]["prot"] = 1883
    out = doctor(config, tmp_path, "--json", "--no-speed")

    assert out.returncode == 1, out.stdout + out.stderr
    assert "Traceback" not in out.stderr
    checks = {c["name"]: c for c in json.loads(out.stdout)["checks"]}
    assert checks["config"]["status"] == "fail"
    assert "mqtt.prot: unknown key; did you mean 'port'?" in checks["config"]["summary"]
    assert checks["broker"] == {
        "name": "broker",
        "status": "skip",
        "summary": "the config did not load",
        "detail": {},
    }
    assert checks["cpu"]["status"] == "ok"  # the board is still examined
