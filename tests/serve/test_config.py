"""ServeConfig validation names the CLI flag; API key files are parsed strictly."""

from __future__ import annotations

import pytest

from imgtriage.errors import ConfigError
from imgtriage.serve import ServeConfig
from imgtriage.serve.auth import ApiKeyAuth
from imgtriage.serve.config import ENV_VAR


@pytest.mark.parametrize("kwargs, flag", [
    ({"port": 0}, "--port"), ({"port": 70000}, "--port"), ({"workers": 0}, "--workers"),
    ({"threads": 0}, "--threads"), ({"backend": "tf"}, "--backend"),
    ({"precision": "fp16"}, "--precision"),
    ({"max_batch_size": 0}, "--max-batch-size"), ({"max_wait_ms": -1}, "--max-wait-ms"),
    ({"max_queue": 4, "max_images": 8}, "--max-queue"),
    ({"max_request_bytes": 0}, "--max-request-bytes"), ({"max_images": 0}, "--max-images"),
    ({"max_pixels": -5}, "--max-pixels"), ({"allowed_formats": ("png", "svg")},
                                            "--allowed-formats"),
    ({"allowed_formats": ()}, "--allowed-formats"),
    ({"request_timeout_s": 0}, "--request-timeout"), ({"body_timeout_s": -1}, "--body-timeout"),
    ({"max_client_inflight": 0}, "--max-client-inflight"),
    ({"cors_origins": ("https://a.org/",)}, "--cors-origin"),
    ({"root_path": "api"}, "--root-path"), ({"log_level": "loud"}, "--log-level"),
])
def test_invalid_settings_name_their_flag(kwargs, flag):
    with pytest.raises(ConfigError, match=flag):
        ServeConfig(bundle="b", **kwargs)


def test_round_trip_through_the_worker_environment(tmp_path):
    cfg = ServeConfig(bundle=tmp_path / "b", workers=2, allowed_formats=["png", "jpeg"],
                      cors_origins=["https://a.org"], api_key_file="k.txt")
    assert cfg.bundle == str(tmp_path / "b") and cfg.allowed_formats == ("png", "jpeg")
    back = ServeConfig.from_env({ENV_VAR: cfg.to_env()})
    assert back == cfg
    with pytest.raises(ConfigError, match="imgtriage serve"):
        ServeConfig.from_env({})
    with pytest.raises(ConfigError, match="unknown serve settings"):
        ServeConfig.from_dict({"bundle": "b", "nope": 1})


def test_compute_threads_share_the_cores_between_workers(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    assert ServeConfig(bundle="b").compute_threads == 8
    assert ServeConfig(bundle="b", workers=4).compute_threads == 2
    assert ServeConfig(bundle="b", workers=16).compute_threads == 1
    assert ServeConfig(bundle="b", workers=4, threads=3).compute_threads == 3


def test_api_key_file_parsing(tmp_path):
    assert not ApiKeyAuth.from_file(None).enabled
    f = tmp_path / "keys"
    f.write_text("# comment\n\n  first-key-0001  \nsecond-key-002\n")
    auth = ApiKeyAuth.from_file(str(f))
    assert auth.enabled
    assert auth.accepts("Bearer first-key-0001") and auth.accepts("bearer second-key-002")
    for bad in (None, "", "Bearer", "Bearer ", "Basic first-key-0001", "Bearer first-key-000",
                "Bearer first-key-00011", "first-key-0001"):
        assert not auth.accepts(bad), bad
    for text, match in (("# only comments\n", "no key"), ("short\n", "at least"),
                        ("has space inside\n", "without spaces")):
        f.write_text(text)
        with pytest.raises(ConfigError, match=match):
            ApiKeyAuth.from_file(str(f))
    with pytest.raises(ConfigError, match="--api-key-file"):
        ApiKeyAuth.from_file(str(tmp_path / "missing"))
