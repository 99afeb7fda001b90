"""Prometheus exposition of the daemon's metrics snapshot (`metrics.listen`, off by default).

Nothing here counts: every scrape renders one `Daemon.metrics()` snapshot, the same one the
retained status topic and systemd's STATUS line show, so the three never disagree. Names follow
llama.cpp's server where the quantity is the same (`edged_prompt_tokens_total`,
`edged_tokens_predicted_seconds_total`, `edged_requests_processing`, ...), and Prometheus'
rules elsewhere: base units (seconds, bytes, celsius), `_total` on counters, an enum as one
series per state with the current one at 1. No label ever carries a wearer or query id.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from importlib import metadata

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from edged import __version__
from edged.config.models import split_listen
from edged.domain import GovernorState, NodeState
from edged.service.metrics import LABELS, Metrics

log = logging.getLogger(__name__)

# (name without _total, help, CounterValues field): plain counters.
_COUNTERS = (
    ("edged_prompt_tokens", "Prompt tokens computed (prefix-cache hits excluded)", "prompt_tokens"),
    ("edged_prompt_seconds", "Time spent computing prompt tokens", "prompt_s"),
    ("edged_tokens_predicted", "Tokens generated", "predicted_tokens"),
    ("edged_tokens_predicted_seconds", "Time spent generating tokens", "predicted_s"),
    ("edged_messages_received", "Inbound MQTT messages of any kind", "received"),
    ("edged_vitals_messages", "Valid vitals summaries", "vitals"),
    ("edged_queries_received", "Valid queries, redeliveries included", "queries"),
    ("edged_query_duplicates", "Redeliveries of queries running, queued or answered", "duplicates"),
    ("edged_inference_paused_seconds", "Time the governor rested inference", "paused_s"),
)
# The counters split by a label (metrics.LABELS): name without _total, help.
_LABELLED = {
    "errors": ("edged_errors", "Error replies, by API error code"),
    "alerts": ("edged_alerts", "Vital-sign alerts published, by severity"),
    "advice": ("edged_advice", "Advice replies, by finish_reason"),
}


def families(m: Metrics, build: Mapping[str, str]) -> list[Metric]:
    """The metric families of one snapshot; `build`: edged_build_info's labels."""
    c = m.counters
    out: list[Metric] = []
    for name, text, field in _COUNTERS:
        out.append(CounterMetricFamily(name, text, value=getattr(c, field)))
    for counter, (name, text) in _LABELLED.items():
        label = LABELS[counter]
        family = CounterMetricFamily(name, text, labels=[label])
        for value, count in sorted(c.by_label.get(counter, {}).items()):
            family.add_metric([value], count)
        out.append(family)
    outcomes = CounterMetricFamily(
        "edged_queries", "Accepted queries answered, by outcome", labels=["outcome"]
    )
    outcomes.add_metric(["advice"], c.advice)
    outcomes.add_metric(["error"], c.answered - c.advice)
    out.append(outcomes)
    out.extend(_gauges(m))
    out.append(_enum("edged_node_state", "The node's state (API.md, status)", m.state, NodeState))
    governor = _enum("edged_governor_state", "The governor's state", m.governor, GovernorState)
    out.append(governor)
    info = GaugeMetricFamily("edged_build_info", "edged and its runtime", labels=list(build))
    info.add_metric(list(build.values()), 1)
    out.append(info)
    return out


def _gauges(m: Metrics) -> Iterator[Metric]:
    mb = 2**20
    values: tuple[tuple[str, str, float | None], ...] = (
        ("edged_requests_processing", "Queries being generated now", int(m.running)),
        ("edged_requests_deferred", "Queries waiting behind the running one", m.queue),
        ("edged_decode_tokens_per_second", "Running estimate of decode speed", m.decode_tps),
        ("edged_inference_threads", "Cores inference uses now", m.threads),
        ("edged_temperature_celsius", "Hottest thermal zone the governor reads", m.temp_c),
        (
            "edged_memory_headroom_bytes",
            "Memory available before the memory limit",
            None if m.mem_available_mb is None else m.mem_available_mb * mb,
        ),
        ("edged_answered_store_entries", "Replies kept for redeliveries", m.answered_stored),
        ("edged_model_load_seconds", "Time the model took to load at start", m.model_load_s),
        ("edged_uptime_seconds", "Time since the daemon started", m.uptime_s),
        (
            "edged_group_members",
            "Live members of the share group, this node included",
            m.group_members,
        ),
        ("edged_broker_connected", "1 when the broker accepted the connection", int(m.connected)),
        ("edged_ready", "1 when subscribed: queries published now reach this node", int(m.ready)),
    )
    for name, text, value in values:
        if value is not None:  # unknown (no model, no sensor): no series rather than a fake 0
            yield GaugeMetricFamily(name, text, value=value)


def _enum(name: str, text: str, current: str, states: Iterable[str]) -> Metric:
    family = GaugeMetricFamily(name, text, labels=["state"])
    for state in states:
        family.add_metric([str(state)], 1 if state == current else 0)
    return family


def build_labels(m: Metrics) -> dict[str, str]:
    try:
        runtime = metadata.version("onnxruntime")
    except metadata.PackageNotFoundError:
        runtime = "none"
    return {
        "version": __version__,
        "onnxruntime": runtime,
        "model": m.model or "none",
        "quantization": m.quantization or "none",
    }


class _SnapshotCollector(Collector):
    def __init__(self, snapshot: Callable[[], Metrics]) -> None:
        self._snapshot = snapshot
        self._build: dict[str, str] | None = None  # fixed for the process: the model is too

    def collect(self) -> Iterator[Metric]:
        m = self._snapshot()
        if self._build is None:
            self._build = build_labels(m)
        yield from families(m, self._build)


class MetricsServer:
    """/metrics over HTTP on its own thread (prometheus_client's WSGI server)."""

    def __init__(self, host: str, port: int, snapshot: Callable[[], Metrics]) -> None:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_SnapshotCollector(snapshot))
        self._server, self._thread = start_http_server(port, addr=host, registry=registry)
        self.port = self._server.server_port
        """The bound port (the one asked for, or the system's pick for port 0)."""

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def serve_metrics(listen: str, snapshot: Callable[[], Metrics]) -> MetricsServer | None:
    """The metrics server on `listen` (metrics.listen, validated), or None with an error
    logged when it cannot be bound: the node goes on answering queries and raising alerts
    without its metrics."""
    host, port = split_listen(listen)
    try:
        server = MetricsServer(host, port, snapshot)
    except OSError as exc:
        log.error("metrics.listen = %r: cannot listen there (%s); no /metrics", listen, exc)
        return None
    log.info("metrics on http://%s/metrics", listen)
    return server
