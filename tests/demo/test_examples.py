"""deploy/hub.example.toml and deploy/client.example.toml: each loads and documents
every setting."""

from __future__ import annotations

import tomllib
from pathlib import Path

from cellwatch.hub.config import HubSettings
from tests.configdoc import leaf_paths, toml_paths

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def test_hub_example_config_loads_and_documents_every_setting() -> None:
    example = DEPLOY / "hub.example.toml"
    settings = HubSettings.load(example)
    assert settings.mqtt.username == "hub"
    assert settings.trusted_keys is not None and not settings.allow_unsigned
    documented = toml_paths(tomllib.loads(example.read_text()))
    missing = leaf_paths(HubSettings) - documented
    # secrets and overrides an example should not set (they are shown commented out)
    assert missing <= {
        "mqtt.password",
        "mqtt.client_id",
        "mqtt.tls.cert_file",
        "mqtt.tls.key_file",
        "http.token_file",
    }, missing
    text = example.read_text()
    for name in sorted(missing - {"mqtt.password"}):  # that one: CELLWATCH_MQTT__PASSWORD
        assert f"# {name.rsplit('.', 1)[-1]} = " in text, f"{name} is not even mentioned"


def test_client_example_config_loads_and_documents_every_setting() -> None:
    from cellwatch.client import ClientSettings

    example = DEPLOY / "client.example.toml"
    settings = ClientSettings.load(example)
    assert settings.mqtt.username == "client" and settings.mqtt.tls.enabled
    defaults = ClientSettings()
    for key in ("timeout_s", "retry_after_s", "max_attempts", "concurrency", "log_level"):
        assert getattr(settings, key) == getattr(defaults, key), key  # shows the defaults
    assert settings.mqtt.session_expiry_s == defaults.mqtt.session_expiry_s == 300
    documented = toml_paths(tomllib.loads(example.read_text()))
    missing = leaf_paths(ClientSettings) - documented
    assert missing <= {
        "node",
        "mqtt.password",
        "mqtt.client_id",
        "mqtt.tls.cert_file",
        "mqtt.tls.key_file",
    }, missing
    text = example.read_text()
    for name in sorted(missing - {"mqtt.password"}):
        assert f"# {name.rsplit('.', 1)[-1]} = " in text, f"{name} is not even mentioned"


def test_relay_example_config_loads_and_documents_every_setting() -> None:
    from cellwatch.hub.config import RelaySettings

    example = DEPLOY / "relay.example.toml"
    settings = RelaySettings.load(example)
    assert settings.mqtt.username == settings.relay_id == "relay-lab-a"
    defaults = RelaySettings(relay_id="r")
    for key in ("max_cache_bytes", "max_chunk_bytes", "hold_s", "workers", "fetch"):
        assert getattr(settings, key) == getattr(defaults, key), key  # shows the defaults
    assert settings.mqtt.session_expiry_s == defaults.mqtt.session_expiry_s == 0
    documented = toml_paths(tomllib.loads(example.read_text()))
    missing = leaf_paths(RelaySettings) - documented
    assert missing <= {
        "mqtt.username",
        "mqtt.password",
        "mqtt.client_id",
        "mqtt.tls.cert_file",
        "mqtt.tls.key_file",
    }, missing
