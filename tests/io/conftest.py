"""Shared helpers for the imgtriage.io tests: defect assertions and the shared datasets."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from imgtriage.io import Defect, ImageRecord

SHARED_DATASETS = Path(__file__).resolve().parents[2].parent / "shared" / "datasets"


@pytest.fixture
def assert_defect() -> Callable[[ImageRecord | Defect, str, str], Defect]:
    """Check a try_read_image result is a Defect with ``issue`` whose message names ``path``."""

    def check(result: ImageRecord | Defect, issue: str, path: str) -> Defect:
        assert isinstance(result, Defect), f"expected a {issue} defect, got {result!r}"
        assert result.issue == issue, result
        assert result.path == path
        assert result.message.strip(), "a defect message must not be empty"
        assert path in result.message, f"message should name {path!r}: {result.message}"
        assert result.to_dict() == {"path": path, "issue": issue, "message": result.message}
        return result

    return check


@pytest.fixture
def shared_dataset() -> Callable[[str], Path]:
    """The folder ``../shared/datasets/<name>``, or skip the test when it is absent."""

    def locate(name: str) -> Path:
        folder = SHARED_DATASETS / name
        if not folder.is_dir():
            pytest.skip(f"shared dataset {folder} is not present on this machine")
        return folder

    return locate
