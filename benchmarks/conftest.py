"""Benchmarks share the tests' markers (gpu skips itself without a device) and reference inputs."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent / "tests"
sys.path.insert(0, str(TESTS))

_spec = importlib.util.spec_from_file_location("nvclip_tests_conftest", TESTS / "conftest.py")
_tests_conftest = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_tests_conftest)

pytest_configure = _tests_conftest.pytest_configure
pytest_collection_modifyitems = _tests_conftest.pytest_collection_modifyitems
