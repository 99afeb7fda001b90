"""Several nodes on one broker as one service (mqtt.share_group, issue #15): queries answered
exactly once by the group, each wearer's alerts from exactly one node, and nothing lost when a
node is SIGKILLed and restarted. Real mosquitto, real daemons, loopback only."""

from __future__ import annotations

import json
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from edged.service.broker import PrivateBroker
from edged.service.daemon import Daemon
from edged.service.group import GroupMembership, read_status, rendezvous_owner
from edged.service.outcomes import Publish
from tests._mqtt import DaemonProcess, P, TestClient, daemon_config

GROUP = "ward"
NODES = ("node-a", "node-b", "node-c")
# Enough to raise an alert (NEWS2 >= 5) for any wearer; each summary its own ts so that the
# deterministic alert_id differs per summary.
HIGH_RISK = {"heart_rate": 135, "spo2": 89, "resp_rate": 27, "temp_c": 39.4}


# -- the policy, without a broker ------------------------------------------------------------


def test_rendezvous_moves_only_the_leaving_nodes_wearers() -> None:
    wearers = [f"w{i:03d}" for i in range(300)]
    before = {w: rendezvous_owner(w, NODES) for w in wearers}
    counts = Counter(before.values())
    assert set(counts) == set(NODES) and min(counts.values()) > 60  # spread over all three
    after = {w: rendezvous_owner(w, ("node-a", "node-c")) for w in wearers}
    moved = {w for w in wearers if before[w] != after[w]}
    assert moved == {w for w in wearers if before[w] == "node-b"}
    # The order the members are listed in does not matter: every node computes the same.
    assert all(rendezvous_owner(w, reversed(NODES)) == before[w] for w in wearers)


def _status(state: str, ts: float | None, group: str | None = GROUP) -> bytes:
    return json.dumps({"state": state, "group": group, "ts": ts}).encode()


def test_membership_counts_live_members_of_this_group_only() -> None:
    wall = 1_800_000_000.0
    m = GroupMembership(GROUP, "node-a", status_interval_s=30)
    m.observe("node-b", _status("online", wall - 10), 0.0)
    m.observe("node-c", _status("degraded", wall), 0.0)  # triage-only answers still count
    m.observe("node-d", _status("online", wall, group="other"), 0.0)
    m.observe("node-e", _status("online", wall, group=None), 0.0)
    assert sorted(m.live(0.0)) == ["node-a", "node-b", "node-c"]
    m.observe("node-b", b'{"state":"offline"}', 0.0)  # its Last Will
    # A retained copy 62 s old as this node subscribes: stale (> 2 periods + 1 s).
    m.observe("node-c", _status("online", wall - 62), 0.0, retained_at=wall)
    assert m.live(0.0) == ["node-a"]
    m.observe("node-c", b"", 0.0)  # its retained status deleted
    assert read_status(b"not json") is None and m.live(0.0) == ["node-a"]


def test_a_member_ages_on_the_monotonic_clock_not_on_either_wall_clock() -> None:
    wall = 1_800_000_000.0
    m = GroupMembership(GROUP, "node-a", status_interval_s=30)  # stale after 61 s of silence
    # node-b's clock is 2 h behind this node's (or this node's was set forward): its status
    # as published is fresh all the same, until it has been silent for 61 s.
    m.observe("node-b", _status("online", wall - 7200), 100.0)
    assert m.live(160.0) == ["node-a", "node-b"]
    assert m.live(162.0) == ["node-a"]
    m.observe("node-b", _status("online", wall - 7170), 162.5)  # it speaks again: back
    assert m.live(200.0) == ["node-a", "node-b"]
    # A retained copy is aged by its ts once, as it arrives (50 s old: 11 s left), and one
    # stamped in the future (a sender's clock ahead) counts as new.
    m.observe("node-c", _status("online", wall - 50), 300.0, retained_at=wall)
    m.observe("node-d", _status("online", wall + 3600), 300.0, retained_at=wall)
    assert m.live(310.0) == ["node-a", "node-c", "node-d"]
    assert m.live(312.0) == ["node-a", "node-d"]


def test_a_retained_status_is_no_sign_of_life_for_held_alerts() -> None:
    """After a reconnect this node subscribes again and is sent every retained status, the
    owner's too, which may be from before it died: releasing the alerts held for it then would
    acknowledge their summaries with no alert raised."""
    wall = 1_800_000_000.0
    m = GroupMembership(GROUP, "node-a", status_interval_s=30)
    alert = Publish("edged/v1/w1/alert", b"{}")
    assert m.backup.hold("x", alert, "node-b", now=10.0)
    assert m.observe("node-b", _status("online", wall), 11.0, retained_at=wall) == []
    assert m.observe("node-b", _status("online", wall), 12.0) == [alert]


def test_each_change_of_membership_is_one_log_line(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="edged.service.group")
    m = GroupMembership(GROUP, "node-a", status_interval_s=30)
    for payload in (
        _status("online", 1.0),
        _status("degraded", 2.0),  # still a member: no line
        b'{"state":"offline"}',
        _status("online", 3.0, group="other"),  # another group's: not ours, no line
        _status("online", 4.0),
        b"",  # its retained status deleted
    ):
        m.observe("node-b", payload, 0.0)
    m.observe("node-a", _status("online", 5.0), 0.0)  # this node's own status: no line
    assert [r.getMessage() for r in caplog.records] == [
        f"share group {GROUP}: node-b joined",
        f"share group {GROUP}: node-b left",
        f"share group {GROUP}: node-b joined",
        f"share group {GROUP}: node-b left",
    ]


def test_a_backup_publishes_only_what_a_silent_owner_did_not() -> None:
    from edged.service.group import AlertBackup
    from edged.service.outcomes import Publish

    backup = AlertBackup(grace_s=3.0)
    a, b, c, d = (Publish(f"edged/v1/w{i}/alert", b"{}") for i in range(4))
    assert backup.hold("a", a, "node-b", now=0.0) and backup.hold("b", b, "node-b", now=0.0)
    assert backup.hold("d", d, "node-c", now=0.0)
    assert backup.seen("a", now=1.0) is a  # the owner's copy came: a is not published
    # node-c publishes a status after d was held: alive, and withholding d on purpose (its
    # cooldown for that wearer); d is released, not published.
    assert backup.alive("node-c", now=1.5) == [d]
    assert backup.due(now=2.9) == []
    assert backup.due(now=3.0) == [b]  # node-b showed no sign of life
    assert backup.seen("c", now=4.0) is None  # the owner was faster than this node...
    assert not backup.hold("c", c, "node-b", now=4.1)  # ...so there is nothing to hold
    assert backup.due(now=20.0) == []


# -- real daemons ----------------------------------------------------------------------------


def _group_config(node: str, port: int, state: Path, **sections: Any) -> dict[str, Any]:
    return daemon_config(
        port,
        state,
        node_id=node,
        mqtt={"share_group": GROUP, "keepalive_s": 5},
        status={"interval_s": 1},
        limits={"default_max_tokens": 8},
        **sections,
    )


def _wait_members(daemons: list[Daemon], count: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(d.metrics().group_members == count for d in daemons):
            return
        time.sleep(0.1)
    raise AssertionError([d.metrics().group_members for d in daemons])


Seen = dict[str, list[dict[str, Any]]]


def _collect(gateway: TestClient, expected: set[str], wearers: int) -> tuple[Seen, Seen]:
    """Advice by query id and alerts by wearer, until all came (then a second more: anything
    late would be a duplicate)."""
    answers: Seen = defaultdict(list)
    alerts: Seen = defaultdict(list)
    deadline = time.monotonic() + 60
    done = False
    while time.monotonic() < deadline:
        for r in gateway.drain(1.0 if done else 0.5):
            body = r.json()
            if r.topic.endswith("/advice"):
                answers[body["id"]].append(body)
            elif r.topic.endswith("/alert"):
                alerts[body["wearer"]].append(body)
        if done:
            break
        done = set(answers) == expected and len(alerts) >= wearers
    return answers, alerts


def test_three_nodes_answer_every_query_once_and_alert_each_wearer_from_one_node(
    broker: PrivateBroker, tmp_path: Path
) -> None:
    from edged.config.loader import parse_config

    daemons = []
    gateway = TestClient(broker.port, [f"{P}/+/advice", f"{P}/+/alert", f"{P}/_node/+/status"])
    try:
        for node in NODES:
            config = _group_config(node, broker.port, tmp_path / node)
            daemon = Daemon(parse_config(config))
            daemon.start()
            assert daemon.wait_ready(10)
            daemons.append(daemon)
        _wait_members(daemons, 3)
        statuses = {r.json().get("group") for r in gateway.drain(0.2) if "/_node/" in r.topic}
        assert statuses == {GROUP}
        wearers = [f"w{i:03d}" for i in range(100)]
        for i, wearer in enumerate(wearers):
            gateway.publish(f"{P}/{wearer}/vitals", {"ts": time.time(), **HIGH_RISK})
            if i % 2 == 0:
                gateway.publish(f"{P}/{wearer}/query", {"id": f"q{i}", "text": "Am I ok?"})
        expected = {f"q{i}" for i in range(0, 100, 2)}
        answers, alerts = _collect(gateway, expected, 100)
    finally:
        gateway.close()
        for daemon in daemons:
            daemon.stop()
    assert set(answers) == expected
    assert all(len(copies) == 1 for copies in answers.values()), "a query answered twice"
    by_node = Counter(copies[0]["node"] for copies in answers.values())
    assert set(by_node) == set(NODES), by_node  # the broker spread them over all three
    assert set(alerts) == set(wearers)
    for wearer, raised in alerts.items():
        assert len(raised) == 1, f"{wearer}: {len(raised)} alerts"
        assert raised[0]["node"] == rendezvous_owner(wearer, NODES)


def test_gateway_sim_load_on_three_nodes_is_answered_once_with_each_wearers_alerts_from_one(
    broker: PrivateBroker, tmp_path: Path
) -> None:
    """#15's acceptance run: 3 nodes, 100 wearers, queries and vitals from gateway_sim."""
    from _models import load_tool

    from edged.config.loader import parse_config

    sim = load_tool("gateway_sim")
    daemons = []
    try:
        for node in NODES:
            daemon = Daemon(parse_config(_group_config(node, broker.port, tmp_path / node)))
            daemon.start()
            assert daemon.wait_ready(10)
            daemons.append(daemon)
        _wait_members(daemons, 3)
        result = sim.run_simulation(
            "127.0.0.1",
            broker.port,
            wearers=100,
            vitals_rate=3.0,  # enough summaries for the deteriorating wearers to alert
            query_rate=0.1,
            count=40,
            deteriorating=30,
            max_tokens=8,
            vitals_qos=1,
            seed=15,
        )
    finally:
        for daemon in daemons:
            daemon.stop()
    assert result.ok, (result.missing, result.unexpected, result.duplicates)
    assert result.answered == result.queries_sent == 40 and result.duplicate_replies == 0
    assert set(result.answers_by_node) == set(NODES), result.answers_by_node
    assert result.alerts_by_wearer, "the deteriorating wearers raised no alert"
    for wearer, seen in result.alerts_by_wearer.items():
        assert seen["nodes"] == [rendezvous_owner(wearer, NODES)], (wearer, seen)


def test_a_killed_node_loses_nothing_when_it_restarts(
    broker: PrivateBroker, tmp_path: Path
) -> None:
    """SIGKILL one of two nodes while queries are in flight, restart it as systemd would (same
    node id, so the same sessions): every query is answered, copies are byte-identical, and
    every wearer still gets its alert."""
    procs = {}
    for node in NODES[:2]:
        # Slow enough that the killed node holds queries when it dies.
        config = _group_config(node, broker.port, tmp_path / node, governor={"pause_ms": 60})
        (tmp_path / node).mkdir()
        procs[node] = DaemonProcess(config, tmp_path / node)
        procs[node].start()
    gateway = TestClient(broker.port, [f"{P}/+/advice", f"{P}/+/alert"], persistent=True)
    try:
        for proc in procs.values():
            proc.wait_log("topic filters: ready", count=2)  # both connections
        for node, proc in procs.items():  # each has read the other's status
            (other,) = set(procs) - {node}
            proc.wait_log(f"share group {GROUP}: {other} joined")
        ids = [f"k{i}" for i in range(12)]
        for i, qid in enumerate(ids):
            gateway.publish(f"{P}/w{i % 6}/query", {"id": qid, "text": "Am I ok?"})
        victim = procs["node-b"]
        victim.wait_log("answered", timeout=30)
        victim.kill()
        wearers = [f"v{i:02d}" for i in range(20)]
        for wearer in wearers:  # vitals while node-b is dead: node-a takes its wearers
            gateway.publish(f"{P}/{wearer}/vitals", {"ts": time.time(), **HIGH_RISK})
        time.sleep(1.0)
        victim.start()  # systemd's Restart=
        answers: dict[str, set[bytes]] = defaultdict(set)
        alerts: dict[str, set[str]] = defaultdict(set)
        deadline = time.monotonic() + 90
        while (set(answers) != set(ids) or set(alerts) != set(wearers)) and (
            time.monotonic() < deadline
        ):
            for r in gateway.drain(0.5):
                body = r.json()
                if r.topic.endswith("/advice"):
                    answers[body["id"]].add(r.payload)
                else:
                    alerts[body["wearer"]].add(body["alert_id"])
    finally:
        gateway.close()
        for proc in procs.values():
            proc.stop()
    assert set(answers) == set(ids), f"lost: {set(ids) - set(answers)}"
    assert all(len(copies) == 1 for copies in answers.values()), "copies differ"
    assert set(alerts) == set(wearers), f"alerts lost: {set(wearers) - set(alerts)}"
    # Duplicates (a handover) carry one alert_id: a consumer dropping seen ids sees one alert.
    assert all(len(ids_) == 1 for ids_ in alerts.values())


def test_without_a_group_the_node_takes_queries_on_its_one_connection(
    start_daemon: Callable[..., Daemon], broker: PrivateBroker
) -> None:
    daemon = start_daemon()
    assert daemon.metrics().group_members is None
    gateway = TestClient(broker.port, [f"{P}/w1/advice", f"{P}/_node/+/status"])
    try:
        gateway.publish(f"{P}/w1/query", {"id": "solo", "text": "hi"})
        reply = gateway.wait_for(lambda r: r.topic.endswith("/advice"))
        assert reply.json()["node"] == "test-node"
    finally:
        gateway.close()


@pytest.mark.parametrize("bad", ["", "a/b", "has space", "+", "#"])
def test_a_share_group_name_that_cannot_be_a_topic_level_is_a_config_error(bad: str) -> None:
    from edged.config.loader import ConfigError, parse_config

    with pytest.raises(ConfigError, match="mqtt.share_group"):
        parse_config(daemon_config(1883, Path("/tmp/x"), mqtt={"share_group": bad}))


def test_a_backup_raises_the_alert_when_the_owner_is_frozen(
    broker: PrivateBroker, tmp_path: Path
) -> None:
    """The owner hangs (SIGSTOP: its connection stays open, so no Last Will for 1.5 x
    keepalive): the wearer's backup publishes the alert after its grace period instead of
    losing it; when the owner wakes and raises it too, the copy has the same alert_id."""
    import signal

    from edged.config.loader import parse_config

    (tmp_path / "node-b").mkdir()
    owner = DaemonProcess(
        _group_config("node-b", broker.port, tmp_path / "node-b"), tmp_path / "node-b"
    )
    owner.start()
    backup = Daemon(parse_config(_group_config("node-a", broker.port, tmp_path / "node-a")))
    backup.start()
    gateway = TestClient(broker.port, [f"{P}/+/alert"])
    try:
        owner.wait_log("topic filters: ready", count=2)
        assert backup.wait_ready(10)
        _wait_members([backup], 2)
        wearer = next(
            w for w in (f"w{i}" for i in range(100)) if rendezvous_owner(w, NODES[:2]) == "node-b"
        )
        assert owner.proc is not None
        owner.proc.send_signal(signal.SIGSTOP)
        sent = time.monotonic()
        gateway.publish(f"{P}/{wearer}/vitals", {"ts": time.time(), **HIGH_RISK})
        first = gateway.wait_for(lambda r: r.topic.endswith("/alert"), timeout=15)
        assert first.json()["node"] == "node-a" and time.monotonic() - sent >= 1.5
        owner.proc.send_signal(signal.SIGCONT)
        late = gateway.wait_for(lambda r: r.topic.endswith("/alert"), timeout=20)
        assert late.json()["node"] == "node-b"
        assert late.json()["alert_id"] == first.json()["alert_id"]
    finally:
        gateway.close()
        backup.stop()
        if owner.proc is not None:
            owner.proc.send_signal(signal.SIGCONT)
        owner.stop()


def test_a_backup_does_not_raise_what_a_live_owner_withholds_in_its_cooldown(
    broker: PrivateBroker, tmp_path: Path
) -> None:
    """A node that joins knows no alert history: as a wearer's backup it must not publish an
    alert that the (alive) owner withholds because it alerted that wearer moments ago."""
    from edged.config.loader import parse_config

    def start(node: str) -> Daemon:
        daemon = Daemon(parse_config(_group_config(node, broker.port, tmp_path / node)))
        daemon.start()
        assert daemon.wait_ready(10)
        return daemon

    wearer = next(
        w
        for w in (f"w{i}" for i in range(1000))
        if rendezvous_owner(w, NODES[:2]) == "node-a"
        and rendezvous_owner(w, NODES) == "node-a"
        and rendezvous_owner(w, ("node-b", "node-c")) == "node-c"  # node-c: the backup
    )
    daemons = [start("node-a"), start("node-b")]
    gateway = TestClient(broker.port, [f"{P}/+/alert"])
    try:
        _wait_members(daemons, 2)
        gateway.publish(f"{P}/{wearer}/vitals", {"ts": time.time(), **HIGH_RISK})
        first = gateway.wait_for(lambda r: r.topic.endswith("/alert"))
        assert first.json()["node"] == "node-a"
        daemons.append(start("node-c"))
        _wait_members(daemons, 3)
        gateway.publish(f"{P}/{wearer}/vitals", {"ts": time.time(), **HIGH_RISK})
        # node-a is in its cooldown for this wearer; node-c holds, sees node-a's next status
        # (every second here) and lets it go. Its grace is 1 s + 2 s: wait past it.
        assert [r for r in gateway.drain(5.0) if r.topic.endswith("/alert")] == []
    finally:
        gateway.close()
        for daemon in daemons:
            daemon.stop()
