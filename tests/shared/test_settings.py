from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from pydantic import SecretStr

from cellwatch.node.config import NodeSettings
from cellwatch.shared.errors import ConfigError
from cellwatch.shared.settings import MqttSettings
from tests.configdoc import leaf_paths, toml_paths


def test_toml_then_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "node.toml"
    cfg.write_text('node_id = "node-1"\n[mqtt]\nhost = "broker.lab"\nport = 1884\n')
    s = NodeSettings.load(cfg)
    assert (s.node_id, s.mqtt.host, s.mqtt.port, s.mqtt.username) == (
        "node-1",
        "broker.lab",
        1884,
        "node-1",
    )
    monkeypatch.setenv("CELLWATCH_MQTT__PORT", "2883")
    monkeypatch.setenv("CELLWATCH_INFERENCE__PERFORMANCE_HINT", "latency")
    s = NodeSettings.load(cfg)
    assert s.mqtt.port == 2883
    assert s.inference.performance_hint == "latency"


def test_bad_config_names_the_field(tmp_path: Path) -> None:
    cfg = tmp_path / "node.toml"
    cfg.write_text('node_id = "node-1"\n[mqtt]\nport = 70000\n')
    with pytest.raises(ConfigError, match=r"mqtt\.port"):
        NodeSettings.load(cfg)
    cfg.write_text('node_id = "node 1"\n')
    with pytest.raises(ConfigError, match="node_id"):
        NodeSettings.load(cfg)
    cfg.write_text('node_id = "n"\n[mqtt]\nhots = "x"\n')
    with pytest.raises(ConfigError, match=r"mqtt\.hots"):
        NodeSettings.load(cfg)


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        NodeSettings.load(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("node_id = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        NodeSettings.load(bad)


def test_password_file_is_read_lazily(tmp_path: Path) -> None:
    cfg = tmp_path / "node.toml"
    pw = tmp_path / "pw"
    cfg.write_text(f'node_id = "n"\n[mqtt]\npassword_file = "{pw}"\n')
    s = NodeSettings.load(cfg)
    with pytest.raises(ConfigError, match="password_file"):
        s.mqtt.resolved_password()
    pw.write_text("s3cret\n")
    assert s.mqtt.resolved_password() == "s3cret"


def test_node_example_config_documents_every_setting() -> None:
    example = Path(__file__).resolve().parents[2] / "deploy" / "node.example.toml"
    settings = NodeSettings.load(example)
    assert settings.node_id == "node-1"
    documented = toml_paths(tomllib.loads(example.read_text()))
    missing = leaf_paths(NodeSettings) - documented
    # secrets and overrides that an example should not set
    assert missing <= {
        "mqtt.username",
        "mqtt.password",
        "mqtt.client_id",
        "mqtt.tls.cert_file",
        "mqtt.tls.key_file",
        "inference.cache_dir",
        "site",  # only at a site (commented in the example)
    }, missing


def test_a_service_client_id_carries_a_secret_of_its_password(tmp_path: Path) -> None:
    """MqttSettings.session_client_id: another account cannot compute it (it needs the
    password); the same credentials give the same id (the node's duplicate-id
    detection); a configured client_id is used as is."""
    secret = tmp_path / "pw"
    secret.write_text("s3cret\n")
    a = MqttSettings(username="node-1", password_file=secret)
    b = MqttSettings(username="node-1", password=SecretStr("s3cret"))
    cid = a.session_client_id("cellwatch-node-node-1")
    assert cid == b.session_client_id("cellwatch-node-node-1")
    assert (
        cid.startswith("cellwatch-node-node-1-") and len(cid) == len("cellwatch-node-node-1-") + 32
    )
    other = MqttSettings(username="node-1", password=SecretStr("other"))
    assert other.session_client_id("cellwatch-node-node-1") != cid
    assert MqttSettings(username="x").session_client_id("base") == "base"
    fixed = MqttSettings(username="node-1", password=SecretStr("s3cret"), client_id="mine")
    assert fixed.session_client_id("cellwatch-node-node-1") == "mine"
