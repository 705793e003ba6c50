"""Save, load and verify bundles: a directory (or the same content zipped) with a manifest.

No pickle anywhere: weights are safetensors, everything else is JSON, so loading a bundle
cannot run code.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Any, BinaryIO

from imgtriage.bundle.checks import (
    MAX_MANIFEST_BYTES,
    MAX_ZIP_BYTES,
    check_file_name,
    check_safetensors,
    check_safetensors_file,
    check_zip,
    inside,
    parse_manifest,
)
from imgtriage.bundle.manifest import MANIFEST_NAME, WEIGHTS_NAME, validate_manifest
from imgtriage.bundle.record import Manifest
from imgtriage.errors import (
    BundleError,
    BundleIntegrityError,
    BundleMissingFileError,
    BundleSchemaError,
)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Bundle:
    """A loaded, verified bundle: its manifest and a way to read its files.

    ``manifest`` is the dict on disk (its hash is the bundle's identity); ``info`` is the same
    manifest typed (:class:`~imgtriage.bundle.record.Manifest`), which readers use.
    """

    path: Path
    manifest: dict[str, Any]
    _zip: bytes | None = None

    @cached_property
    def info(self) -> Manifest:
        """The typed manifest (v1 defaults filled in), read once."""
        return Manifest.from_dict(self.manifest, str(self.path))

    @property
    def sha256(self) -> str:
        """Identity of the bundle: hash of its manifest (which holds every file's hash)."""
        return sha256_bytes(json.dumps(self.manifest, sort_keys=True).encode())

    @property
    def classes(self) -> list[str]:
        return list(self.info.classes)

    def read_bytes(self, name: str) -> bytes:
        """A file of the bundle; only plain relative names inside it are ever read."""
        if self._zip is not None:
            check_file_name(name, str(self.path))
            with zipfile.ZipFile(io.BytesIO(self._zip)) as zf:
                try:
                    return zf.read(name)
                except KeyError as exc:
                    raise BundleMissingFileError(f"{self.path}: missing {name}") from exc
        f = inside(self.path, name, str(self.path))
        if not f.is_file():
            raise BundleMissingFileError(f"{self.path}: the manifest lists {name} but the file "
                                         "is missing; copy the whole bundle directory")
        return f.read_bytes()

    def has_file(self, name: str) -> bool:
        return name in self.manifest.get("files", {})

    @contextmanager
    def open_file(self, name: str) -> Iterator[tuple[BinaryIO, int]]:
        """``(binary file, size)`` of one of the bundle's files, streamed, never loaded whole."""
        if self._zip is not None:
            check_file_name(name, str(self.path))
            with zipfile.ZipFile(io.BytesIO(self._zip)) as zf:
                try:
                    info = zf.getinfo(name)
                except KeyError as exc:
                    raise BundleMissingFileError(f"{self.path}: missing {name}") from exc
                with zf.open(info) as fh:
                    yield fh, info.file_size
            return
        f = inside(self.path, name, str(self.path))
        if not f.is_file():
            raise BundleMissingFileError(f"{self.path}: the manifest lists {name} but the file "
                                         "is missing; copy the whole bundle directory")
        with f.open("rb") as fh:
            yield fh, os.fstat(fh.fileno()).st_size

    def verify_file(self, name: str) -> None:
        """Check one file against the manifest's sha256 (streamed: memory stays flat) and,
        for ``.safetensors``, that it is one."""
        expected = self.manifest["files"].get(name)
        if expected is None:
            raise BundleMissingFileError(f"{self.path}: manifest does not list {name}")
        h = hashlib.sha256()
        with self.open_file(name) as (fh, _):
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        if h.hexdigest() != expected:
            raise BundleIntegrityError(f"{self.path}: {name} has sha256 {h.hexdigest()[:12]}… "
                                       f"but the manifest says {expected[:12]}…; the file was "
                                       "modified or corrupted: restore it from the original "
                                       "bundle")
        if name.endswith(".safetensors"):
            with self.open_file(name) as (fh, size):
                check_safetensors_file(fh, size, name, str(self.path))

    def verified_bytes(self, name: str) -> bytes:
        """File contents, checked against the manifest's sha256."""
        expected = self.manifest["files"].get(name)
        if expected is None:
            raise BundleMissingFileError(f"{self.path}: manifest does not list {name}")
        data = self.read_bytes(name)
        actual = sha256_bytes(data)
        if actual != expected:
            raise BundleIntegrityError(f"{self.path}: {name} has sha256 {actual[:12]}… but the "
                                       f"manifest says {expected[:12]}…; the file was modified "
                                       "or corrupted: restore it from the original bundle")
        return data

    def state_dict(self) -> dict[str, Any]:
        """The model weights (verified) as a dict of tensors."""
        return self.tensors(WEIGHTS_NAME)

    def tensors(self, name: str, framework: str = "torch") -> dict[str, Any]:
        """A verified safetensors file of the bundle as torch tensors or NumPy arrays.

        Anything that is not a valid safetensors file (a pickle, ``torch.save`` output, a
        header pointing outside the file) is a one-line :class:`BundleIntegrityError`.
        """
        if framework == "numpy":
            from safetensors.numpy import load
        else:
            from safetensors.torch import load

        data = self.verified_bytes(name)
        check_safetensors(data, name, str(self.path))
        try:
            return load(data)
        except Exception as exc:  # SafetensorError and friends: one line, no traceback
            raise BundleIntegrityError(f"{self.path}: {name} cannot be read as "
                                       f"safetensors ({type(exc).__name__}: "
                                       f"{str(exc).splitlines()[0] if str(exc) else ''}); "
                                       "restore it from the original bundle") from None


def _not_a_bundle(path: Path) -> str:
    """What a folder without a manifest is likely to be: a run directory (`train --out`) holds
    its bundle in ``bundle/``."""
    if (path / "bundle" / MANIFEST_NAME).is_file():
        return f"this is a training run directory: pass its bundle, {path / 'bundle'}"
    return "is this a bundle directory? (`imgtriage train DATA --out RUN` writes RUN/bundle)"


def _read_manifest(path: Path) -> tuple[dict[str, Any], bytes | None]:
    if path.is_dir():
        mf = path / MANIFEST_NAME
        if not mf.is_file():
            raise BundleMissingFileError(f"{path}: no {MANIFEST_NAME}; {_not_a_bundle(path)}")
        if mf.stat().st_size > MAX_MANIFEST_BYTES:
            parse_manifest(b" " * (MAX_MANIFEST_BYTES + 1), str(path))  # says it is too big
        raw, zdata = mf.read_bytes(), None
    elif path.is_file() and zipfile.is_zipfile(path):
        if path.stat().st_size > MAX_ZIP_BYTES:
            raise BundleSchemaError(f"{path} is a {path.stat().st_size}-byte zip; zipped "
                                    f"bundles are read into memory and may have at most "
                                    f"{MAX_ZIP_BYTES} bytes: unzip it and pass the directory")
        zdata = path.read_bytes()
        with zipfile.ZipFile(io.BytesIO(zdata)) as zf:
            check_zip(zf, str(path))  # sizes from the directory, before anything is unpacked
            if MANIFEST_NAME not in zf.namelist():
                raise BundleMissingFileError(f"{path}: zip holds no {MANIFEST_NAME}")
            if zf.getinfo(MANIFEST_NAME).file_size > MAX_MANIFEST_BYTES:
                parse_manifest(b" " * (MAX_MANIFEST_BYTES + 1), str(path))
            raw = zf.read(MANIFEST_NAME)
    elif path.exists():
        raise BundleSchemaError(f"{path} is neither a bundle directory nor a zipped bundle")
    else:
        raise BundleMissingFileError(f"bundle {path} does not exist")
    return parse_manifest(raw, str(path)), zdata


def load_bundle(path: str | os.PathLike[str], *, verify: bool = True,
                expect_sha256: str | None = None) -> Bundle:
    """Open a bundle directory or zip, check its schema and (by default) every file's sha256.

    With ``verify`` every file must match its hash and every ``.safetensors`` file must be
    one. ``expect_sha256`` pins the bundle: any other bundle (``Bundle.sha256``, what
    ``imgtriage inspect`` prints) is refused.

    Example:
        >>> b = load_bundle("runs/digits/bundle")  # doctest: +SKIP
        >>> b.classes[:3]  # doctest: +SKIP
        ['0', '1', '2']
    """
    path = Path(path)
    manifest, zdata = _read_manifest(path)
    validate_manifest(manifest, str(path))
    bundle = Bundle(path, manifest, zdata)
    if expect_sha256 is not None:
        check_pinned(bundle, expect_sha256)
    if verify:
        for name in manifest["files"]:
            bundle.verify_file(name)
    return bundle


def check_pinned(bundle: Bundle, expect_sha256: str) -> None:
    """Refuse ``bundle`` unless its sha256 is ``expect_sha256`` (a deployment's pin)."""
    want = expect_sha256.strip().lower()
    if bundle.sha256 != want:
        raise BundleIntegrityError(
            f"{bundle.path} has sha256 {bundle.sha256} but {want or '(empty)'} was expected "
            "(--expect-sha256); this is not the pinned bundle: deploy the pinned one or "
            "update the pin (imgtriage inspect prints a bundle's sha256)")


def as_record(manifest: Manifest | Mapping[str, Any], where: str) -> Manifest:
    """The typed manifest of what a writer hands over: a :class:`Manifest` as it is, a dict
    (one read from a bundle, say) checked and typed (its ``files`` are set on saving)."""
    if isinstance(manifest, Manifest):
        return manifest
    return Manifest.from_dict(validate_manifest({**manifest, "files": {}}, where), where)


def save_bundle(path: str | os.PathLike[str], manifest: Manifest | Mapping[str, Any],
                state_dict: dict[str, Any] | None = None,
                extra_files: dict[str, bytes] | None = None) -> Path:
    """Write ``manifest.json`` + ``weights.safetensors`` (+ extra files) with their sha256.

    ``manifest`` is the typed record (``new_manifest(...)``, ``bundle.info.with_changes``);
    it becomes JSON here and nowhere else (:meth:`Manifest.to_dict`). ``path`` ending in
    ``.zip`` writes a single zipped bundle. Writing goes to a temporary directory first, so a
    crash never leaves a half-written bundle at ``path``.
    """
    from safetensors.torch import save

    path = Path(path)
    record = as_record(manifest, str(path))
    files: dict[str, bytes] = dict(extra_files or {})
    if state_dict is not None:
        tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()}
        files[WEIGHTS_NAME] = save(tensors)
    record = replace(record, files={name: sha256_bytes(data)
                                    for name, data in sorted(files.items())})
    body = json.dumps(validate_manifest(record.to_dict(), str(path)), indent=2).encode()
    _check_replaceable(path)
    if path.suffix == ".zip":
        return _write_zip(path, body, files)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".bundle-", dir=path.parent))
    for name, data in files.items():
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp / name).write_bytes(data)
    (tmp / MANIFEST_NAME).write_bytes(body)
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    return path


def _check_replaceable(path: Path) -> None:
    """Only a bundle is ever replaced: never a folder or file that is something else."""
    if path.is_symlink() or (path.exists() and not (
            (path.is_dir() and (path / MANIFEST_NAME).is_file())
            or (path.is_file() and path.suffix == ".zip" and zipfile.is_zipfile(path)))):
        raise BundleError(f"{path} exists and is not a bundle; it was left untouched: give "
                          "the new bundle a new path (--out)")


def _write_zip(path: Path, body: bytes, files: dict[str, bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".zip.tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr(MANIFEST_NAME, body)
        for name, data in files.items():
            zf.writestr(name, data)
    os.replace(tmp, path)
    return path


def bundle_files(bundle: Bundle) -> dict[str, bytes]:
    """Every file the manifest lists, verified (to copy a bundle into a new version)."""
    return {name: bundle.verified_bytes(name) for name in bundle.manifest["files"]}


def update_bundle(path: str | os.PathLike[str], changes: Mapping[str, Any], *,
                  note: str, extra_files: dict[str, bytes] | None = None,
                  out: str | os.PathLike[str] | None = None) -> Bundle:
    """Write a new version of a bundle with some manifest fields or blocks replaced
    (:meth:`Manifest.with_changes`; an unknown name is refused before anything is written).

    The previous manifest is kept inside the bundle as ``history/manifest.v<N>.json`` and
    listed in ``history``, so every earlier decision rule can be recovered.
    """
    bundle = load_bundle(path)
    old = bundle.info
    version = old.bundle_version
    new = old.with_changes(**changes).with_changes(bundle_version=version + 1, history=[
        *(h.to_dict() for h in old.history), {"version": version, "note": note}])
    files = bundle_files(bundle)
    files.update(extra_files or {})
    files[f"history/manifest.v{version}.json"] = json.dumps(bundle.manifest, indent=2).encode()
    target = Path(out) if out is not None else bundle.path
    if bundle._zip is not None and target.suffix != ".zip":
        raise BundleError(f"{path} is zipped; write the new version to a .zip path")
    save_bundle(target, new, None, files)
    return load_bundle(target)
