"""The portable model artifact as data: save, load, verify (building its model and exporting it
are above this layer: ``predict.backends.build_model``, ``predict.export``)."""

from imgtriage.bundle.manifest import SCHEMA_VERSION, new_manifest, validate_manifest
from imgtriage.bundle.record import HistoryEntry, Manifest, ModelRecord
from imgtriage.bundle.store import (
    Bundle,
    check_pinned,
    load_bundle,
    save_bundle,
    update_bundle,
)
from imgtriage.io import sha256_file  # the one file-hash helper, public here as before

__all__ = [
    "SCHEMA_VERSION",
    "Bundle",
    "HistoryEntry",
    "Manifest",
    "ModelRecord",
    "check_pinned",
    "load_bundle",
    "new_manifest",
    "save_bundle",
    "sha256_file",
    "update_bundle",
    "validate_manifest",
]
