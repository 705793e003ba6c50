"""The portable model artifact: save, load, verify (and export, see ``bundle.export``)."""

from imgtriage.bundle.manifest import SCHEMA_VERSION, new_manifest, validate_manifest
from imgtriage.bundle.store import (
    Bundle,
    build_model,
    check_pinned,
    load_bundle,
    save_bundle,
    sha256_file,
    update_bundle,
)

__all__ = [
    "SCHEMA_VERSION",
    "Bundle",
    "build_model",
    "check_pinned",
    "load_bundle",
    "new_manifest",
    "save_bundle",
    "sha256_file",
    "update_bundle",
    "validate_manifest",
]
