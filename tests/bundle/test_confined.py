"""Confined bundles: names inside the bundle, bounded numbers, real safetensors, sane zips,
one-line errors, "verified" only when it is, and pinning a bundle by its sha256."""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import shutil
import struct
import zipfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from imgtriage.bundle import load_bundle, save_bundle, update_bundle
from imgtriage.cli.main import app
from imgtriage.errors import (
    BundleError,
    BundleIntegrityError,
    BundleSchemaError,
    ImgTriageError,
)
from imgtriage.predict import Predictor

GB = 2**30


@pytest.fixture()
def bundle_copy(tiny_bundle, tmp_path):
    dest = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, dest)
    return dest


def _edit(bundle: Path, change) -> Path:
    path = bundle / "manifest.json"
    m = json.loads(path.read_text())
    change(m)
    path.write_text(json.dumps(m))
    return bundle


def _inspect(bundle: Path):
    return CliRunner().invoke(app, ["inspect", str(bundle)])


def _refused_in_one_line(bundle: Path, *words: str) -> str:
    """``imgtriage inspect`` fails with an ImgTriageError (``main`` prints it as one
    ``error:`` line, exit status 2) and prints no "verified"."""
    res = _inspect(bundle)
    assert isinstance(res.exception, ImgTriageError), repr(res.exception)
    message = str(res.exception)
    assert "\n" not in message and "verified:" not in res.output
    for word in words:
        assert word in message, message
    return message


@pytest.mark.parametrize("name", ["../../../../etc/hostname", "/etc/hostname", "a/../../x",
                                  "a\\..\\x", "./weights.safetensors", "", "a//b", "x\x00y"])
def test_manifest_file_names_must_stay_inside_the_bundle(bundle_copy, name):
    outside = Path("/etc/hostname")
    digest = hashlib.sha256(outside.read_bytes() if outside.exists() else b"").hexdigest()
    _edit(bundle_copy, lambda m: m["files"].__setitem__(name, digest))
    with pytest.raises(BundleSchemaError, match="plain relative name"):
        load_bundle(bundle_copy)
    _refused_in_one_line(bundle_copy, "plain relative name")


def test_a_symlink_out_of_the_bundle_is_refused(bundle_copy, tmp_path):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"not yours")
    (bundle_copy / "extra.bin").symlink_to(secret)
    digest = hashlib.sha256(b"not yours").hexdigest()
    _edit(bundle_copy, lambda m: m["files"].__setitem__("extra.bin", digest))
    with pytest.raises(BundleSchemaError, match="outside the bundle"):
        load_bundle(bundle_copy)


def test_save_refuses_names_outside_and_writes_nothing(tmp_path, tiny_bundle):
    m = load_bundle(tiny_bundle).manifest
    with pytest.raises(BundleSchemaError):
        save_bundle(tmp_path / "out" / "b", m, None, {"../../escaped.txt": b"x"})
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path / "out" / "b").exists()


def test_a_new_version_never_replaces_something_that_is_not_a_bundle(tmp_path, tiny_bundle):
    precious = tmp_path / "home"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(BundleError, match="not a bundle"):
        update_bundle(tiny_bundle, {}, note="x", out=precious)
    assert (precious / "notes.txt").read_text() == "keep me"
    res = CliRunner().invoke(app, ["export", str(tiny_bundle), "--onnx", "--out",
                                   str(precious)])
    assert res.exit_code != 0 and (precious / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize("path,value", [
    (("preprocess", "size"), [10**9, 10**9]), (("preprocess", "size"), [30000, 30000]),
    (("preprocess", "in_chans"), 0), (("model", "in_chans"), 10**6),
    (("model", "num_classes"), -1), (("classes",), [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]),
    (("classes",), [None] * 10), (("decision", "temperature"), -1.0),
    (("decision", "temperature"), float("nan")), (("decision", "thresholds"), [5.0] * 10),
    (("decision", "positive_class"), 99), (("preprocess", "read", "max_pixels"), 10**15),
    (("preprocess", "mean"), [float("inf")]),
    (("bundle_version",), "../../x"), (("tta",), ["hflip", "os.system"]),
    (("preprocess", "read", "max_decoded_bytes"), 2**50),
])
def test_every_number_of_the_manifest_is_bounded(bundle_copy, path, value):
    def change(m):
        target = m
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    _edit(bundle_copy, change)
    with pytest.raises(BundleSchemaError):
        load_bundle(bundle_copy)
    _refused_in_one_line(bundle_copy, "manifest")


@pytest.mark.parametrize("text", ["[" * 100_000 + "]" * 100_000, '{"schema": ' + "9" * 5000 + "}",
                                  "\ud800", "{" * 50])
def test_absurd_manifest_text_is_a_schema_error(bundle_copy, text):
    (bundle_copy / "manifest.json").write_text(text, errors="surrogatepass")
    with pytest.raises(BundleSchemaError):
        load_bundle(bundle_copy)


def _weights_as(bundle: Path, data: bytes) -> Path:
    (bundle / "weights.safetensors").write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    return _edit(bundle, lambda m: m["files"].__setitem__("weights.safetensors", digest))


def _torch_save_bytes() -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, buf)
    return buf.getvalue()


@pytest.mark.parametrize("kind,data", [
    ("pickle", pickle.dumps({"w": [0.0, 1.0]})),
    ("zip", None),
    ("header", struct.pack("<Q", 2**60) + b"{}" + bytes(16)),
    ("header", struct.pack("<Q", 4) + b"[1] " + bytes(16)),
    ("header", b"\x01\x02"),
])
def test_weights_that_are_not_safetensors_get_one_line_and_never_verified(bundle_copy, kind,
                                                                         data):
    _weights_as(bundle_copy, data if data is not None else _torch_save_bytes())
    with pytest.raises(BundleIntegrityError, match="safetensors"):
        load_bundle(bundle_copy)
    _refused_in_one_line(bundle_copy, "weights.safetensors")
    with pytest.raises(BundleIntegrityError):
        load_bundle(bundle_copy, verify=False).state_dict()


def test_a_zip_bomb_bundle_is_refused_before_extraction(tmp_path, tiny_bundle):
    from hostile_files import peak_rss_delta

    path = tmp_path / "bomb.zip"
    manifest = (Path(tiny_bundle) / "manifest.json").read_bytes()
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        zf.writestr("manifest.json", manifest)
        with zf.open("weights.safetensors", "w", force_zip64=True) as member:
            block = bytes(8 * 2**20)
            for _ in range(96):  # 768 MiB of zeros, ~0.8 MB stored
                member.write(block)
    assert path.stat().st_size < 5 * 2**20
    _, delta = peak_rss_delta(lambda: _refused_in_one_line(path, "zip bomb"))
    assert delta < GB / 4


def test_inspect_says_verified_only_after_every_check(tiny_bundle):
    res = _inspect(tiny_bundle)
    assert res.exit_code == 0
    assert "verified: every file matches its sha256, the weights are safetensors" in res.output
    res = CliRunner().invoke(app, ["inspect", str(tiny_bundle), "--no-verify"])
    assert "verified:" not in res.output and "not verified" in res.output


def test_a_pinned_bundle_refuses_any_other(tiny_bundle, bundle_copy, tmp_path):
    pin = load_bundle(tiny_bundle).sha256
    assert Predictor.load(tiny_bundle, expect_sha256=pin.upper()).bundle_sha256 == pin
    _edit(bundle_copy, lambda m: m["decision"].__setitem__("temperature", 2.0))
    with pytest.raises(BundleIntegrityError, match="--expect-sha256"):
        Predictor.load(bundle_copy, expect_sha256=pin)
    res = CliRunner().invoke(app, ["predict", str(bundle_copy), str(tmp_path), "--output",
                                   str(tmp_path / "r.json"), "--expect-sha256", pin])
    assert isinstance(res.exception, BundleIntegrityError)
    assert "not the pinned bundle" in str(res.exception)
    assert not (tmp_path / "r.json").exists()


def test_verifying_a_large_file_streams_it(bundle_copy):
    from hostile_files import peak_rss_delta

    size = 400 * 2**20
    with (bundle_copy / "extra.bin").open("wb") as fh:
        fh.truncate(size)  # sparse: no disk, no time
    h = hashlib.sha256()
    block = bytes(2**20)
    for _ in range(size // len(block)):
        h.update(block)
    _edit(bundle_copy, lambda m: m["files"].__setitem__("extra.bin", h.hexdigest()))
    bundle, delta = peak_rss_delta(lambda: load_bundle(bundle_copy))
    assert "extra.bin" in bundle.manifest["files"]
    assert delta < 200 * 2**20, f"verifying took {delta / 2**20:.0f} MiB"


def test_the_schema_knows_every_tta_view_predict_runs():
    from imgtriage.bundle.checks import TTA_NAMES
    from imgtriage.predict.predictor import TTA_TRANSFORMS

    assert set(TTA_TRANSFORMS) == TTA_NAMES


def test_a_manifest_asking_for_a_giant_network_is_refused_without_building_it(bundle_copy):
    from hostile_files import peak_rss_delta

    _edit(bundle_copy, lambda m: m["model"].__setitem__(
        "kwargs", {**(m["model"].get("kwargs") or {}), "widths": [4096, 8192, 16384, 32768]}))
    b = load_bundle(bundle_copy)

    def build():
        from imgtriage.predict.backends import build_model

        with pytest.raises(BundleError, match="does not fit the weights"):
            build_model(b)

    _, delta = peak_rss_delta(build)
    assert delta < 2**30 / 4, f"{delta / 2**20:.0f} MiB"
