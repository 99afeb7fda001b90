"""The two mosquitto behaviours the scale-out design (issue #15) is built on, measured by
tools/share_probe.py against the real broker, so an upgrade that changes them fails here.

docs/scale-out-mosquitto.md has the full measurements; these are its Q2 and Q3 (expiry 3600).
"""

from __future__ import annotations

from _models import load_tool

from edged.service.broker import PrivateBroker

share_probe = load_tool("share_probe")


def test_a_member_with_a_full_receive_window_keeps_its_turns_queued_not_given_to_peers(
    broker: PrivateBroker,
) -> None:
    # Why it matters: a busy node does not shed queries to idle peers; its round-robin share
    # waits in its own session. The design must bound a node's backlog another way.
    r = share_probe.probe_receive_maximum(broker.port, receive_maximum=1, messages=30)

    assert r.a_held == 1, r  # ReceiveMaximum is honoured: one unacked message at a time
    assert (r.b, r.c) == (10, 10), r  # peers get their third, no more, though idle
    assert r.queued_for_a == 9, r
    assert not r.broker_skips_full_member, r
    assert r.a_after_ack == 9, r  # the queued turns go to A once it acks
    assert r.lost == 0, r


def test_a_killed_member_with_a_live_session_gets_its_held_and_new_turns_when_it_returns(
    broker: PrivateBroker,
) -> None:
    # Why it matters: a SIGKILLed node's accepted queries are not re-dispatched to peers, and
    # it keeps receiving a third of the new ones while dead; only its return (same client id,
    # within the session expiry) gets them answered.
    r = share_probe.probe_member_death(broker.port, session_expiry=3600, down_s=1.0, messages=30)

    assert r.held_at_kill == 10, r
    assert r.held_to_peers == 0, r  # no re-dispatch of the dead member's in-flight messages
    assert r.new_to_peers == 20, r  # round robin still picks the dead member's session
    assert r.session_present is True, r
    assert r.held_redelivered == r.held_redelivered_with_dup == 10, r  # redelivered, DUP set
    assert r.new_after_reconnect == 10, r  # its turns while dead waited in its session
    assert r.lost == 0, r
