"""The configuration schema: one model per section, every field with a default and a description.

This is the single home of every default: callers read the config, they never supply their own
fallback. `extra="forbid"` makes a misspelt key an error instead of a silently ignored setting.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from edged.domain import (
    SEVERITIES,
    WEARER_PATTERN,
    BoardProfile,
    RedFlagName,
    Severity,
    default_node_id,
)

DEFAULT_SYSTEM_PROMPT = (
    "You are a health assistant running on a patient's own wearable hub. You see the wearer's "
    "recent vital signs and an automatic early-warning score. Answer in two to four short, "
    "plain sentences. Do not diagnose, do not name or dose medicines, and do not contradict the "
    "early-warning score. Say clearly when the wearer should contact their care team or "
    "emergency services. If you are unsure, say so and advise asking a clinician."
)

BACKEND_TYPES = ("onnxruntime-cpu",)
"""Inference backends `model.type` can name (edged/engine/backends/, one module each)."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TlsConfig(Section):
    ca_file: Path | None = Field(None, description="CA bundle that signed the broker's certificate")
    cert_file: Path | None = Field(None, description="client certificate (mutual TLS)")
    key_file: Path | None = Field(None, description="client private key (mutual TLS)")
    insecure: bool = Field(False, description="skip the broker host name check (testing only)")

    @model_validator(mode="after")
    def _cert_needs_key(self) -> TlsConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("mqtt.tls: cert_file and key_file must be given together")
        return self


class MqttConfig(Section):
    host: str = Field("127.0.0.1", description="broker host name or address")
    port: int = Field(1883, ge=1, le=65535, description="broker port (8883 is usual for TLS)")
    topic_prefix: str = Field(
        "edged",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_/-]{0,63}$",
        description="first topic level(s) of every topic, see docs/mqtt-api.md",
    )
    client_id: str | None = Field(None, description="MQTT client id; default edged-{node_id}")
    username: str | None = Field(None, description="broker user name")
    password: str | None = Field(None, description="broker password; prefer password_file")
    password_file: Path | None = Field(None, description="file holding the broker password")
    keepalive_s: int = Field(30, ge=5, le=3600, description="MQTT keepalive interval")
    session_expiry_s: int = Field(
        7 * 24 * 3600,
        ge=0,
        description="how long the broker keeps this node's session (and queries sent to it) "
        "while the daemon is down",
    )
    connect_timeout_s: float = Field(10.0, gt=0, description="give up one connect attempt after")
    reconnect_min_s: float = Field(0.5, gt=0, description="first reconnect delay")
    reconnect_max_s: float = Field(30.0, gt=0, description="longest reconnect delay")
    tls: TlsConfig | None = Field(None, description="TLS settings; absent means plain TCP")
    allow_foreign_reply_topics: bool = Field(
        False, description="accept reply topics outside {prefix}/v1/{wearer}/"
    )
    max_outbox: int = Field(1000, ge=10, description="replies held while the broker is unreachable")
    share_group: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9_-]{1,64}$",
        description="scale out: nodes with the same group take queries from one MQTT 5 shared "
        "subscription ($share/<group>/...) and share the wearers' alerts (docs/scale-out.md); "
        "unset: this node serves every query itself",
    )

    @model_validator(mode="after")
    def _one_password(self) -> MqttConfig:
        if self.password is not None and self.password_file is not None:
            raise ValueError("mqtt: give password or password_file, not both")
        if self.reconnect_min_s > self.reconnect_max_s:
            raise ValueError(
                f"mqtt: reconnect_min_s = {self.reconnect_min_s} exceeds "
                f"reconnect_max_s = {self.reconnect_max_s}"
            )
        return self


class ModelConfig(Section):
    # One backend today. A second one (CUDA/TensorRT on a Jetson) adds its value here and, if it
    # has keys of its own, becomes a pydantic discriminated union on `type` (Frigate's detectors).
    type: Literal["onnxruntime-cpu"] = Field(
        "onnxruntime-cpu",
        description="inference backend: onnxruntime-cpu (onnxruntime's CPU execution provider)",
    )
    path: Path = Field(..., description="edged model directory (see `edged model export`)")
    threads: int = Field(0, ge=0, le=64, description="inference threads; 0 = every usable core")
    prefer_cores: list[Annotated[int, Field(ge=0, le=1023)]] = Field(
        default_factory=list,
        description="CPUs inference takes first when it uses fewer than all (a big.LITTLE "
        "board's big cores); empty = fastest first by the kernel's cpu_capacity",
    )
    context_length: int = Field(
        2048, ge=64, le=131072, description="KV cache size in tokens (prompt + answer)"
    )
    spin_threads: bool = Field(
        False,
        description="let inference threads busy-wait between the operations of a step (they "
        "stop when it ends): about 10 % faster decode (3-30 %, Qwen3-1.7B, 2 threads on 2 "
        "cores), alerts while generating a few ms later (p99 7-8 ms against 5); but once the "
        "governor narrows inference to fewer cores than threads, threads sharing a core spin "
        "against each other (Qwen3-0.6B on 1 core: 17 tok/s against 30): keep it off on a "
        "board that throttles",
    )
    verify_hashes: bool = Field(True, description="check the model files' sha256 at start")
    speculation: bool = Field(
        True,
        description="speculative decoding by prompt lookup: draft the next tokens from the "
        "prompt, edged's fixed sentences and recent answers, and check them in one pass (the "
        "same answer up to rounding, in fewer passes; greedy decoding, on graphs exported with "
        "logits_to_keep)",
    )
    prepacked_cache: bool = Field(
        False,
        description="keep the graph with onnxruntime's prepacked weights under "
        "delivery.state_dir/prepacked (written at the first start, about 2.4x the model on "
        "disk) and memory-map it at later starts instead of repacking onto the heap: the "
        "weights become reclaimable file pages, but RSS is not lower (README, Start-up and "
        "memory)",
    )
    enabled: bool = Field(
        True,
        description="false: never run the model; every query is answered from the "
        "deterministic triage alone (finish_reason degraded)",
    )
    system_prompt: str = Field(
        DEFAULT_SYSTEM_PROMPT,
        description="system message of every query; its KV is computed once and cached",
    )
    enable_thinking: bool = Field(False, description="let thinking models reason before answering")
    reasoning_budget: int = Field(
        256, ge=0, description="tokens a thinking model may spend reasoning before it must answer"
    )
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="0 = greedy (reproducible)")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling mass")
    top_k: int = Field(0, ge=0, description="top-k sampling; 0 = off")
    repetition_penalty: float = Field(1.0, gt=0.0, le=3.0, description="1.0 = off")


class LimitsConfig(Section):
    max_message_bytes: int = Field(
        16 * 1024, ge=512, le=1 << 20, description="inbound payload limit, checked before parsing"
    )
    max_tokens_cap: int = Field(512, ge=1, description="largest max_tokens a query may ask for")
    default_max_tokens: int = Field(256, ge=1, description="max_tokens of a query that gives none")
    max_query_chars: int = Field(4000, ge=1, description="longest query text")
    queue_size: int = Field(
        16, ge=1, le=10000, description="queries waiting beyond the running one"
    )
    drain_timeout_s: float = Field(
        10.0, ge=0, description="on stop, how long the running generation may finish"
    )

    @model_validator(mode="after")
    def _default_within_cap(self) -> LimitsConfig:
        if self.default_max_tokens > self.max_tokens_cap:
            raise ValueError(
                f"limits: default_max_tokens = {self.default_max_tokens} exceeds "
                f"max_tokens_cap = {self.max_tokens_cap}"
            )
        return self


class StreamingConfig(Section):
    interval_ms: int = Field(100, ge=0, description="at most one stream chunk per this interval")
    max_tokens: int = Field(8, ge=1, description="...or per this many text pieces, if sooner")


class DeliveryConfig(Section):
    state_dir: Path = Field(
        Path("/var/lib/edged"), description="where the answered-query store lives (SQLite)"
    )
    answered_ttl_s: int = Field(
        24 * 3600,
        ge=60,
        description="how long a final reply is kept to re-send on redelivery, never regenerate",
    )


class StatusConfig(Section):
    interval_s: float = Field(30.0, gt=0, le=3600, description="retained status refresh period")


class GovernorConfig(Section):
    enabled: bool = Field(True, description="watch temperature and memory and back off")
    profile: Literal["auto"] | BoardProfile = Field(
        "auto", description="whose thermal bands to use; auto = detect the board"
    )
    interval_s: float = Field(2.0, gt=0, le=60, description="how often the sensors are read")
    hysteresis_c: float = Field(
        3.0, ge=0, le=20, description="a thermal band is left only this far below its entry"
    )
    dwell_s: float = Field(
        15.0, ge=0, le=3600, description="minimum time in a state before a cooler one"
    )
    sensor_root: Path = Field(
        Path("/"),
        description="where /sys and /proc are read from (tests point it at a fake tree)",
    )
    pause_ms: float = Field(
        0.0,
        ge=0,
        le=10000,
        description="minimum pause between decode steps; when warm or hot the governor rests "
        "longer, in proportion to the step time",
    )
    min_headroom_mb: float = Field(
        256.0, ge=0, description="below this much free memory, queries are answered busy"
    )
    shrink_context_below_mb: float = Field(
        512.0,
        ge=0,
        description="below this much free memory, prompt + answer are capped at shrunk_context",
    )
    shrunk_context: int = Field(
        512, ge=64, description="the context cap (tokens) while memory is tight"
    )
    warm_c: float | None = Field(
        None,
        ge=0,
        le=150,
        description="thermal band entries, all three or none; none = the "
        "profile's built-in bands (a board with a fan or heatsink can run hotter)",
    )
    hot_c: float | None = Field(None, ge=0, le=150, description="see warm_c")
    critical_c: float | None = Field(None, ge=0, le=150, description="see warm_c")

    @model_validator(mode="after")
    def _bands_all_or_none_and_rising(self) -> GovernorConfig:
        bands = (self.warm_c, self.hot_c, self.critical_c)
        given = [b for b in bands if b is not None]
        if given and len(given) != 3:
            raise ValueError(
                "governor: warm_c, hot_c and critical_c must be given together (or none, for "
                "the profile's bands)"
            )
        if given and not given[0] < given[1] < given[2]:
            raise ValueError(
                f"governor: bands must rise: warm_c = {given[0]}, hot_c = {given[1]}, "
                f"critical_c = {given[2]}"
            )
        return self


def _default_flag_severities() -> dict[str, Severity]:
    return {
        RedFlagName.SPO2_LOW: "high",
        RedFlagName.FALL: "high",
        RedFlagName.BRADYCARDIA: "high",
        RedFlagName.RESTING_TACHYCARDIA: "medium",
        RedFlagName.IRREGULAR_RHYTHM: "medium",
        RedFlagName.FEVER: "medium",
        RedFlagName.RESTING_HR_RISING: "low_medium",
    }


def _default_escalation() -> dict[Severity, str]:
    return {
        "low_medium": "One of your readings is outside its usual range: let your care team "
        "know today.",
        "medium": "Your readings suggest you need a prompt review: contact your care team "
        "or out-of-hours service now.",
        "high": "Your readings suggest a serious problem: call your emergency number or "
        "your care team's urgent line now.",
    }


class RedFlagConfig(Section):
    """Wearable red flags beyond NEWS2. A flag raises an alert whatever the NEWS2 score."""

    spo2_low_below: float = Field(
        90.0,
        ge=50,
        le=100,
        # BTS guideline for oxygen use (O'Driscoll et al., Thorax 2017): below 90 % on a
        # scale-1 patient needs urgent assessment.
        description="spo2_low: every SpO2 reading of the window has its minimum below this",
    )
    resting_tachycardia_above: float = Field(
        120.0,
        ge=60,
        le=300,
        description="resting_tachycardia: heart rate above this while activity is rest/sleep",
    )
    bradycardia_below: float = Field(
        40.0,
        ge=20,
        le=100,
        # NEWS2 chart 1 scores a pulse <= 40 with 3 points.
        description="bradycardia: heart rate below this",
    )
    fever_at_or_above: float = Field(
        39.1,
        ge=37,
        le=45,
        # NEWS2 chart 1: 39.1 °C starts the highest temperature band.
        description="fever: temperature at or above this",
    )
    resting_hr_rise_pct: float = Field(
        25.0,
        gt=0,
        le=500,
        description="resting_hr_rising: latest resting heart rate this much above the median "
        "of the wearer's earlier resting readings in the window",
    )
    resting_hr_min_baseline: int = Field(
        3,
        ge=1,
        le=1000,
        description="earlier resting readings needed before the trend rule applies",
    )
    severities: dict[str, Severity] = Field(
        default_factory=_default_flag_severities,
        description="severity of each red flag (low_medium | medium | high)",
    )

    @model_validator(mode="after")
    def _known_flags(self) -> RedFlagConfig:
        known = {flag.value for flag in RedFlagName}
        unknown = sorted(set(self.severities) - known)
        if unknown:
            raise ValueError(
                f"clinical.red_flags.severities: unknown flag(s) {', '.join(unknown)}; "
                f"known: {', '.join(sorted(known))}"
            )
        return self

    def severity(self, flag: str) -> Severity:
        return self.severities.get(flag, "medium")


class ClinicalConfig(Section):
    window_s: float = Field(1800.0, ge=60, le=86400, description="rolling vitals window per wearer")
    max_wearers: int = Field(
        10000, ge=1, le=1_000_000, description="wearers kept; the least recently seen is evicted"
    )
    max_summaries_per_wearer: int = Field(
        360, ge=1, le=100000, description="summaries kept per wearer within the window"
    )
    wearer_ttl_s: float = Field(
        3600.0, ge=60, description="a wearer with no summary for this long is forgotten"
    )
    alert_cooldown_s: float = Field(
        300.0,
        ge=0,
        description="an alert for the same or a lesser condition is repeated at most this often; "
        "a worse one goes out at once",
    )
    vitals_prompt_tokens: int = Field(
        160, ge=16, le=2048, description="token budget of the vitals summary in a prompt"
    )
    red_flags: RedFlagConfig = Field(default_factory=RedFlagConfig)
    escalation: dict[Severity, str] = Field(
        default_factory=_default_escalation,
        description="the deterministic escalation sentence for each severity",
    )
    disclaimer: str = Field(
        "Generated on this device by a small language model and an automatic early-warning "
        "score. It is not a diagnosis. In an emergency call your local emergency number.",
        description="attached to every advice reply",
    )

    @model_validator(mode="after")
    def _every_level_has_a_sentence(self) -> ClinicalConfig:
        missing = [lvl for lvl in SEVERITIES if lvl not in self.escalation]
        if missing:
            raise ValueError(f"clinical.escalation: no sentence for {', '.join(missing)}")
        return self


class ServiceConfig(Section):
    stall_timeout_s: float = Field(
        120.0,
        gt=0,
        le=3600,
        description="the worker counts as wedged when one decode step (or an idle wait) takes "
        "longer than this; systemd's watchdog pings then stop and systemd restarts the daemon",
    )
    ready_timeout_s: float = Field(
        120.0,
        ge=0,
        description="report READY to systemd after this long even without a broker connection "
        "(the daemon keeps reconnecting and alerts wait at the broker); 0 = only once "
        "connected. Below the unit's TimeoutStartSec, so a broker that is down at boot does "
        "not turn into a restart loop",
    )


class MetricsConfig(Section):
    listen: str | None = Field(
        None,
        description='Prometheus /metrics on this "HOST:PORT" (e.g. "127.0.0.1:9464"; IPv6 as '
        '"[::1]:9464"); off when absent. No wearer or query ids are ever labels, but bind it to '
        "loopback or a management network: the counts describe a ward's activity",
    )

    @field_validator("listen")
    @classmethod
    def _host_and_port(cls, value: str | None) -> str | None:
        if value is not None:
            split_listen(value)
        return value


class HomeAssistantConfig(Section):
    enabled: bool = Field(
        False,
        description="publish Home Assistant MQTT discovery configs (retained) for this node and "
        "for every wearer whose vitals it sees. Off by default: wearer ids, alert severities and "
        "alert messages then appear in Home Assistant's database and UI (docs/mqtt-api.md)",
    )
    discovery_prefix: str = Field(
        "homeassistant",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_/-]{0,63}$",
        description="Home Assistant's discovery prefix (its MQTT integration setting)",
    )


def split_listen(value: str) -> tuple[str, int]:
    """("127.0.0.1", 9464) from "127.0.0.1:9464", ("::1", 9464) from "[::1]:9464"."""
    host, sep, port = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(
            f'{value!r} is not "HOST:PORT" with a port from 1 to 65535 (e.g. "127.0.0.1:9464")'
        )
    return host, int(port)


class EdgedConfig(Section):
    node_id: str = Field(
        default_factory=default_node_id,
        pattern=WEARER_PATTERN,
        description="this daemon's id in topics; default: the host name, sanitised",
    )
    mqtt: MqttConfig = Field(default_factory=MqttConfig)
    model: ModelConfig
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    streaming: StreamingConfig = Field(default_factory=StreamingConfig)
    delivery: DeliveryConfig = Field(default_factory=DeliveryConfig)
    status: StatusConfig = Field(default_factory=StatusConfig)
    governor: GovernorConfig = Field(default_factory=GovernorConfig)
    clinical: ClinicalConfig = Field(default_factory=ClinicalConfig)
    service: ServiceConfig = Field(default_factory=ServiceConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    homeassistant: HomeAssistantConfig = Field(default_factory=HomeAssistantConfig)
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="journal/console log level; query text is never logged at info"
    )

    @property
    def client_id(self) -> str:
        return self.mqtt.client_id or f"edged-{self.node_id}"
