#!/usr/bin/env python3
"""What the installed mosquitto does with MQTT 5 shared subscriptions, measured (issue #15).

    python tools/share_probe.py                          # all five questions, about 30 s
    python tools/share_probe.py --only q2 q3 --json share-probe.json

Every experiment gets a private mosquitto of its own (PrivateBroker: a free loopback port,
persistence on, max_inflight_messages 100, max_queued_messages 100000), so no session or
round-robin position leaks from one to the next. Members are paho 2.x MQTT 5 clients on
persistent sessions (clean_start False, SessionExpiryInterval as the question says) with
manual acks: a "holding" member leaves every query unacked, as a node busy generating does.
Messages go to `t/w<N>/query` at QoS 1 and the shared filter is `$share/g/t/+/query`.

Q1 round robin: 300 messages over 3 members that ack at once.
Q2 Receive Maximum: member A (ReceiveMaximum 1, 2, 4) holds, B and C ack; 30 messages. Does
   the broker skip A once its window is full, or queue A's turns for it?
Q3 a member dies holding messages (its socket closed without DISCONNECT: what the kernel does
   for a SIGKILLed process), with session expiry 3600, 10 and 0 s, and comes back 1 s later
   with the same client id: where did its held messages and the new ones go?
Q4 as Q3, expiry 5 s and back after 7 s: is an expired session's backlog re-dispatched?
Q5 one connection, a small Receive Maximum, shared queries held: are its non-shared
   `t/+/vitals` (QoS 1 and QoS 0) held up too?

stdout gets the report; `--json FILE` writes the numbers; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import functools
import json
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO_ROOT))

from edged.service.broker import PrivateBroker, find_mosquitto  # noqa: E402

SHARED = "$share/g/t/+/query"
VITALS = "t/+/vitals"
CONNECT_TIMEOUT_S = 5.0
QUIET_S = 0.4
"""A delivery burst is over once no member has received anything for this long."""
SETTLE_TIMEOUT_S = 8.0
VITALS_SEQ_QOS1 = 1000
VITALS_SEQ_QOS0 = 2000
"""Vitals carry sequence numbers from here, so they never collide with query numbers."""


class ProbeError(RuntimeError):
    pass


def progress(line: str) -> None:
    print(f"share_probe: {line}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Delivery:
    seq: int
    topic: str
    qos: int
    dup: bool


def _seq(payload: bytes | bytearray) -> int:
    return int(payload.split(b":", 1)[1])


def _new_client(client_id: str, manual_ack: bool) -> mqtt.Client:
    return mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=mqtt.MQTTv5,
        manual_ack=manual_ack,
    )


class Member:
    """One share-group member on a persistent session. With `hold`, queries stay unacked until
    `release()`; everything else (and every query without `hold`) is acked on receipt."""

    def __init__(
        self,
        port: int,
        client_id: str,
        *,
        session_expiry: int = 3600,
        receive_maximum: int | None = None,
        hold: bool = False,
        subscriptions: Sequence[str] = (SHARED,),
    ) -> None:
        self.client_id = client_id
        self.hold = hold
        self.session_present: bool | None = None
        self._deliveries: list[Delivery] = []
        self._held: list[int] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self._client = _new_client(client_id, manual_ack=True)
        self._client.on_message = self._on_message
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = lambda c, u, mid, codes, p: self._subscribed.set()
        self._subscriptions = list(subscriptions)
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = session_expiry
        if receive_maximum is not None:
            props.ReceiveMaximum = receive_maximum
        self._client.connect("127.0.0.1", port, clean_start=False, properties=props)
        self._client.loop_start()
        if not self._subscribed.wait(CONNECT_TIMEOUT_S):
            raise ProbeError(f"member {client_id} not subscribed within {CONNECT_TIMEOUT_S} s")

    def _on_connect(
        self, client: mqtt.Client, userdata: object, flags: Any, rc: Any, props: Any
    ) -> None:
        self.session_present = bool(flags.session_present)
        client.subscribe([(topic, 1) for topic in self._subscriptions])

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        delivery = Delivery(_seq(msg.payload), msg.topic, msg.qos, bool(msg.dup))
        with self._lock:
            self._deliveries.append(delivery)
            hold = self.hold and msg.qos > 0 and msg.topic.endswith("/query")
            if hold:
                self._held.append(msg.mid)
        if msg.qos and not hold:
            client.ack(msg.mid, msg.qos)

    def deliveries(self) -> list[Delivery]:
        with self._lock:
            return list(self._deliveries)

    def seqs(self) -> set[int]:
        return {d.seq for d in self.deliveries()}

    def release(self) -> int:
        """Ack every held query and ack the rest on receipt from now on; how many were held."""
        with self._lock:
            self.hold = False
            held, self._held = self._held, []
        for mid in held:
            self._client.ack(mid, 1)
        return len(held)

    def kill(self) -> None:
        """Drop the TCP connection without DISCONNECT, as the kernel does for a SIGKILLed
        process: the broker sees an abrupt close and keeps the session for its expiry."""
        self._client.loop_stop()
        sock = self._client.socket()
        if sock is not None:
            sock.close()

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


class Publisher:
    """A clean-session client that publishes numbered messages and waits for every PUBACK, so
    the broker has routed them all before anything is counted."""

    def __init__(self, port: int) -> None:
        self._connected = threading.Event()
        self._client = _new_client(f"probe-pub-{uuid.uuid4().hex[:6]}", manual_ack=False)
        self._client.on_connect = lambda c, u, f, rc, p: self._connected.set()
        self._client.connect("127.0.0.1", port, clean_start=True)
        self._client.loop_start()
        if not self._connected.wait(CONNECT_TIMEOUT_S):
            raise ProbeError(f"publisher not connected within {CONNECT_TIMEOUT_S} s")

    def send(self, kind: str, seqs: Iterable[int], qos: int = 1) -> None:
        infos = [
            self._client.publish(f"t/w{seq % 7}/{kind}", f"{kind}:{seq}", qos=qos) for seq in seqs
        ]
        for info in infos:
            info.wait_for_publish(CONNECT_TIMEOUT_S)
            if not info.is_published():
                raise ProbeError(f"{kind} message mid {info.mid} not acknowledged by the broker")

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


def settle(members: Sequence[Member], quiet_s: float = QUIET_S) -> None:
    """Wait until no member has received anything for `quiet_s` (at most SETTLE_TIMEOUT_S)."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    last, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        count = sum(len(m.deliveries()) for m in members)
        if count != last:
            last, since = count, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return
        time.sleep(0.02)


# -- Q1: round robin ---------------------------------------------------------------------------


@dataclass
class RoundRobin:
    messages: int
    per_member: dict[str, int]
    strict_rotation: bool
    """Message i went to member i mod 3, in one fixed order, for every i."""
    duplicates: int
    missing: int


def probe_round_robin(port: int, messages: int = 300) -> RoundRobin:
    members = [Member(port, f"q1-{name}") for name in "abc"]
    pub = Publisher(port)
    try:
        pub.send("query", range(messages))
        settle(members)
        owner: dict[int, str] = {}
        total = 0
        for member in members:
            for delivery in member.deliveries():
                owner[delivery.seq] = member.client_id
                total += 1
        order = [owner.get(seq) for seq in range(messages)]
        strict = all(order[i] == order[i % len(members)] for i in range(messages))
        return RoundRobin(
            messages=messages,
            per_member={m.client_id: len(m.deliveries()) for m in members},
            strict_rotation=strict and None not in order,
            duplicates=total - len(owner),
            missing=messages - len(owner),
        )
    finally:
        pub.close()
        for member in members:
            member.close()


# -- Q2: Receive Maximum -----------------------------------------------------------------------


@dataclass
class ReceiveMaximum:
    receive_maximum: int
    messages: int
    a_held: int
    """What A (holding, never acking) had received when the burst was over."""
    b: int
    c: int
    queued_for_a: int
    """Published, acked by the broker, delivered to nobody yet: waiting in A's session."""
    a_after_ack: int
    """What A received once it acked its held messages (and acked on receipt from then on)."""
    lost: int
    broker_skips_full_member: bool


def probe_receive_maximum(port: int, receive_maximum: int, messages: int = 30) -> ReceiveMaximum:
    a = Member(port, "q2-a", receive_maximum=receive_maximum, hold=True)
    b, c = Member(port, "q2-b"), Member(port, "q2-c")
    pub = Publisher(port)
    try:
        pub.send("query", range(messages))
        settle([a, b, c])
        a_held, n_b, n_c = len(a.deliveries()), len(b.deliveries()), len(c.deliveries())
        a.release()
        settle([a, b, c])
        a_after = len(a.deliveries()) - a_held
        everyone = a.seqs() | b.seqs() | c.seqs()
        return ReceiveMaximum(
            receive_maximum=receive_maximum,
            messages=messages,
            a_held=a_held,
            b=n_b,
            c=n_c,
            queued_for_a=messages - a_held - n_b - n_c,
            a_after_ack=a_after,
            lost=messages - len(everyone),
            broker_skips_full_member=n_b + n_c == messages - a_held,
        )
    finally:
        pub.close()
        for member in (a, b, c):
            member.close()


# -- Q3 and Q4: a member dies holding messages -------------------------------------------------


@dataclass
class MemberDeath:
    session_expiry_s: int
    down_s: float
    """Seconds from the kill to the reconnect with the same client id."""
    held_at_kill: int
    held_to_peers: int
    """Of the dead member's unacked messages, how many the broker gave to B or C."""
    held_to_peers_after_s: float | None
    """When the first of those reached a peer, seconds after the kill."""
    new_published: int
    """Published 0.3 s after the kill, while the member was gone."""
    new_to_peers: int
    session_present: bool | None
    held_redelivered: int
    held_redelivered_with_dup: int
    new_after_reconnect: int
    lost: int
    """Messages no member ever acked: held ones never redelivered plus new ones nobody got."""
    peer_timeline: list[tuple[float, int]] = field(default_factory=list)
    """(seconds after the kill, seq) of each of the dead member's messages a peer received."""


class _Stamped(Member):
    """A member that also notes when each message arrived (for re-dispatch timing)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.arrivals: dict[int, float] = {}
        super().__init__(*args, **kwargs)

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        self.arrivals.setdefault(_seq(msg.payload), time.monotonic())
        super()._on_message(client, userdata, msg)


def probe_member_death(
    port: int, session_expiry: int, down_s: float = 1.0, messages: int = 30
) -> MemberDeath:
    a = Member(port, "q3-a", session_expiry=session_expiry, hold=True)
    peers = [_Stamped(port, f"q3-{n}", session_expiry=session_expiry) for n in "bc"]
    pub = Publisher(port)
    try:
        pub.send("query", range(messages))
        settle([a, *peers])
        held = a.seqs()
        a.kill()
        killed = time.monotonic()
        time.sleep(0.3)  # the broker has seen the close before the new messages arrive
        new = range(messages, 2 * messages)
        pub.send("query", new)
        time.sleep(max(0.0, killed + down_s - time.monotonic()))
        settle(peers)
        back = Member(port, "q3-a", session_expiry=session_expiry)
        settle([back])
        return _death_result(session_expiry, down_s, held, set(new), peers, back, killed)
    finally:
        a.kill()  # again, in case an error came before the kill; a no-op after it
        pub.close()
        for member in peers:
            member.close()


def _death_result(
    expiry: int,
    down_s: float,
    held: set[int],
    new: set[int],
    peers: Sequence[_Stamped],
    back: Member,
    killed: float,
) -> MemberDeath:
    at_peers = set().union(*(p.seqs() for p in peers))
    timeline = sorted(
        (round(p.arrivals[seq] - killed, 2), seq) for p in peers for seq in held & p.seqs()
    )
    returned = back.deliveries()
    back.close()
    redelivered = [d for d in returned if d.seq in held]
    acked = at_peers | {d.seq for d in returned}
    return MemberDeath(
        session_expiry_s=expiry,
        down_s=down_s,
        held_at_kill=len(held),
        held_to_peers=len(held & at_peers),
        held_to_peers_after_s=timeline[0][0] if timeline else None,
        new_published=len(new),
        new_to_peers=len(new & at_peers),
        session_present=back.session_present,
        held_redelivered=len(redelivered),
        held_redelivered_with_dup=sum(d.dup for d in redelivered),
        new_after_reconnect=sum(d.seq in new for d in returned),
        lost=len((held | new) - acked),
        peer_timeline=timeline,
    )


# -- Q5: held shared messages and the same connection's non-shared traffic ---------------------


@dataclass
class InflightBlocking:
    receive_maximum: int
    held_queries: int
    vitals_sent_qos1: int
    vitals_sent_qos0: int
    qos1_while_held: int
    qos0_while_held: int
    qos1_after_ack: int
    qos0_after_ack: int


def probe_inflight_blocking(
    port: int, receive_maximum: int, held_queries: int, vitals: int = 10
) -> InflightBlocking:
    a = Member(
        port,
        "q5-a",
        receive_maximum=receive_maximum,
        hold=True,
        subscriptions=(SHARED, VITALS),
    )
    pub = Publisher(port)
    try:
        pub.send("query", range(held_queries))
        settle([a])
        pub.send("vitals", range(VITALS_SEQ_QOS1, VITALS_SEQ_QOS1 + vitals), qos=1)
        pub.send("vitals", range(VITALS_SEQ_QOS0, VITALS_SEQ_QOS0 + vitals), qos=0)
        settle([a], quiet_s=1.0)
        before = a.deliveries()
        a.release()
        settle([a])
        after = a.deliveries()[len(before) :]

        def count(batch: list[Delivery], base: int) -> int:
            return sum(base <= d.seq < base + vitals for d in batch if d.topic.endswith("vitals"))

        return InflightBlocking(
            receive_maximum=receive_maximum,
            held_queries=held_queries,
            vitals_sent_qos1=vitals,
            vitals_sent_qos0=vitals,
            qos1_while_held=count(before, VITALS_SEQ_QOS1),
            qos0_while_held=count(before, VITALS_SEQ_QOS0),
            qos1_after_ack=count(after, VITALS_SEQ_QOS1),
            qos0_after_ack=count(after, VITALS_SEQ_QOS0),
        )
    finally:
        pub.close()
        a.close()


# -- the run and its report --------------------------------------------------------------------


def mosquitto_version() -> str:
    out = subprocess.run(
        [find_mosquitto(), "-h"], capture_output=True, text=True, timeout=10, check=False
    )
    return (out.stdout or out.stderr).splitlines()[0].strip()


def on_fresh_broker(experiment: Callable[[int], Any]) -> Any:
    with PrivateBroker() as broker:
        return experiment(broker.port)


def run_q2() -> list[ReceiveMaximum]:
    return [
        on_fresh_broker(functools.partial(probe_receive_maximum, receive_maximum=rm))
        for rm in (1, 2, 4)
    ]


def run_q3() -> list[MemberDeath]:
    return [
        on_fresh_broker(functools.partial(probe_member_death, session_expiry=e, down_s=1.0))
        for e in (3600, 10, 0)
    ]


def run_q4() -> MemberDeath:
    return on_fresh_broker(functools.partial(probe_member_death, session_expiry=5, down_s=7.0))


def run_q5() -> list[InflightBlocking]:
    return [
        on_fresh_broker(
            functools.partial(probe_inflight_blocking, receive_maximum=2, held_queries=held)
        )
        for held in (2, 1)
    ]


EXPERIMENTS: dict[str, Callable[[], Any]] = {
    "q1": functools.partial(on_fresh_broker, probe_round_robin),
    "q2": run_q2,
    "q3": run_q3,
    "q4": run_q4,
    "q5": run_q5,
}


def report_lines(name: str, result: Any) -> list[str]:
    results = result if isinstance(result, list) else [result]
    lines = []
    for r in results:
        numbers = {k: v for k, v in asdict(r).items() if k != "peer_timeline"}
        lines.append(f"  {', '.join(f'{k}={v}' for k, v in numbers.items())}")
        lines.append(f"    -> {VERDICTS[name](r)}")
    return lines


def _verdict_q1(r: RoundRobin) -> str:
    spread = "/".join(str(n) for n in r.per_member.values())
    kind = "strict rotation" if r.strict_rotation else "NOT a strict rotation"
    return f"spread {spread} of {r.messages}, {kind}, {r.duplicates} dup, {r.missing} missing"


def _verdict_q2(r: ReceiveMaximum) -> str:
    if r.broker_skips_full_member:
        return f"full member SKIPPED: B/C took {r.b + r.c}, nothing queued for A"
    return (
        f"A's turns QUEUED for A ({r.queued_for_a} waiting while B/C idle at {r.b}/{r.c}); "
        f"A got {r.a_after_ack} more after acking"
    )


def _verdict_q3(r: MemberDeath) -> str:
    held = (
        f"held {r.held_at_kill}: {r.held_to_peers} re-dispatched to peers"
        + (f" (first after {r.held_to_peers_after_s} s)" if r.held_to_peers else "")
        + f", {r.held_redelivered} redelivered on reconnect ({r.held_redelivered_with_dup} DUP)"
    )
    new = (
        f"new {r.new_published}: {r.new_to_peers} to peers, "
        f"{r.new_after_reconnect} waited for the dead member"
    )
    return f"{held}; {new}; session_present={r.session_present}; lost {r.lost}"


def _verdict_q5(r: InflightBlocking) -> str:
    state = "window FULL" if r.held_queries >= r.receive_maximum else "window not full"
    return (
        f"{state}: while held QoS1 vitals {r.qos1_while_held}/{r.vitals_sent_qos1}, "
        f"QoS0 {r.qos0_while_held}/{r.vitals_sent_qos0}; after ack QoS1 +{r.qos1_after_ack}, "
        f"QoS0 +{r.qos0_after_ack}"
    )


VERDICTS: dict[str, Callable[[Any], str]] = {
    "q1": _verdict_q1,
    "q2": _verdict_q2,
    "q3": _verdict_q3,
    "q4": _verdict_q3,
    "q5": _verdict_q5,
}
TITLES = {
    "q1": "Q1 round robin (3 members, 300 QoS 1 messages)",
    "q2": "Q2 Receive Maximum (A holds, B/C ack; 30 messages; RM 1, 2, 4)",
    "q3": "Q3 member killed holding messages, back after 1 s (expiry 3600, 10, 0 s)",
    "q4": "Q4 member killed, session expiry 5 s, back after 7 s",
    "q5": "Q5 held shared queries vs the same connection's non-shared vitals (RM 2)",
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=sorted(EXPERIMENTS), default=None)
    parser.add_argument("--json", type=Path, default=None, help="write the numbers here")
    args = parser.parse_args(argv)
    version = mosquitto_version()
    results: dict[str, Any] = {"mosquitto": version}
    print(f"# shared subscriptions on {version}")
    for name in args.only or sorted(EXPERIMENTS):
        progress(f"running {name}")
        result = EXPERIMENTS[name]()
        results[name] = [asdict(r) for r in result] if isinstance(result, list) else asdict(result)
        print(f"\n{TITLES[name]}")
        print("\n".join(report_lines(name, result)))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
