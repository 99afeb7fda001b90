"""The configuration schema: one model per section, every field with a default and a description.

This is the single home of every default: callers read the config, they never supply their own
fallback. `extra="forbid"` makes a misspelt key an error instead of a silently ignored setting.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from edged.mqtt.topics import WEARER_PATTERN, sanitize_node_id


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
    path: Path = Field(..., description="edged model directory (see `edged model export`)")
    threads: int = Field(0, ge=0, le=64, description="inference threads; 0 = every usable core")
    context_length: int = Field(
        2048, ge=64, le=131072, description="KV cache size in tokens (prompt + answer)"
    )
    spin_threads: bool = Field(
        False,
        description="let idle inference threads busy-wait: a few % faster decode, but on a "
        "small board they steal the CPU the MQTT and vitals path needs",
    )
    verify_hashes: bool = Field(True, description="check the model files' sha256 at start")
    system_prompt: str = Field(
        "You are a careful medical assistant running on a patient's own device. Answer briefly "
        "and plainly. Say when symptoms need a clinician, and never replace emergency care.",
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
    pause_ms: float = Field(
        0.0,
        ge=0,
        le=10000,
        description="pause between decode steps (duty cycle); the governor will adjust it",
    )


class EdgedConfig(Section):
    node_id: str = Field(
        default_factory=lambda: sanitize_node_id(socket.gethostname()),
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
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="journal/console log level; query text is never logged at info"
    )

    @property
    def client_id(self) -> str:
        return self.mqtt.client_id or f"edged-{self.node_id}"
