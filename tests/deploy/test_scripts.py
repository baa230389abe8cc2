"""deploy/mkusers.sh, mkacl.sh and mkcerts.sh: arguments, idempotence, files made."""

from __future__ import annotations

import stat
import subprocess
from pathlib import Path

import pytest

from tests.broker import run_script

SCRIPTS = ("mkusers.sh", "mkacl.sh", "mkcerts.sh")
ROLES = ("hub", "operator", "client")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def snapshot(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*") if p.is_file()
    }


def openssl(*args: str) -> str:
    proc = subprocess.run(["openssl", *args], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script: str) -> None:
    proc = run_script(script, "--help")
    assert proc.stdout.startswith(f"Usage: deploy/{script}")


@pytest.mark.parametrize("script", SCRIPTS)
def test_missing_directory_argument(script: str) -> None:
    proc = run_script(script, check=False)
    assert proc.returncode == 2
    assert "Usage:" in proc.stderr


# --- mkusers.sh ------------------------------------------------------------------


def test_mkusers_creates_users_and_secrets(tmp_path: Path) -> None:
    run_script("mkusers.sh", str(tmp_path), "node-1", "node_2")
    users = [line.split(":", 1)[0] for line in (tmp_path / "passwd").read_text().splitlines()]
    assert users == [*ROLES, "node-1", "node_2"]
    assert mode(tmp_path / "passwd") == 0o640
    assert mode(tmp_path / "secrets") == 0o700
    secrets = {p.stem: p for p in (tmp_path / "secrets").glob("*.password")}
    assert sorted(secrets) == sorted(users)
    for path in secrets.values():
        assert mode(path) == 0o600
        assert len(path.read_text()) >= 24
    assert len({p.read_text() for p in secrets.values()}) == len(secrets)
    # Hashes, not the passwords themselves.
    assert secrets["hub"].read_text() not in (tmp_path / "passwd").read_text()


@pytest.mark.parametrize(
    "node_id", ["bad id", "node/1", "node+", "node#", "n" * 65, "", "nöde", "hub", "client"]
)
def test_mkusers_refuses_an_invalid_node_id(tmp_path: Path, node_id: str) -> None:
    proc = run_script("mkusers.sh", str(tmp_path), "node-1", node_id, check=False)
    assert proc.returncode != 0
    assert "invalid node id" in proc.stderr
    assert f"'{node_id}'" in proc.stderr
    assert not (tmp_path / "passwd").exists(), "wrote users before checking all ids"


def test_mkusers_accepts_the_longest_node_id(tmp_path: Path) -> None:
    run_script("mkusers.sh", str(tmp_path), "n" * 64)
    assert (tmp_path / "secrets" / f"{'n' * 64}.password").is_file()


def test_mkusers_rerun_keeps_passwords_and_adds_users(tmp_path: Path) -> None:
    run_script("mkusers.sh", str(tmp_path), "node-1")
    before = snapshot(tmp_path)
    proc = run_script("mkusers.sh", str(tmp_path), "node-1")
    assert "already has every user" in proc.stdout
    assert snapshot(tmp_path) == before

    run_script("mkusers.sh", str(tmp_path), "node-2", "node-1", "node-2")
    after = snapshot(tmp_path)
    old_lines = before["passwd"].decode().splitlines()
    new_lines = after["passwd"].decode().splitlines()
    assert new_lines[: len(old_lines)] == old_lines  # existing hashes untouched
    assert [line.split(":", 1)[0] for line in new_lines[len(old_lines) :]] == ["node-2"]
    for name, content in before.items():
        if name.startswith("secrets/"):
            assert after[name] == content, f"{name} changed"


def test_mkusers_reuses_a_kept_secret(tmp_path: Path) -> None:
    # A lost passwd is rebuilt with the passwords the secrets files still hold.
    run_script("mkusers.sh", str(tmp_path), "node-1")
    secret = (tmp_path / "secrets" / "node-1.password").read_text()
    (tmp_path / "passwd").unlink()
    run_script("mkusers.sh", str(tmp_path), "node-1")
    assert (tmp_path / "secrets" / "node-1.password").read_text() == secret
    assert "node-1:" in (tmp_path / "passwd").read_text()


# --- mkacl.sh --------------------------------------------------------------------


def acl_users(acl: Path) -> list[str]:
    return [line.split()[1] for line in acl.read_text().splitlines() if line.startswith("user ")]


def test_mkacl_writes_one_block_per_node(tmp_path: Path) -> None:
    run_script("mkacl.sh", str(tmp_path), "node-2", "node-1")
    acl = (tmp_path / "acl").read_text()
    assert acl_users(tmp_path / "acl") == [*ROLES, "node-1", "node-2"]
    assert "pattern read cellwatch/replies/%u/#" in acl
    assert "topic readwrite cellwatch/nodes/node-1/status" in acl
    # Node rules name the node: no pattern that would also apply to the other roles.
    assert [line for line in acl.splitlines() if line.startswith("pattern")] == [
        "pattern read cellwatch/replies/%u/#"
    ]
    assert mode(tmp_path / "acl") == 0o640


def test_mkacl_rerun_keeps_known_nodes(tmp_path: Path) -> None:
    run_script("mkacl.sh", str(tmp_path), "node-1", "node-2")
    first = (tmp_path / "acl").read_text()
    run_script("mkacl.sh", str(tmp_path), "node-2")
    assert (tmp_path / "acl").read_text() == first
    run_script("mkacl.sh", str(tmp_path), "node-3")
    assert acl_users(tmp_path / "acl") == [*ROLES, "node-1", "node-2", "node-3"]
    run_script("mkacl.sh", "--replace", str(tmp_path), "node-3")
    assert acl_users(tmp_path / "acl") == [*ROLES, "node-3"]


def test_mkacl_prefix(tmp_path: Path) -> None:
    run_script("mkacl.sh", "--prefix", "lab/cw", str(tmp_path), "node-1")
    rules = [
        line
        for line in (tmp_path / "acl").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert "topic read lab/cw/images/+/+" in rules
    assert "topic write lab/cw/images/client/+" in rules
    assert all(line.split()[-1].startswith("lab/cw/") for line in rules if "/" in line)


@pytest.mark.parametrize("node_id", ["bad id", "node/1", "n" * 65, "operator"])
def test_mkacl_refuses_an_invalid_node_id(tmp_path: Path, node_id: str) -> None:
    proc = run_script("mkacl.sh", str(tmp_path), node_id, check=False)
    assert proc.returncode != 0
    assert "invalid node id" in proc.stderr
    assert not (tmp_path / "acl").exists()


# --- mkcerts.sh ------------------------------------------------------------------


def test_mkcerts_makes_a_ca_and_certificates(tmp_path: Path) -> None:
    run_script("mkcerts.sh", str(tmp_path), "broker.example", "10.1.2.3")
    certs = tmp_path / "certs"
    ca = str(certs / "ca.crt")
    openssl("verify", "-CAfile", ca, "-purpose", "sslserver", str(certs / "server.crt"))
    openssl("verify", "-CAfile", ca, "-purpose", "sslclient", str(certs / "client.crt"))
    san = openssl("x509", "-in", str(certs / "server.crt"), "-noout", "-ext", "subjectAltName")
    for name in (
        "DNS:localhost",
        "IP Address:127.0.0.1",
        "DNS:broker.example",
        "IP Address:10.1.2.3",
    ):
        assert name in san
    for key in ("ca.key", "client.key"):
        assert mode(certs / key) == 0o600
    assert mode(certs / "server.key") == 0o640


def test_mkcerts_rerun_keeps_the_ca(tmp_path: Path) -> None:
    run_script("mkcerts.sh", str(tmp_path), "broker.example")
    before = snapshot(tmp_path)
    run_script("mkcerts.sh", str(tmp_path), "broker.example")
    assert snapshot(tmp_path) == before

    # Another host name: a new server certificate from the same CA.
    run_script("mkcerts.sh", str(tmp_path), "broker.example", "mqtt.example")
    after = snapshot(tmp_path)
    for name in ("certs/ca.crt", "certs/ca.key", "certs/client.crt", "certs/client.key"):
        assert after[name] == before[name], f"{name} changed"
    assert after["certs/server.crt"] != before["certs/server.crt"]
    certs = tmp_path / "certs"
    openssl("verify", "-CAfile", str(certs / "ca.crt"), str(certs / "server.crt"))


def test_mkcerts_refuses_a_bad_host_name(tmp_path: Path) -> None:
    proc = run_script("mkcerts.sh", str(tmp_path), "bad host", check=False)
    assert proc.returncode != 0
    assert "invalid host name" in proc.stderr
