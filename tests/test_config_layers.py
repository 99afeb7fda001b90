"""Fleet configuration layers, profiles, board detection, placeholders and origins."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from edged.config.layers import detect_board, resolve
from edged.config.loader import ConfigError
from edged.service.broker import PrivateBroker
from tests._mqtt import DaemonProcess, P, TestClient, daemon_config, reply_to

REPO = Path(__file__).resolve().parent.parent
FLEET = REPO / "config" / "fleet.example.yaml"


def _board(tmp_path: Path, model: str | None = None, tegra: bool = False) -> Path:
    """A fake root in the kernel's format: /proc/device-tree/model is NUL-terminated."""
    root = tmp_path / "root"
    (root / "proc" / "device-tree").mkdir(parents=True)
    (root / "etc").mkdir()
    if model is not None:
        (root / "proc" / "device-tree" / "model").write_bytes(model.encode() + b"\0")
    if tegra:
        (root / "etc" / "nv_tegra_release").write_text("# R36 (release), REVISION: 3.0\n")
    return root


@pytest.mark.parametrize(
    ("model", "tegra", "profile"),
    [
        ("Raspberry Pi 5 Model B Rev 1.0", False, "pi5"),
        ("Raspberry Pi 4 Model B Rev 1.4", False, "pi4"),
        ("NVIDIA Jetson Orin Nano Developer Kit", False, "jetson-orin-nano"),
        (None, True, "jetson-orin-nano"),
        (None, False, "generic"),
        ("Some Other Board", False, "generic"),
    ],
)
def test_board_is_detected_from_the_device_tree(
    tmp_path: Path, model: str | None, tegra: bool, profile: str
) -> None:
    assert detect_board(_board(tmp_path, model, tegra)) == profile


def test_layers_override_in_order_and_remember_origins(tmp_path: Path) -> None:
    node_file = tmp_path / "local.yaml"
    node_file.write_text("limits: {queue_size: 4}\nmodel: {context_length: 512}\n")
    resolved = resolve(
        FLEET,
        node_id="ward3-pi",
        node_file=node_file,
        environ={
            "EDGED_MODEL__CONTEXT_LENGTH": "768",
            "EDGED_MQTT__PORT": "8884",
            "BROKER_PASSWORD": "pw",
        },
        flags=["mqtt.port=9999"],
        board_root=_board(tmp_path, "Raspberry Pi 4 Model B"),
    )
    c, origins = resolved.config, resolved.origins
    assert resolved.profile == "pi5"  # the node's profile beats detection
    assert c.model.threads == 3 and origins["model.threads"] == "profile pi5"
    assert c.mqtt.host == "broker.ward.local" and origins["mqtt.host"] == "fleet"
    assert c.mqtt.password == "pw" and origins["mqtt.password"] == "node"
    assert c.limits.queue_size == 4 and origins["limits.queue_size"].startswith("node-file")
    assert c.model.context_length == 768 and origins["model.context_length"] == "env"
    assert c.mqtt.port == 9999 and origins["mqtt.port"] == "flag"
    assert "limits.drain_timeout_s" not in origins  # a built-in default


def test_profile_is_detected_when_the_node_names_none(tmp_path: Path) -> None:
    # A host name without a nodes: entry is a new board: the defaults and its detected profile.
    resolved = resolve(
        FLEET,
        environ={},
        board_root=_board(tmp_path, "Raspberry Pi 4 Model B Rev 1.4"),
    )
    assert resolved.profile == "pi4"
    assert resolved.config.model.context_length == 1024


def test_env_placeholders_fill_secrets_and_a_missing_one_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "edged.yaml"
    path.write_text("mqtt: {username: edged, password: '${BROKER_PW}'}\nmodel: {path: m}\n")
    assert resolve(path, environ={"BROKER_PW": "s3cret"}).config.mqtt.password == "s3cret"
    with pytest.raises(ConfigError, match="mqtt.password: environment variable BROKER_PW"):
        resolve(path, environ={})


def test_tool_variables_are_not_config_but_a_misspelt_section_is_an_error(
    tmp_path: Path,
) -> None:
    """EDGED_ARM64_CACHE or EDGED_GENAI_VENV in a CI job's environment must not stop the daemon;
    a typo in an EDGED_<SECTION>__<KEY> variable must not pass silently."""
    path = tmp_path / "edged.yaml"
    path.write_text("model: {path: m}\n")
    resolved = resolve(
        path,
        environ={
            "EDGED_ARM64_CACHE": "/var/cache/arm64",
            "EDGED_GENAI_VENV": "/opt/genai",
            "EDGED_NODE_ID": "ward-7",
            "EDGED_LOG_LEVEL": "debug",
            "EDGED_PROFILE": "pi4",
        },
    )
    assert resolved.config.node_id == "ward-7" and resolved.origins["node_id"] == "env"
    assert resolved.config.log_level == "debug" and resolved.profile == "pi4"
    with pytest.raises(ConfigError, match="mqqt: unknown key"):
        resolve(path, environ={"EDGED_MQQT__HOST": "broker"})


def test_unknown_profile_and_unknown_fleet_keys_are_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="profile 'pi9' is not one of"):
        resolve(FLEET, flags=["profile=pi9"], environ={})
    bad = tmp_path / "fleet.yaml"
    bad.write_text("defaults: {model: {path: m}}\nmqtt: {port: 1}\n")
    with pytest.raises(ConfigError, match="unknown top-level key"):
        resolve(bad, environ={})


def test_show_resolved_prints_origins_and_masks_secrets(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "edged",
            "config",
            "show",
            "--resolved",
            str(FLEET),
            "--node-id",
            "clinic-jetson-01",
            "--set",
            "mqtt.password=hunter2",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert out.returncode == 0, out.stderr
    assert "hunter2" not in out.stdout
    assert "mqtt.password = '********'    # flag" in out.stdout
    assert "model.threads = 4    # profile jetson-orin-nano" in out.stdout
    assert "limits.drain_timeout_s = 10.0    # default" in out.stdout


def test_fleet_example_passes_the_schema() -> None:
    for node in ("ward3-pi", "clinic-jetson-01", None):
        resolve(FLEET, node_id=node, environ={"BROKER_PASSWORD": "pw"})


def test_sighup_keeps_the_old_config_when_broken_and_applies_live_keys_when_valid(
    broker: PrivateBroker, tmp_path: Path
) -> None:
    proc = DaemonProcess(daemon_config(broker.port, tmp_path / "state"), tmp_path)
    good = yaml.safe_load(proc.config_path.read_text())
    gateway = TestClient(broker.port, [f"{P}/w1/#", f"{P}/_node/+/error"])
    proc.start()
    try:
        proc.wait_log("topic filters: ready")
        ask = {"text": "Tell me about my heart.", "include_vitals": False, "max_tokens": 100}
        gateway.publish(f"{P}/w1/query", {"id": "before", **ask})
        assert gateway.wait_for(reply_to("before")).json()["finish_reason"] == "length"

        proc.config_path.write_text("mqtt: {port: [unclosed\n")
        proc.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
        node_error = gateway.wait_for(
            lambda r: r.topic.endswith("/error") and "reload failed" in r.json()["message"]
        )
        assert node_error.topic == f"{P}/_node/test-node/error"
        gateway.publish(f"{P}/w1/query", {"id": "still-old", **ask})
        assert gateway.wait_for(reply_to("still-old")).json()["finish_reason"] == "length"

        good["limits"]["max_tokens_cap"] = 64
        good["limits"]["default_max_tokens"] = 16
        good["mqtt"]["keepalive_s"] = 45  # needs a restart: reported, not applied
        proc.config_path.write_text(yaml.safe_dump(good))
        proc.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
        proc.wait_log("reload: mqtt.keepalive_s changed but take(s) effect only after a restart")
        gateway.publish(f"{P}/w1/query", {"id": "after", **ask})
        err = gateway.wait_for(reply_to("after")).json()
        assert err["code"] == "out_of_range" and "1..64" in err["message"]
        assert proc.proc.poll() is None, "the daemon kept running through both reloads"
        assert proc.terminate() == 0
    finally:
        proc.stop()
        gateway.close()


@pytest.mark.parametrize(
    ("how", "origin"),
    [
        ({"node_id": "ward3-pi"}, "flag"),
        ({"flags": ["node_id=ward3-pi"]}, "flag"),
        ({"environ": {"EDGED_NODE_ID": "ward3-pi"}}, "env"),
    ],
)
def test_naming_the_node_any_way_picks_its_entry_and_publishes_under_that_name(
    how: dict[str, Any], origin: str
) -> None:
    environ = {"BROKER_PASSWORD": "pw", **how.get("environ", {})}
    resolved = resolve(FLEET, node_id=how.get("node_id"), flags=how.get("flags"), environ=environ)
    assert resolved.config.node_id == "ward3-pi" and resolved.origins["node_id"] == origin
    assert resolved.profile == "pi5"  # from the ward3-pi entry
    assert resolved.config.mqtt.password == "pw" and resolved.origins["mqtt.password"] == "node"


@pytest.mark.parametrize(
    ("how", "named"),
    [
        ({"node_id": "ward3-pl"}, "the command line"),
        ({"flags": ["node_id=ward3-pl"]}, "the command line"),
        ({"environ": {"EDGED_NODE_ID": "ward3-pl"}}, "EDGED_NODE_ID"),
    ],
)
def test_a_node_id_without_a_fleet_entry_is_an_error(how: dict[str, Any], named: str) -> None:
    with pytest.raises(ConfigError) as exc:
        resolve(
            FLEET,
            node_id=how.get("node_id"),
            flags=how.get("flags"),
            environ=how.get("environ", {}),
        )
    assert str(exc.value).endswith(
        f"node id 'ward3-pl' (from {named}) has no entry in nodes: (clinic-jetson-01, ward3-pi)"
    )


def test_node_id_flag_and_set_must_agree() -> None:
    with pytest.raises(ConfigError, match="--node-id ward3-pi and --set node_id=x disagree"):
        resolve(FLEET, node_id="ward3-pi", flags=["node_id=x"], environ={})


def test_bad_values_from_the_environment_or_flags_name_their_origin(tmp_path: Path) -> None:
    path = tmp_path / "edged.yaml"
    path.write_text("mqtt:\n  port: 1883\nmodel: {path: m}\n")
    with pytest.raises(ConfigError) as exc:
        resolve(path, environ={"EDGED_MQTT__PORT": "eighty"})
    assert str(exc.value).startswith("environment EDGED_MQTT__PORT: mqtt.port = 'eighty'")
    with pytest.raises(ConfigError) as exc:
        resolve(path, environ={}, flags=["mqtt.port=70000"])
    assert str(exc.value).startswith("--set mqtt.port: mqtt.port = 70000")
    with pytest.raises(ConfigError) as exc:  # from the file: still its line
        path.write_text("mqtt:\n  port: eighty\nmodel: {path: m}\n")
        resolve(path, environ={})
    assert str(exc.value).startswith(f"{path}:2: mqtt.port = 'eighty'")


def test_environment_variables_that_look_like_config_but_are_not_read_are_warned_about(
    tmp_path: Path,
) -> None:
    path = tmp_path / "edged.yaml"
    path.write_text("model: {path: m}\n")
    resolved = resolve(
        path,
        environ={
            "EDGED_MQTT_PORT": "8883",  # one underscore: not read
            "EDGED_GENAI_VENV": "/opt/genai",  # a tool's
            "EDGED_LOG_LEVEL": "debug",  # top-level config
            "EDGED_MQTT__HOST": "b",  # config
        },
    )
    assert resolved.config.mqtt.port == 1883
    (warning,) = resolved.warnings
    assert "EDGED_MQTT_PORT is not read" in warning and "EDGED_MQTT__PORT" in warning


def test_duplicate_keys_in_the_yaml_are_an_error(tmp_path: Path) -> None:
    path = tmp_path / "edged.yaml"
    path.write_text("mqtt:\n  port: 1883\nmodel: {path: m}\nmqtt:\n  host: b\n")
    with pytest.raises(
        ConfigError, match=r"edged.yaml:4: not valid YAML: duplicate key 'mqtt' \(first on line 1\)"
    ):
        resolve(path, environ={})
