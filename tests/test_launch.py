"""Starting services: a service that dies on start-up is reported with its own words."""

from __future__ import annotations

import pytest

from k1rl.config import RunConfig
from k1rl.launch import LocalCluster, ServiceStartError, free_tcp_address


def test_a_trainer_that_cannot_load_its_model_fails_fast_with_its_log(tmp_path):
    cfg = RunConfig()
    cfg.model.path = str(tmp_path / "no-such-model")
    cfg.trainer.address = free_tcp_address()
    config = tmp_path / "run.yaml"
    config.write_text(cfg.dump_yaml())
    with LocalCluster(tmp_path / "logs") as cluster:
        cluster.start("trainer", "trainer_svc", ["--config", str(config)], cfg.trainer.address)
        with pytest.raises(ServiceStartError, match="no-such-model has no config.json"):
            cluster.wait_ready(timeout_s=120)


def test_a_bad_config_file_is_reported_by_the_service_naming_the_field(tmp_path):
    address = free_tcp_address()
    config = tmp_path / "run.yaml"
    config.write_text(f"trainer:\n  address: {address}\n  tp: 0\n")
    with LocalCluster(tmp_path / "logs") as cluster:
        cluster.start("trainer", "trainer_svc", ["--config", str(config)], address)
        with pytest.raises(ServiceStartError, match="trainer.tp"):
            cluster.wait_ready(timeout_s=60)


def test_free_addresses_avoid_the_ephemeral_port_range():
    """Outgoing connections draw local ports from the ephemeral range; a service port
    picked from it could be taken before the service binds it."""
    import socket

    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        low = int(f.read().split()[0])
    ports = {int(free_tcp_address().rsplit(":", 1)[1]) for _ in range(20)}
    assert all(10000 <= p < low for p in ports) and len(ports) > 1
    port = ports.pop()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # still free
