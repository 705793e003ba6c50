"""imgtriage.serve.process: the child-process launcher recipes, benches and tests share."""

from __future__ import annotations

import socket

import pytest

from imgtriage.errors import ServiceStartError
from imgtriage.serve.process import free_port, start_service


def test_free_port_is_bindable():
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # nothing holds it


def test_exit_before_ready_raises_with_the_log(tmp_path):
    log = tmp_path / "serve.log"
    with pytest.raises(ServiceStartError, match="does not exist") as info:
        start_service(tmp_path / "no-bundle", log=log, timeout=60)
    assert "exited with code 2" in str(info.value)
    assert log.exists()


def test_live_service_is_ready_and_logs_its_model(live_server):
    import httpx

    assert live_server.proc.poll() is None
    assert live_server.port == int(live_server.url.rsplit(":", 1)[1])
    assert httpx.get(live_server.url + "/readyz", timeout=10).status_code == 200
    log = live_server.log.read_text()
    assert "[imgtriage.serve] model ready" in log  # its own log lines
    # what runs is said before the workers start, and again by each worker once loaded
    # the tiny bundle's int8 graph passed its held-out check: it is what runs
    assert log.splitlines()[0].startswith("serve: backend onnx, precision int8, 1 thread")
    assert "backend onnx, precision int8, threads 1" in log
