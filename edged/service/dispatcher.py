"""The network thread's one entry point: an inbound message in, its outcomes carried out.

The handlers decide (pure, `edged.service.handlers`); the Dispatcher does: publishes and
acknowledgements go to the transport, accepted queries and cancels to the delivery owner,
counts to the counters. It never waits for inference or for the disk.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from edged.clinical.alerts import AlertGate
from edged.clinical.state import VitalsState
from edged.config.models import EdgedConfig
from edged.mqtt.topics import Topics
from edged.mqtt.transport import InboundMessage
from edged.service.delivery import Delivery
from edged.service.group import AlertBackup, GroupMembership
from edged.service.handlers import InboundContext, handle
from edged.service.homeassistant import DiscoveryAnnouncer
from edged.service.metrics import Counters
from edged.service.outbox import Outbox
from edged.service.outcomes import (
    Accept,
    Ack,
    AlertSeen,
    CancelQuery,
    Count,
    HoldAlert,
    Outcome,
    Publish,
    WearerSeen,
)


class Dispatcher:
    def __init__(
        self,
        topics: Topics,
        config: Callable[[], EdgedConfig],
        vitals: VitalsState,
        alerts: AlertGate,
        outbox: Outbox,
        delivery: Delivery,
        counters: Counters,
        announcer: DiscoveryAnnouncer | None = None,
        membership: GroupMembership | None = None,
    ) -> None:
        self._topics = topics
        self._config = config
        self._vitals = vitals
        self._alerts = alerts
        self._membership = membership
        self._context = InboundContext(topics, config(), vitals, alerts, membership)
        self._outbox = outbox
        self._delivery = delivery
        self._counters = counters
        self._announcer = announcer

    def on_message(self, msg: InboundMessage) -> None:
        self._counters.add("received")
        ctx = self._context
        config = self._config()
        if ctx.config is not config:  # a reload swapped the snapshot
            ctx = self._context = InboundContext(
                self._topics, config, self._vitals, self._alerts, self._membership
            )
        now = time.monotonic()
        for outcome in handle(msg, ctx, time.time(), now):
            self.carry_out(outcome)
        if self._membership is not None:
            # Every message is a tick here (the node's own status comes back every
            # status.interval_s): held alerts whose owner stayed silent go out.
            for alert in self._membership.backup.due(now):
                self._outbox.send(alert)
                self._counters.add("alerts")

    def carry_out(self, outcome: Outcome) -> None:
        # Most frequent first: every vitals summary is a Count and an Ack.
        if isinstance(outcome, Count):
            self._counters.add(outcome.counter, outcome.amount, outcome.label)
        elif isinstance(outcome, Ack):
            self._outbox.ack(outcome.token)
        elif isinstance(outcome, Publish):
            self._outbox.send(outcome)
        elif isinstance(outcome, (Accept, CancelQuery)):
            self._delivery.submit(outcome)
        elif isinstance(outcome, WearerSeen) and self._announcer is not None:
            self._announcer.wearer_seen(outcome.wearer)
        elif isinstance(outcome, (HoldAlert, AlertSeen)) and self._membership is not None:
            self._carry_out_backup(self._membership.backup, outcome)

    def _carry_out_backup(self, backup: AlertBackup, outcome: HoldAlert | AlertSeen) -> None:
        if isinstance(outcome, HoldAlert):
            if not backup.hold(outcome.alert_id, outcome.alert, outcome.owner, time.monotonic()):
                self._outbox.ack_all(outcome.alert.ack_after)  # the owner was first
            return
        held = backup.seen(outcome.alert_id, time.monotonic())
        if held is not None:  # the owner has it at the broker: the summary is safe
            self._outbox.ack_all(held.ack_after)
