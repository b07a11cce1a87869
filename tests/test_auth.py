"""Who may call a service: loopback detection, bearer tokens, the run's CURVE keys."""

from __future__ import annotations

import stat

import pytest
from typer.testing import CliRunner

from k1rl.auth import bearer_ok, endpoint_is_local, is_loopback, read_secret
from k1rl.cli import app


@pytest.mark.parametrize("host, local", [
    ("127.0.0.1", True), ("127.8.9.1", True), ("::1", True), ("localhost", True),
    ("0.0.0.0", False), ("*", False), ("10.0.0.5", False), ("k1rl-reward", False)])
def test_only_loopback_hosts_count_as_this_machine(host, local):
    assert is_loopback(host) is local


def test_endpoints_of_this_machine_only():
    assert endpoint_is_local("tcp://127.0.0.1:5701")
    assert endpoint_is_local("ipc:///tmp/k1rl.sock") and endpoint_is_local("inproc://x")
    assert not endpoint_is_local("tcp://*:5701")
    assert not endpoint_is_local("tcp://k1rl-rl-0.k1rl-rl:5701")


def test_a_bearer_header_must_carry_exactly_the_token():
    assert bearer_ok("Bearer s3cret", "s3cret") and bearer_ok("bearer s3cret", "s3cret")
    for header in (None, "", "Bearer", "Bearer s3cre", "Bearer s3cret2", "Basic s3cret"):
        assert not bearer_ok(header, "s3cret")


def test_a_secret_file_must_exist_and_hold_something(tmp_path):
    (tmp_path / "token").write_text("  abc \n")
    assert read_secret(tmp_path / "token", "x.token_file") == "abc"
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="x.token_file: .*empty is empty"):
        read_secret(tmp_path / "empty", "x.token_file")
    with pytest.raises(ValueError, match="x.token_file: cannot read"):
        read_secret(tmp_path / "missing", "x.token_file")


def test_keys_create_writes_a_keypair_whose_secret_only_its_owner_reads(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["keys", "create", str(tmp_path / "keys")])
    assert result.exit_code == 0, result.output
    assert "K1RL_CURVE_KEYS=" in result.output
    secret = tmp_path / "keys" / "run.key_secret"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert (tmp_path / "keys" / "run.key").is_file()
    again = runner.invoke(app, ["keys", "create", str(tmp_path / "keys")], env={"COLUMNS": "400"})
    assert again.exit_code != 0 and "holds a run keypair already" in again.output
