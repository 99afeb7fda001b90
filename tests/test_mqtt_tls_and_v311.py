"""The broker connection's less travelled paths, against a real mosquitto: TLS with the broker's
certificate verified, mutual TLS, an untrusted broker, and the fallback to MQTT 3.1.1 when a
broker refuses MQTT 5.

Certificates are made per run with the openssl CLI. A broker that only speaks MQTT 3.1.1 cannot
be had here (Debian's mosquitto 2 always accepts MQTT 5), so `OldBroker` plays one in front of
the real mosquitto: it answers an MQTT 5 CONNECT the way a 3.1.1 broker does (CONNACK return
code 1, "unacceptable protocol version") and passes any other connection through untouched.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from edged.config.loader import parse_config
from edged.mqtt.transport import MqttTransport
from edged.service.broker import PrivateBroker, free_port
from edged.service.daemon import Daemon
from tests._link import read_packet
from tests._mqtt import P, TestClient, daemon_config, reply_to


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path
    """A CA that signed nothing here: trusting only it, the broker is a stranger."""


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def _key(name: str, cwd: Path) -> None:
    _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", f"{name}.key", cwd=cwd)


def _self_signed(name: str, cn: str, cwd: Path) -> None:
    _key(name, cwd)
    subject = ["-subj", f"/CN={cn}", "-days", "2"]
    _openssl(
        "req", "-x509", "-new", "-key", f"{name}.key", *subject, "-out", f"{name}.crt", cwd=cwd
    )


def _signed_by_ca(name: str, cn: str, cwd: Path, extensions: str) -> None:
    _key(name, cwd)
    _openssl(
        "req", "-new", "-key", f"{name}.key", "-subj", f"/CN={cn}", "-out", f"{name}.csr", cwd=cwd
    )
    (cwd / f"{name}.ext").write_text(extensions)
    ca = ["-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-days", "2"]
    _openssl(
        "x509",
        "-req",
        "-in",
        f"{name}.csr",
        *ca,
        "-extfile",
        f"{name}.ext",
        "-out",
        f"{name}.crt",
        cwd=cwd,
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    _self_signed("ca", "edged test CA", d)
    _self_signed("other", "some other CA", d)
    _signed_by_ca(
        "server", "localhost", d, "subjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth\n"
    )
    _signed_by_ca("client", "test-node", d, "extendedKeyUsage=clientAuth\n")
    return Pki(
        d / "ca.crt", d / "server.crt", d / "server.key", d / "client.crt", d / "client.key",
        d / "other.crt",
    )  # fmt: skip


@dataclass
class TlsBroker:
    broker: PrivateBroker
    tls_port: int
    """Server-authenticated TLS."""
    mtls_port: int
    """TLS that also requires a client certificate signed by the CA."""


@pytest.fixture
def tls_broker(pki: Pki, tmp_path: Path) -> Iterator[TlsBroker]:
    tls_port, mtls_port = free_port(), free_port()
    certs = [f"cafile {pki.ca}", f"certfile {pki.server_cert}", f"keyfile {pki.server_key}"]
    extra = [f"listener {tls_port} 127.0.0.1", *certs]
    extra += [f"listener {mtls_port} 127.0.0.1", *certs, "require_certificate true"]
    workdir = tmp_path / "broker"
    workdir.mkdir()
    # The gateway uses the plain listener; the daemon one of the TLS ones.
    with PrivateBroker(workdir=workdir, extra_config=extra) as broker:
        yield TlsBroker(broker, tls_port, mtls_port)


def _start(port: int, state: Path, **mqtt: Any) -> Daemon:
    # The certificate is for "localhost": connecting by that name checks the host name too.
    config = daemon_config(port, state, mqtt={"host": "localhost", "connect_timeout_s": 2, **mqtt})
    daemon = Daemon(parse_config(config))
    daemon.start()
    return daemon


def _answers_over(port: int, state: Path, gateway_port: int, qid: str, tls: dict[str, str]) -> None:
    """A daemon with these TLS settings connects and answers a query from a plain gateway."""
    gateway = TestClient(gateway_port, [f"{P}/w1/#"])
    daemon = _start(port, state, tls=tls)
    try:
        assert daemon.wait_ready(10)
        assert _answered(gateway, qid)["finish_reason"] in ("stop", "length")
    finally:
        daemon.stop()
        gateway.close()


def _never_connects(port: int, state: Path, tls: dict[str, str] | None, **mqtt: Any) -> None:
    daemon = _start(port, state, tls=tls, **mqtt)
    try:
        assert not daemon.transport.wait_connected(3)
    finally:
        daemon.stop()


def _answered(gateway: TestClient, qid: str) -> dict[str, Any]:
    gateway.publish(f"{P}/w1/query", {"id": qid, "text": "Is 118 at rest high?", "max_tokens": 8})
    reply: dict[str, Any] = gateway.wait_for(reply_to(qid)).json()
    return reply


def test_daemon_verifies_the_broker_certificate_and_answers_over_tls(
    tls_broker: TlsBroker, pki: Pki, tmp_path: Path
) -> None:
    tls = {"ca_file": str(pki.ca)}
    _answers_over(tls_broker.tls_port, tmp_path / "state", tls_broker.broker.port, "tls", tls)


def test_mutual_tls_needs_the_client_certificate(
    tls_broker: TlsBroker, pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="edged.mqtt.transport")
    _never_connects(tls_broker.mtls_port, tmp_path / "s1", {"ca_file": str(pki.ca)})
    assert "does the broker require a TLS client certificate, mqtt.tls.cert_file?" in caplog.text
    tls = {"ca_file": str(pki.ca), "cert_file": str(pki.client_cert)}
    tls["key_file"] = str(pki.client_key)
    _answers_over(tls_broker.mtls_port, tmp_path / "s2", tls_broker.broker.port, "mtls", tls)


def test_a_broker_certificate_from_an_untrusted_ca_is_refused_and_logged(
    tls_broker: TlsBroker, pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="edged.mqtt.transport")
    _never_connects(tls_broker.tls_port, tmp_path / "state", {"ca_file": str(pki.other_ca)})
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert errors and "TLS certificate check failed" in errors[0]
    assert "self-signed certificate in certificate chain" in errors[0]
    assert f"mqtt.tls.ca_file = {pki.other_ca}" in errors[0]


def test_a_port_that_is_not_an_mqtt_broker_is_reported_as_such(
    tls_broker: TlsBroker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Three common mistakes, three different lines; none of them blames a client certificate
    that was never configured."""
    caplog.set_level(logging.WARNING, logger="edged.mqtt.transport")
    http = socket.create_server(("127.0.0.1", 0))  # a web server: answers, then hangs up
    silent = socket.create_server(("127.0.0.1", 0))  # accepts and says nothing

    def answer_http() -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = http.accept()
                with conn:
                    conn.recv(1024)
                    conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

    threading.Thread(target=answer_http, daemon=True).start()
    try:
        for port, expected in (
            (http.getsockname()[1], "closed the connection before CONNACK (a TLS port without"),
            (tls_broker.tls_port, "closed the connection before CONNACK (a TLS port without"),
            (silent.getsockname()[1], "no CONNACK within 1 s (not an MQTT port?)"),
        ):
            caplog.clear()
            # The daemon's own transport, without a model to load: only its first attempt.
            cfg = parse_config(daemon_config(port, tmp_path, mqtt={"connect_timeout_s": 1})).mqtt
            link = MqttTransport(cfg, "probe", [("x/#", 1)], None, lambda m: None)
            link.start()
            deadline = time.monotonic() + 5
            while "did not accept" not in caplog.text and time.monotonic() < deadline:
                time.sleep(0.05)
            link.stop(timeout=2)
            assert expected in caplog.text, caplog.text
            assert "client certificate" not in caplog.text
    finally:
        http.close()
        silent.close()


# -- MQTT 3.1.1 --------------------------------------------------------------------------------


class OldBroker:
    """A TCP front for mosquitto that refuses MQTT 5 like a 3.1.1-only broker."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.refused_v5 = 0
        self.passed_through = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._closing = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closing:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            first = read_packet(conn)
            if first is None:
                return
            # CONNECT: after the fixed header, protocol name "MQTT" (2 + 4 bytes), then the level.
            level = first[first.index(b"MQTT") + 4]
            if level == 5:
                self.refused_v5 += 1
                conn.sendall(bytes([0x20, 0x02, 0x00, 0x01]))  # CONNACK: bad protocol version
                return
            self.passed_through += 1
            with socket.create_connection(("127.0.0.1", self.upstream_port)) as up:
                up.sendall(first)
                pump = threading.Thread(target=self._pipe, args=(up, conn), daemon=True)
                pump.start()
                self._pipe(conn, up)
                pump.join(2)

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._closing = True
        self._listener.close()


def test_a_broker_refusing_mqtt5_gets_mqtt_3_1_1_and_queries_are_answered(
    broker: PrivateBroker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="edged.mqtt.transport")
    old = OldBroker(broker.port)
    gateway = TestClient(broker.port, [f"{P}/w1/#", f"{P}/_node/+/status"])
    daemon = Daemon(parse_config(daemon_config(old.port, tmp_path / "state")))
    daemon.start()
    try:
        assert daemon.wait_ready(10)
        assert daemon.transport.protocol == "3.1.1"
        assert old.refused_v5 == 1 and old.passed_through >= 1
        assert "falling back to MQTT 3.1.1" in caplog.text
        status = gateway.wait_for(lambda r: r.topic.endswith("/status"))
        assert status.json()["state"] == "online"
        # 3.1.1 carries no Response Topic: the advice goes to the wearer's advice topic.
        answer = _answered(gateway, "old-broker")
        assert answer["finish_reason"] in ("stop", "length") and answer["node"] == "test-node"
    finally:
        daemon.stop()
        gateway.close()
        old.close()
