"""mosquitto.conf and deploy/broker_conf.py: the test broker runs the production file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cellwatch.shared.limits import BROKER_MAX_PACKET_BYTES, MAX_IMAGE_BYTES
from tests.broker import DEPLOY, MOSQUITTO_CONF, render_config

# Options broker_conf.py may change; every other line must come through unchanged.
RELOCATED = {
    "listener",
    "password_file",
    "acl_file",
    "cafile",
    "certfile",
    "keyfile",
    "persistence_location",
    "user",
}


def options(text: str) -> list[tuple[str, str]]:
    """(option, value) of every setting line, in order."""
    result = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            option, _, value = stripped.partition(" ")
            result.append((option, value.strip()))
    return result


def values(text: str, option: str) -> list[str]:
    return [v for o, v in options(text) if o == option]


PRODUCTION = MOSQUITTO_CONF.read_text()


def test_max_packet_size_matches_shared_limits() -> None:
    assert values(PRODUCTION, "max_packet_size") == [str(BROKER_MAX_PACKET_BYTES)]
    assert BROKER_MAX_PACKET_BYTES == MAX_IMAGE_BYTES + 64 * 1024


def test_production_settings() -> None:
    settings = dict(options(PRODUCTION))
    assert settings["per_listener_settings"] == "false"
    assert settings["allow_anonymous"] == "false"
    assert settings["password_file"] == "/etc/mosquitto/cellwatch/passwd"
    assert settings["acl_file"] == "/etc/mosquitto/cellwatch/acl"
    assert settings["persistence"] == "true"
    assert settings["persistence_location"] == "/var/lib/mosquitto/cellwatch/"
    assert settings["max_queued_messages"] == "1000"
    assert values(PRODUCTION, "listener") == ["1883 127.0.0.1", "8883"]
    assert settings["tls_version"] == "tlsv1.2"
    for option in ("cafile", "certfile", "keyfile"):
        assert settings[option].startswith("/etc/mosquitto/cellwatch/certs/")


def test_mosquitto_options_have_no_trailing_comments() -> None:
    # Mosquitto would read "value # comment" as the value.
    assert [(o, v) for o, v in options(PRODUCTION) if "#" in v] == []


def test_render_keeps_every_other_line(tmp_path: Path) -> None:
    rendered = render_config(PRODUCTION, tmp_path, 18830, 18831, user="someone")
    before, after = PRODUCTION.splitlines(), rendered.splitlines()
    assert len(before) == len(after)
    changed = set()
    for old, new in zip(before, after, strict=True):
        if old != new:
            option = old.split(" ", 1)[0]
            assert option in RELOCATED, f"render changed {old!r} to {new!r}"
            assert new.split(" ", 1)[0] == option
            changed.add(option)
    assert changed == RELOCATED


def test_render_moves_ports_and_paths_into_the_directory(tmp_path: Path) -> None:
    rendered = render_config(PRODUCTION, tmp_path, 18830, 18831, bind="127.0.0.2", user="me")
    settings = dict(options(rendered))
    out = tmp_path.resolve()
    assert values(rendered, "listener") == ["18830 127.0.0.2", "18831 127.0.0.2"]
    assert settings["password_file"] == f"{out}/passwd"
    assert settings["acl_file"] == f"{out}/acl"
    assert settings["cafile"] == f"{out}/certs/ca.crt"
    assert settings["certfile"] == f"{out}/certs/server.crt"
    assert settings["keyfile"] == f"{out}/certs/server.key"
    assert settings["persistence_location"] == f"{out}/data/"
    assert settings["user"] == "me"
    assert not any("/etc/" in v or "/var/" in v for _, v in options(rendered))


def test_render_keeps_user_unless_asked(tmp_path: Path) -> None:
    rendered = render_config(PRODUCTION, tmp_path, 18830, 18831)
    assert values(rendered, "user") == ["mosquitto"]


def test_render_moves_a_log_file(tmp_path: Path) -> None:
    src = "log_dest file /var/log/mosquitto/mosquitto.log\nlistener 1883\n"
    rendered = render_config(src, tmp_path, 18830, 18831)
    assert values(rendered, "log_dest") == [f"file {tmp_path.resolve()}/mosquitto.log"]


@pytest.mark.parametrize("line", ["include_dir /etc/mosquitto/conf.d", "plugin /usr/lib/x.so"])
def test_render_refuses_options_it_cannot_relocate(tmp_path: Path, line: str) -> None:
    with pytest.raises(ValueError, match="not supported"):
        render_config(f"listener 1883\n{line}\n", tmp_path, 18830, 18831)


def test_render_refuses_two_plain_listeners(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at most one plain"):
        render_config("listener 1883\nlistener 1884\n", tmp_path, 18830, 18831)


def run_broker_conf(out: Path, port: str, tls_port: str) -> subprocess.CompletedProcess[str]:
    args = ["--src", str(MOSQUITTO_CONF), "--out", str(out), "--port", port, "--tls-port", tls_port]
    return subprocess.run(
        [sys.executable, str(DEPLOY / "broker_conf.py"), *args],
        capture_output=True,
        text=True,
        check=False,
    )


def test_script_writes_the_config(tmp_path: Path) -> None:
    out = tmp_path / "broker"
    proc = run_broker_conf(out, "18830", "18831")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(out / "mosquitto.conf")
    assert (out / "data").is_dir()
    assert (out / "mosquitto.conf").read_text() == render_config(PRODUCTION, out, 18830, 18831)


def test_script_refuses_equal_ports(tmp_path: Path) -> None:
    proc = run_broker_conf(tmp_path, "18830", "18830")
    assert proc.returncode == 2
    assert "must differ" in proc.stderr
    assert not (tmp_path / "mosquitto.conf").exists()
