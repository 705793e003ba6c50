"""The Dockerfile's server command and health check, run for real outside Docker.

No Docker daemon (nor base images) can be reached where the tests run, so the image itself is
not built here: these tests check what would break it silently when the CLI changes, and run
the image's command line and its HEALTHCHECK against a real server on loopback.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

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
