"""hub.toml and the operator's connection settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from cellwatch.hub.config import HubSettings, OperatorSettings
from cellwatch.shared.errors import ConfigError


def test_hub_toml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CELLWATCH_MQTT__HOST", raising=False)
    path = tmp_path / "hub.toml"
    path.write_text(
        'data_dir = "/var/lib/cellwatch-hub"\nmax_chunk_bytes = 131072\n'
        '[mqtt]\nhost = "broker.lab"\n[rollout]\nwaves = "1,10%,100%"\nmax_failures = "5%"\n'
    )
    s = HubSettings.load(path)
    assert s.mqtt.username == "hub" and s.mqtt.host == "broker.lab"
    assert s.db_path == Path("/var/lib/cellwatch-hub/hub.db")
    assert s.rollout.waves == "1,10%,100%" and s.rollout.advance_at == 1.0
    assert s.client_id == "cellwatch-hub"


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ('[rollout]\nwaves = "1,abc"\n', "rollout.waves"),
        ('[rollout]\nmax_failures = "lots"\n', "rollout.max_failures"),
        ("max_chunk_bytes = 1\n", "max_chunk_bytes"),
        ("tick = 1\n", "tick"),
    ],
)
def test_bad_hub_toml_names_the_field(tmp_path: Path, text: str, where: str) -> None:
    path = tmp_path / "hub.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=where):
        HubSettings.load(path)


def test_operator_options_win_over_the_file(tmp_path: Path) -> None:
    path = tmp_path / "ops.toml"
    path.write_text('timeout_s = 3\n[mqtt]\nhost = "broker.lab"\nport = 8883\n')
    s = OperatorSettings.load(path, mqtt={"port": 1884})
    assert (s.mqtt.host, s.mqtt.port, s.mqtt.username, s.timeout_s) == (
        "broker.lab",
        1884,
        "operator",
        3,
    )
