"""The Dockerfile's server command and health check, run for real outside Docker; and the
image itself, built and run where a Docker daemon is reachable.

Where there is no daemon (this team's machines), the image cannot be built: the first tests
check what would break it silently when the CLI changes and run the image's command line and
its HEALTHCHECK against a real server on loopback; ``test_the_image_builds_serves_and_is_healthy``
skips, saying why. In CI with a daemon it builds the image (pip needs its package index),
runs it with a bundle mounted read-only, waits for ``/readyz``, classifies one image and checks
the answer equals ``Predictor``'s, and waits for Docker's own health check to say healthy.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import tomllib
import urllib.request
import uuid
from pathlib import Path

import pytest

from imgtriage.serve.process import free_port, start_service

ROOT = Path(__file__).resolve().parents[2]


def instructions() -> dict[str, list[str]]:
    """KEYWORD -> the argument text of each of its instructions (continuations joined)."""
    out: dict[str, list[str]] = {}
    pending = ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, rest = (pending + line).partition(" ")
        out.setdefault(keyword.upper(), []).append(rest.strip())
        pending = ""
    return out


def image_argv() -> list[str]:
    ins = instructions()
    return json.loads(ins["ENTRYPOINT"][-1]) + json.loads(ins["CMD"][-1])


def option_value(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def test_the_image_runs_imgtriage_serve_with_options_it_knows():
    argv = image_argv()
    assert argv[:3] == ["imgtriage", "serve", "/bundle"]
    helptext = subprocess.run([sys.executable, "-m", "imgtriage", "serve", "--help"],
                              capture_output=True, text=True, timeout=120,
                              env={"COLUMNS": "200", "PATH": ""}).stdout
    for flag in (a for a in argv if a.startswith("--")):
        assert flag in helptext, f"{flag} is not an option of imgtriage serve"
    assert option_value(argv, "--host") == "0.0.0.0"  # reachable through the published port
    assert instructions()["EXPOSE"] == [option_value(argv, "--port")]


def test_the_image_installs_extras_that_exist_and_a_cpu_torch():
    ins = instructions()
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    (install,) = [r for r in ins["RUN"] if '".[' in r]
    wanted = install.split('".[')[1].split("]")[0].split(",")
    assert "serve" in wanted and set(wanted) <= set(extras)
    assert any("whl/cpu" in a for a in ins["ARG"])
    ignore = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
              if ln.strip() and not ln.startswith("#")]
    assert ignore[0] == "*" and {"!pyproject.toml", "!README.md", "!src/"} <= set(ignore)


def test_the_health_check_passes_on_a_ready_server_and_fails_without_one(profiled_bundle,
                                                                          tmp_path):
    argv = image_argv()
    check = json.loads(instructions()["HEALTHCHECK"][0].split("CMD", 1)[1])
    assert check[0] == "python" and "/readyz" in check[-1]
    port = free_port()
    probe = [sys.executable, *check[1:-1],
             check[-1].replace(f":{option_value(argv, '--port')}/", f":{port}/")]
    assert subprocess.run(probe, capture_output=True, timeout=30).returncode != 0
    rest = [a for i, a in enumerate(argv[3:]) if a not in ("--host", "--port")
            and argv[3:][i - 1] not in ("--host", "--port")]
    with start_service(profiled_bundle, port=port, args=[*rest, "--threads", "1"],
                       log=tmp_path / "serve.log", timeout=90):
        assert subprocess.run(probe, capture_output=True, timeout=30).returncode == 0


def _docker_daemon() -> str | None:
    """None when a Docker daemon answers; else why not (the skip reason)."""
    if shutil.which("docker") is None:
        return "no docker command on PATH"
    try:
        info = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"],
                              capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "docker info did not answer within 20 s"
    if info.returncode != 0:
        return f"no Docker daemon reachable ({info.stderr.strip().splitlines()[-1][:200]})"
    return None


def _docker(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)


def _ready(url: str, deadline: float) -> None:
    while True:
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=4) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{url}/readyz never answered 200")
        time.sleep(1)


def _post_png(url: str, name: str, data: bytes) -> dict:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; "
            f"filename=\"{name}\"\r\nContent-Type: image/png\r\n\r\n").encode() + data + \
        f"\r\n--{boundary}--\r\n".encode()
    req = urllib.request.Request(url + "/v1/classify", data=body, headers={
        "Content-Type": f"multipart/form-data; boundary={boundary}"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


@pytest.mark.slow
def test_the_image_builds_serves_and_is_healthy(profiled_bundle, digit_pngs, tmp_path):
    why = _docker_daemon()
    if why is not None:
        pytest.skip(f"the Docker image is built and run only where a daemon is: {why}")
    from imgtriage.predict import Predictor

    tag = f"imgtriage-test:{uuid.uuid4().hex[:12]}"
    build = _docker("build", "-t", tag, str(ROOT), timeout=3600)
    assert build.returncode == 0, build.stderr[-3000:]
    bundle = Path(shutil.copytree(profiled_bundle, tmp_path / "bundle"))
    for p in (bundle, *bundle.rglob("*")):  # the image runs as uid 10001
        p.chmod(0o755 if p.is_dir() else 0o644)
    port = free_port()
    run = _docker("run", "-d", "--rm", "-p", f"127.0.0.1:{port}:8000", "-v",
                  f"{bundle}:/bundle:ro", tag)
    assert run.returncode == 0, run.stderr
    container = run.stdout.strip()
    try:
        url = f"http://127.0.0.1:{port}"
        _ready(url, time.monotonic() + 300)
        name, data = digit_pngs[0]
        (row,) = _post_png(url, name, data)["results"]
        (want,) = Predictor.load(profiled_bundle).predict_bytes([data], [name])
        assert (row["class"], row["class_id"]) == (want["class"], want["class_id"])
        assert abs(row["score"] - want["score"]) < 1e-4
        deadline = time.monotonic() + 120
        while (state := _docker("inspect", "--format", "{{.State.Health.Status}}",
                                container).stdout.strip()) != "healthy":
            assert state in ("starting", "healthy") and time.monotonic() < deadline, state
            time.sleep(3)
    finally:
        logs = _docker("logs", container).stderr[-2000:]
        _docker("rm", "-f", container)
        _docker("rmi", "-f", tag)
    assert "Traceback" not in logs, logs
