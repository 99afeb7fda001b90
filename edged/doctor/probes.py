"""The doctor's edges: connect to the broker, write to the state directory, load and run the
model. Each returns what it found as plain data (`edged.doctor.checks` judges it) and never
raises for what it was sent to find out."""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import ssl
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.reasoncodes import ReasonCode

from edged.config.models import MqttConfig
from edged.doctor.checks import BrokerResult, DecodeResult, StateDirResult, TlsMode
from edged.engine import Engine, EngineOptions, GenerationConfig
from edged.engine.manifest import ModelDirError, read_manifest, verify_files
from edged.mqtt.transport import apply_credentials, no_connack_reason

MQTT_V5_UNSUPPORTED = (0x84, 0x01)
"""CONNACK codes of a broker that does not speak MQTT 5: 0x84 "Unsupported Protocol
Version" (MQTT 5), return code 1 "unacceptable protocol version" (MQTT 3.1.1). It did answer as
an MQTT broker, and the daemon falls back to 3.1.1 there (edged.mqtt.transport)."""
AUTH_CODES = (0x86, 0x87)
DECODE_PROMPT = "How much water should I drink in a day?"
"""A fixed question with no patient data: the doctor's run is about speed, not the answer."""


def read_cpuinfo(root: Path) -> str | None:
    try:
        return (root / "proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return None


# -- broker ---------------------------------------------------------------------------------


def _tls_mode(cfg: MqttConfig) -> TlsMode:
    if cfg.tls is None:
        return "off"
    return "insecure" if cfg.tls.insecure else "verified"


def _connect_error(exc: Exception, cfg: MqttConfig, timeout_s: float) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        ca = cfg.tls.ca_file if cfg.tls else None
        return (
            f"TLS verify failed: {exc.verify_message or exc} (trusted CA: mqtt.tls.ca_file = "
            f"{ca}; mqtt.host must be a name in the broker's certificate)"
        )
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake failed: {exc.reason or exc} (is this port TLS? mqtt.tls is set)"
    if cfg.tls is not None and isinstance(exc, ConnectionResetError):
        # A plain-TCP broker (mosquitto) drops a TLS ClientHello without a word.
        return "TLS handshake failed: the server reset the connection (is this port TLS?)"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused: nothing listens there (is the broker running?)"
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return f"timeout: no TCP connection within {timeout_s:g} s (host down or firewalled?)"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the host name: {exc.strerror or exc}"
    return f"cannot connect: {getattr(exc, 'strerror', None) or exc}"


def _await_connack(client: mqtt.Client, cfg: MqttConfig, timeout_s: float) -> ReasonCode | str:
    """The broker's CONNACK, or why none came (worded as the daemon logs it)."""
    connack: list[ReasonCode] = []
    client.on_connect = lambda _c, _u, _f, code, _p: connack.append(code)
    deadline = time.monotonic() + timeout_s
    rc = mqtt.MQTT_ERR_SUCCESS
    while not connack and time.monotonic() < deadline:
        rc = client.loop(timeout=0.1)
        if rc != mqtt.MQTT_ERR_SUCCESS:
            break
    return connack[0] if connack else no_connack_reason(rc, timeout_s, cfg.tls)


def probe_broker(cfg: MqttConfig, client_id: str, timeout_s: float) -> BrokerResult:
    """Connect once with the daemon's credentials and TLS settings, wait for the CONNACK,
    disconnect. `client_id` must not be the daemon's: the broker would drop a running daemon
    to let the probe in (one session per client id)."""
    tls = _tls_mode(cfg)
    result = BrokerResult(cfg.host, cfg.port, None, tls)
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5
    )
    client.connect_timeout = timeout_s
    try:
        apply_credentials(client, cfg)
    except (OSError, ssl.SSLError, ValueError) as exc:
        return _with(result, error=f"cannot read the credentials or certificates: {exc}")
    started = time.monotonic()
    try:
        client.connect(cfg.host, cfg.port, keepalive=max(5, int(timeout_s) + 5))
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        return _with(result, error=_connect_error(exc, cfg, timeout_s))
    try:
        code = _await_connack(client, cfg, timeout_s)
    finally:
        client.disconnect()
        client.loop(timeout=0.05)  # send the DISCONNECT so the broker logs a clean exit
    elapsed_ms = (time.monotonic() - started) * 1000
    if isinstance(code, str):
        return _with(result, error=code)
    if int(code.value) in MQTT_V5_UNSUPPORTED:
        return _with(result, protocol="3.1.1", elapsed_ms=elapsed_ms)
    if code.is_failure:
        # 0x86 "Bad User Name or Password", 0x87 "Not authorized" (MQTT 5, 3.2.2.2)
        hint = " (check mqtt.username and its password)" if int(code.value) in AUTH_CODES else ""
        return _with(result, error=f"the broker refused the connection: {code}{hint}")
    return _with(result, protocol="5", elapsed_ms=elapsed_ms)


def _with(result: BrokerResult, **changes: object) -> BrokerResult:
    return replace(result, **changes)  # type: ignore[arg-type]


# -- state directory ------------------------------------------------------------------------


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a DynamicUser= uid with no passwd entry
        return f"uid {os.getuid()}"


def probe_state_dir(path: Path) -> StateDirResult:
    """Make the directory if needed, create, write, fsync and remove a file in it, then remove
    whatever directories this made: the doctor leaves nothing behind (a directory made by root
    here would belong to root and lock out the service user)."""
    made = [p for p in (path, *path.parents) if not p.exists() and not p.is_symlink()]
    existed = not made
    user = _user()
    try:
        if path.exists() and not path.is_dir():
            raise NotADirectoryError("exists and is not a directory")
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".edged-doctor-", dir=path)
        try:
            os.write(fd, b"edged doctor\n")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
        free_mb = shutil.disk_usage(path).free / 2**20
    except OSError as exc:
        reason = exc.strerror or str(exc)
        # Name the file only when it is not the directory itself or the probe file in it
        # (e.g. a parent that could not be made).
        name = Path(str(exc.filename)) if exc.filename else None
        where = f" ({name})" if name is not None and path not in (name, name.parent) else ""
        return StateDirResult(str(path), f"{reason}{where}", existed, None, user)
    finally:
        for directory in made:  # deepest first
            try:
                directory.rmdir()
            except OSError:
                break
    return StateDirResult(str(path), None, existed, free_mb, user)


# -- model ----------------------------------------------------------------------------------


def verify_model(path: Path) -> tuple[str | None, str | None]:
    """(what the model is, None) when every file matches its manifest, else (None, why)."""
    try:
        manifest = read_manifest(path)
        verify_files(path, manifest)
    except ModelDirError as exc:
        return None, str(exc)
    q = manifest.quantization
    level = f", accuracy_level {q.accuracy_level}" if q.method == "int4" else ""
    return f"{manifest.name} ({manifest.architecture}, {q.method}{level})", None


def measure_decode(
    path: Path, options: EngineOptions, tokens: int
) -> tuple[DecodeResult | None, str | None]:
    """Load the model and time `tokens` decode steps after a short prompt. EOS is ignored and
    speculation is off, so every step is one plain forward pass: the rate a long answer gets."""
    started = time.perf_counter()
    try:
        engine = Engine.load(path, options)
        load_s = time.perf_counter() - started
        config = GenerationConfig(max_new_tokens=tokens, ignore_eos=True, speculate=False)
        result = engine.chat(
            [{"role": "user", "content": DECODE_PROMPT}], config, enable_thinking=False
        )
    except Exception as exc:  # onnxruntime raises its own types; any failure is the finding
        if isinstance(exc, ModelDirError):  # its message names the file already
            return None, str(exc)
        return None, f"{type(exc).__name__}: {exc}"
    timing = result.timing
    return (
        DecodeResult(
            decode_tps=timing.decode_tps,
            tokens=result.completion_tokens,
            threads=engine.threads,
            load_s=round(load_s, 2),
            first_token_ms=timing.first_token_ms,
        ),
        None,
    )
