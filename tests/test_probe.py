"""The Kubernetes exec probe: a service that answers its ping is alive, and ready only
when it says so; no answer is a failure with the reason printed."""

from __future__ import annotations

import subprocess
import sys

import pytest

from k1rl.probe import main, probe
from k1rl.rpc import RPCServer


@pytest.fixture
def server():
    srv = RPCServer("tcp://127.0.0.1:0", "trainer")
    srv.start_in_thread()
    yield srv
    srv.stop()


def test_a_service_that_answers_is_alive_and_ready_once_it_says_so(server, capsys):
    server.set_ready(False, loading="model")
    assert main([server.address]) == 0
    assert main([server.address, "--ready"]) == 1
    assert "trainer" in capsys.readouterr().err and "not ready" in probe(server.address, True)
    server.set_ready(True)
    assert main([server.address, "--ready"]) == 0


def test_no_answer_fails_within_the_timeout_with_the_reason(capsys):
    from k1rl.launch import free_tcp_address

    address = free_tcp_address()
    assert main([address, "--timeout", "0.3"]) == 1
    assert address in capsys.readouterr().err


def test_the_probe_runs_as_the_command_kubernetes_execs(server):
    done = subprocess.run([sys.executable, "-m", "k1rl.probe", server.address, "--ready"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
