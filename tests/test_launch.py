"""The launcher's ports from the environment."""

import pytest

from services.launch import parse_ports


def test_kubernetes_service_links_do_not_break_the_launcher(monkeypatch):
    # Kubernetes sets <SERVICE>_PORT=tcp://ip:port in every pod of a namespace with a Service of
    # that name; the launcher read it as its own setting and stopped with a ValueError.
    monkeypatch.setenv("POLICY_PORT", "tcp://10.0.0.1:3000")
    monkeypatch.setenv("CLASSIFIER_PORT", "8003")
    assert parse_ports([]) == {"policy": 3001, "generator": 3002, "classifier": 8003}


def test_a_port_that_is_not_a_number_is_refused_by_name(monkeypatch):
    monkeypatch.setenv("GENERATOR_PORT", "eighty")
    with pytest.raises(SystemExit, match="GENERATOR_PORT"):
        parse_ports([])
