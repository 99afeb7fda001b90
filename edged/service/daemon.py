"""The daemon: the pipeline's pieces wired together, and its lifecycle. Wiring only.

    broker -> transport -> Dispatcher (handlers: validate, score vitals, route) ->
    Delivery (dedupe, admit, store, acknowledge) -> Scheduler -> Worker (infer, guard) ->
    Delivery -> transport -> broker

Threads and what each owns (docs/architecture.md has the picture):
* `mqtt-network` (MqttTransport): the socket; runs the Dispatcher for every inbound message.
* `edged-delivery` (Delivery): the in-flight registry, the answered store, acknowledgements
  and queued deadlines.
* `edged-worker` (Worker): the inference backend; one generation at a time.
* `edged-ticker` (Ticker): the governor's readings and decisions, the retained status.
* the caller's thread (`edged.service.runner`): signals, reloads, systemd's watchdog.
The config is an immutable snapshot, swapped whole on reload; each job reads it once.
"""

from __future__ import annotations

import logging
import threading
import time

import psutil

from edged import __version__
from edged.clinical.alerts import AlertGate
from edged.clinical.state import VitalsState
from edged.config.models import EdgedConfig
from edged.domain import NodeState
from edged.engine import InferenceBackend
from edged.governor.policy import GovernorDecision
from edged.governor.service import GovernorService
from edged.mqtt.errors import ErrorCode, ProtocolError
from edged.mqtt.payloads import encode
from edged.mqtt.topics import Topics
from edged.mqtt.transport import MqttTransport
from edged.scheduler import Scheduler
from edged.service.delivery import Delivery
from edged.service.dispatcher import Dispatcher
from edged.service.group import GroupMembership, query_link
from edged.service.homeassistant import announcer
from edged.service.metrics import Counters, Metrics, status_bytes, total
from edged.service.model_loading import load_model
from edged.service.outbox import Outbox
from edged.service.outcomes import Publish
from edged.service.prometheus import MetricsServer, serve_metrics
from edged.service.reload import plan_reload
from edged.service.store_place import open_answer_store, read_only_mount
from edged.service.ticker import Ticker, apply_decision
from edged.service.worker import Worker

log = logging.getLogger(__name__)


class Daemon:
    def __init__(self, config: EdgedConfig, backend: InferenceBackend | None = None) -> None:
        """`backend`: an already loaded one (tools that share it); by default the one the
        config names is loaded, or none (a degraded node) when it is disabled or cannot load."""
        self._config = config
        self.topics = Topics(config.mqtt.topic_prefix, config.node_id)
        loading = time.monotonic()
        self.backend = backend or load_model(config)
        self._model_load_s = time.monotonic() - loading if self.backend is not None else None
        if self.backend is not None:
            self.backend.set_system_prompt(config.model.system_prompt)
        clinical = config.clinical
        self._vitals = VitalsState(
            clinical.window_s,
            clinical.max_wearers,
            clinical.max_summaries_per_wearer,
            clinical.wearer_ttl_s,
        )
        self._alerts = AlertGate(clinical.alert_cooldown_s, clinical.max_wearers)
        self._scheduler = Scheduler(config.limits.queue_size)
        # One per counting thread: network (dispatcher), delivery, worker, a group's queries.
        self._counts = (Counters(), Counters(), Counters(), Counters())
        self._state = NodeState.STARTING
        self._started_at = time.monotonic()
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self.metrics_server: MetricsServer | None = None
        """/metrics (metrics.listen), once started; None when off or the port was taken."""
        max_threads = self.backend.info.threads if self.backend else 1
        self.governor = GovernorService(config.governor, max_threads, time.monotonic())
        apply_decision(self.governor.decision, self.backend)
        self.transport = MqttTransport(
            config.mqtt,
            config.client_id,
            self.topics.subscriptions(config.mqtt.share_group),
            will=(self.topics.status(), encode({"state": NodeState.OFFLINE.value})),
            on_message=lambda msg: self._dispatcher.on_message(msg),
            on_ready=self._on_ready,
        )
        # In a share group, queries come on a connection of their own (service/group.py).
        queries = query_link(config, self.topics, lambda msg: self._queries.on_message(msg))
        self._links = [self.transport, *([queries] if queries else [])]
        self._wire()

    def _wire(self) -> None:
        config, decision, c = self._current_config, self._decision, self._config
        self._outbox = Outbox(*self._links)
        self._place = open_answer_store(c.delivery.state_dir, c.node_id, c.delivery.answered_ttl_s)
        network_counts, delivery_counts, worker_counts, query_counts = self._counts
        self._delivery = Delivery(
            self._place.store, self._scheduler, self._outbox, delivery_counts, config, decision
        )
        model = self.backend.info.name if self.backend else None
        self._announcer = announcer(self._config, self.topics, model, self._outbox)
        parts = (self.topics, config, self._vitals, self._alerts, self._outbox, self._delivery)
        group = self._config.mqtt.share_group
        interval = self._config.status.interval_s
        self._members = GroupMembership(group, self.topics.node, interval) if group else None
        self._dispatcher = Dispatcher(*parts, network_counts, self._announcer, self._members)
        self._queries = Dispatcher(*parts, query_counts)
        self._worker = Worker(
            self.backend, self._scheduler, self._delivery, self._outbox, self._vitals, config,
            decision, worker_counts,
        )  # fmt: skip
        self._ticker = Ticker(self.governor, self.backend, config, self._publish_status_if_ready)

    def _current_config(self) -> EdgedConfig:
        return self._config

    def _decision(self) -> GovernorDecision:
        return self.governor.decision

    @property
    def config(self) -> EdgedConfig:
        """The running config: an immutable snapshot, replaced whole by a reload."""
        return self._config

    @property
    def state(self) -> NodeState:
        """`degraded` too while replies cannot be stored durably (store_place, delivery)."""
        if self._state == NodeState.ONLINE and (self._delivery.holding or self._place.problem):
            return NodeState.DEGRADED
        return self._state

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        self._state = NodeState.ONLINE if self.backend else NodeState.DEGRADED
        self._delivery.start()
        self._worker.start()
        self._ticker.start()
        for link in self._links:
            link.start()
        c = self._config
        if c.metrics.listen is not None:
            self.metrics_server = serve_metrics(c.metrics.listen, self.metrics)
        log.info(
            "edged %s node %s serving %s on %s:%d (prefix %s)",
            __version__,
            c.node_id,
            self.backend.info.name if self.backend else "no model (degraded)",
            c.mqtt.host,
            c.mqtt.port,
            c.mqtt.topic_prefix,
        )

    def wait_ready(self, timeout: float) -> bool:
        """Connected to the broker and subscribed: a query published now reaches this node."""
        deadline = time.monotonic() + timeout
        return all(link.wait_ready(max(deadline - time.monotonic(), 0)) for link in self._links)

    def stop(self) -> None:
        """Graceful stop: take no new queries (they stay queued at the broker), let the running
        generation finish within limits.drain_timeout_s or abandon it unacknowledged, publish
        `draining` then `offline`, and disconnect cleanly."""
        if self._stopping.is_set():
            self._stopped.wait(30)
            return
        self._stopping.set()
        self._state = NodeState.DRAINING
        self.publish_status()
        self._delivery.stop_accepting()
        deadline = time.monotonic() + self._config.limits.drain_timeout_s
        while self._scheduler.running is not None and time.monotonic() < deadline:
            time.sleep(0.02)
        if self._scheduler.running is not None:
            log.warning("drain timeout: abandoning the running generation for redelivery")
            self._worker.abort()
        self._scheduler.close()
        self._worker.stop(timeout=30)
        self._delivery.close(timeout=10)
        self._ticker.stop()
        self._outbox.wait_flushed(5.0)
        self._state = NodeState.OFFLINE
        done = threading.Event()
        self.transport.publish(self.topics.status(), self._status(), retain=True, on_acked=done.set)
        done.wait(3.0)
        for link in reversed(self._links):
            link.stop()
        if self.metrics_server is not None:
            self.metrics_server.close()  # before the store it counts closes
        self._place.store.close()
        self._stopped.set()
        log.info("edged stopped")

    def wait(self, timeout: float | None = None) -> bool:
        return self._stopped.wait(timeout)

    def healthy(self) -> tuple[bool, str]:
        """Whether the daemon is doing its job, for the systemd watchdog: the network, delivery
        and worker threads alive, and the worker not stuck inside one decode step (or one idle
        wait) for longer than service.stall_timeout_s. A broker that is down is *not*
        unhealthy: restarting the daemon would not bring it back, and reconnecting is running."""
        if not all(link.alive for link in self._links):
            return False, "MQTT network thread died"
        if not self._delivery.alive:
            return False, "delivery thread died"
        if not self._worker.alive:
            return False, "inference worker died"
        stalled = time.monotonic() - self._worker.heartbeat
        if stalled > self._config.service.stall_timeout_s:
            return False, f"inference worker stalled for {stalled:.0f} s"
        c = self._config  # a card gone read-only never takes the held replies: a restart serves
        if self._delivery.holding and read_only_mount(c.governor.sensor_root, c.delivery.state_dir):
            return False, f"delivery.state_dir {c.delivery.state_dir} went read-only"
        return True, "ok"

    # -- live reload -----------------------------------------------------------------------

    def apply_config(self, new: EdgedConfig) -> tuple[list[str], list[str]]:
        """Apply what can change while running; return (applied keys, keys that need a
        restart). Never waits on the model: a new system prompt is queued for the worker."""
        plan = plan_reload(self._config, new)
        if not plan.live:
            return plan.live, plan.restart
        old, effective = self._config, plan.effective
        clinical = effective.clinical
        self._vitals.configure(
            clinical.window_s,
            clinical.max_wearers,
            clinical.max_summaries_per_wearer,
            clinical.wearer_ttl_s,
        )
        self._alerts.configure(clinical.alert_cooldown_s, clinical.max_wearers)
        self._scheduler.capacity = effective.limits.queue_size
        self.governor.reconfigure(effective.governor)
        logging.getLogger().setLevel(effective.log_level.upper())
        self._config = effective
        if effective.model.system_prompt != old.model.system_prompt:
            self._worker.request_system_prompt(effective.model.system_prompt)
        return plan.live, plan.restart

    # -- status and metrics ----------------------------------------------------------------

    def metrics(self) -> Metrics:
        """One consistent snapshot of what the daemon does and how it is doing."""
        backend, decision, readings = self.backend, self.governor.decision, self.governor.readings
        counters = total(*self._counts)
        headroom = readings.mem_headroom_mb if readings is not None else None
        if headroom is None:
            headroom = psutil.virtual_memory().available / 2**20
        return Metrics(
            state=self.state,
            connected=self.transport.connected,
            ready=self.transport.ready,
            model=backend.info.name if backend else None,
            quantization=backend.info.quantization if backend else None,
            threads=backend.parallelism if backend else None,
            governor=decision.state,
            temp_c=readings.temp_c if readings is not None else None,
            mem_available_mb=headroom,
            queue=len(self._scheduler),
            running=self._scheduler.running is not None,
            decode_tps=self._scheduler.decode_tps if counters.answered else None,
            uptime_s=time.monotonic() - self._started_at,
            answered_stored=len(self._place.store),
            model_load_s=self._model_load_s,
            group_members=len(self._members.live(time.monotonic())) if self._members else None,
            counters=counters,
        )

    def publish_status(self) -> None:
        self._outbox.send(Publish(self.topics.status(), self._status(), retain=True))

    def _status(self) -> bytes:
        return status_bytes(self.metrics(), self._config.mqtt.share_group)

    def _on_ready(self) -> None:
        """Connected and subscribed, first or again: the retained messages, afresh."""
        self.publish_status()
        if self._place.problem is not None:
            self.publish_node_error(self._place.problem)
        if self._announcer is not None:
            self._announcer.announce()

    def _publish_status_if_ready(self) -> None:
        if self.transport.ready:
            self.publish_status()

    def publish_node_error(self, message: str) -> None:
        error = ProtocolError(ErrorCode.INTERNAL, message)
        self._outbox.send(Publish(self.topics.node_error(), encode(error.payload())))
