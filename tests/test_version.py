"""hrperc's version is written once (``src/hrperc/_version.py``); the package metadata is built from it."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest

import hrperc
import hrperc._version

ROOT = Path(__file__).resolve().parents[1]


def test_the_version_attribute_is_the_installed_metadata():
    # A mismatch means the installed metadata is stale: reinstall (`make install` does when _version.py changes).
    assert hrperc.__version__ == importlib.metadata.version("hrperc") == hrperc._version.__version__


def test_pyproject_reads_the_version_from_the_module():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"]  # no second copy
    assert "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "hrperc._version.__version__"}


def test_the_version_is_written_once():
    import re

    package = ROOT / "src" / "hrperc"
    writers = [
        p.relative_to(package).as_posix()
        for p in sorted(package.rglob("*.py"))
        if re.search(r"^__version__\s*=", p.read_text(), re.MULTILINE)
    ]
    assert writers == ["_version.py"]
