"""The examples in the evaluate docstrings run and stay true."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = ["abstain", "calibration", "conformal", "decision", "drift", "metrics", "outcomes",
           "policy", "report", "thresholds", "_gallery"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(f"imgtriage.evaluate.{name}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
