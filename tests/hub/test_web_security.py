"""The HTTP server's guard: loopback by default, a token off loopback (then on every
request), the Host check, security headers, and clear errors for bad settings."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest

from cellwatch.hub.config import HubSettings
from cellwatch.hub.errors import HubError
from cellwatch.shared.errors import ConfigError
from tests.broker import Broker
from tests.helpers.hubcli import HUB
from tests.hub.conftest import Bundles, HubFactory
from tests.hub.web import get

TOKEN = "0123456789abcdef0123456789abcdef"
PATHS = ("/", "/nodes/node-1", "/api/nodes", "/metrics", "/static/fleet.js", "/nope")


def test_defaults_are_loopback_port_8321() -> None:
    s = HubSettings()
    assert (s.http.enabled, s.http.listen, s.http.host, s.http.port) == (
        True,
        "127.0.0.1:8321",
        "127.0.0.1",
        8321,
    )


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ('[http]\nlisten = "0.0.0.0:8321"\n', "not a loopback address: set token_file"),
        ('[http]\nlisten = "lab-hub:8321"\n', "not a loopback address"),
        ('[http]\nlisten = "8321"\n', "use HOST:PORT"),
        ('[http]\nlisten = "127.0.0.1:99999"\n', "over 65535"),
        ("[http]\nport = 1\n", "http.port"),
    ],
)
def test_bad_http_settings_name_the_field(tmp_path: Path, text: str, fragment: str) -> None:
    path = tmp_path / "hub.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="http") as err:
        HubSettings.load(path)
    assert fragment in str(err.value)


def test_off_loopback_is_allowed_with_a_token_or_when_disabled(tmp_path: Path) -> None:
    HubSettings(http={"listen": "0.0.0.0:8321", "token_file": tmp_path / "t"})
    HubSettings(http={"listen": "[::]:8321", "token_file": tmp_path / "t"})
    HubSettings(http={"listen": "0.0.0.0:8321", "enabled": False})
    assert HubSettings(http={"listen": "[::1]:9000"}).http.host == "::1"


def test_every_request_needs_the_token_off_loopback(
    hub_factory: HubFactory, tmp_path: Path
) -> None:
    token_file = tmp_path / "http.token"
    token_file.write_text(TOKEN + "\n")
    hub = hub_factory(http={"listen": "0.0.0.0:0", "token_file": token_file})
    assert hub.http is not None
    base = f"http://127.0.0.1:{hub.http.port}/"
    for path in PATHS:
        refused = get(base, path)
        assert refused.status == 401, path
        assert refused.headers["www-authenticate"].startswith("Bearer"), path
        assert "data-node" not in refused.text and "cellwatch_" not in refused.text, path
        assert get(base, path, {"Authorization": f"Bearer {TOKEN}x"}).status == 401, path
        assert get(base, path, {"Authorization": f"Basic {TOKEN}"}).status == 401, path
        ok = get(base, path, {"Authorization": f"Bearer {TOKEN}"})
        assert ok.status == (404 if path in ("/nope", "/nodes/node-1") else 200), path
    # off loopback any Host is fine: the token is what protects it
    assert get(base, "/", {"Authorization": f"Bearer {TOKEN}", "Host": "hub.lab"}).status == 200


def test_a_token_on_loopback_is_enforced_too(hub_factory: HubFactory, tmp_path: Path) -> None:
    token_file = tmp_path / "http.token"
    token_file.write_text(TOKEN)
    hub = hub_factory(http={"listen": "127.0.0.1:0", "token_file": token_file})
    assert get(hub, "/metrics").status == 401
    assert get(hub, "/metrics", {"Authorization": f"Bearer {TOKEN}"}).status == 200


def test_a_bad_token_file_stops_the_hub_with_a_clear_error(
    hub_factory: HubFactory, tmp_path: Path
) -> None:
    (tmp_path / "short").write_text("abc")
    with pytest.raises(HubError, match="at least 16 characters"):
        hub_factory(http={"listen": "127.0.0.1:0", "token_file": tmp_path / "short"})
    with pytest.raises(HubError, match="cannot read"):
        hub_factory(http={"listen": "127.0.0.1:0", "token_file": tmp_path / "missing"})


def test_on_loopback_only_loopback_host_names_are_served(hub_factory: HubFactory) -> None:
    hub = hub_factory()
    assert hub.http is not None
    port = hub.http.port
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost", f"[::1]:{port}"):
        assert get(hub, "/", {"Host": host}).status == 200, host
    for host in (f"evil.example:{port}", "attacker.example", f"10.0.0.1:{port}", ""):
        reply = get(hub, "/", {"Host": host})
        assert reply.status == 400, host
        assert "unexpected Host" in reply.text


def test_allowed_hosts_names_a_reverse_proxy(hub_factory: HubFactory) -> None:
    hub = hub_factory(http={"listen": "127.0.0.1:0", "allowed_hosts": ["fleet.lab.example"]})
    assert get(hub, "/", {"Host": "fleet.lab.example"}).status == 200
    assert get(hub, "/", {"Host": "localhost"}).status == 400


def test_security_headers_on_every_answer(hub_factory: HubFactory) -> None:
    hub = hub_factory()
    for path in ("/", "/api/nodes", "/metrics", "/static/fleet.css", "/nope"):
        headers = get(hub, path).headers
        csp = headers["content-security-policy"]
        assert "script-src 'self'" in csp and "default-src 'none'" in csp, path
        assert "frame-ancestors 'none'" in csp, path
        assert headers["x-content-type-options"] == "nosniff", path
        assert headers["cache-control"] == "no-store", path


def test_disabled_means_no_server(hub_factory: HubFactory) -> None:
    hub = hub_factory(http={"enabled": False})
    assert hub.http is None


def test_serve_on_a_port_in_use_is_one_line(
    broker: Broker, bundles: Bundles, tmp_path: Path
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "hub.toml"
        config.write_text(
            f'data_dir = "{tmp_path / "hub"}"\n'
            f'trusted_keys = "{bundles.keys}"\n'
            "[mqtt]\n"
            f"port = {broker.port}\n"
            f'password_file = "{broker.dir / "secrets" / "hub.password"}"\n'
            "[http]\n"
            f'listen = "127.0.0.1:{port}"\n'
        )
        proc = subprocess.run(
            [HUB, "serve", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert proc.returncode == 2, proc
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "in use" in errors[0], proc.stderr
    assert errors[0].startswith(f"error: http: cannot listen on 127.0.0.1:{port}: ")
