"""What Slicer's Python lacks, what must never change there, and the Slicer requirements list."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement

from CTFoundationLib.dependencies import (
    PROTECTED_PACKAGES,
    missing_requirements,
    protected_constraints,
    read_requirements,
    write_constraints,
)
from CTFoundationLib.errors import DependencyError

REPO = Path(__file__).resolve().parents[1]
SLICER_REQUIREMENTS = REPO / "Resources" / "slicer-requirements.txt"
SLICER_PROVIDES = {"torch", "numpy", "scipy", "requests"}  # PyTorch Utils installs torch; Slicer ships the rest


def test_missing_requirements_against_this_environment() -> None:
    numpy_version = importlib.metadata.version("numpy")
    assert missing_requirements([f"numpy=={numpy_version}", "numpy>=1.0", "tqdm"]) == []
    assert missing_requirements(["numpy>=999", "no-such-package-ctfoundation>=1"]) == [
        "numpy>=999", "no-such-package-ctfoundation>=1"]
    assert missing_requirements(['numpy>=999; python_version < "3"']) == []  # marker excludes it
    with pytest.raises(DependencyError, match="'numpy>>1' is not valid"):
        missing_requirements(["numpy>>1"])


def test_constraints_pin_the_installed_protected_packages(tmp_path) -> None:
    pins = protected_constraints()
    assert f"numpy=={importlib.metadata.version('numpy')}" in pins
    assert f"requests=={importlib.metadata.version('requests')}" in pins
    assert {Requirement(p).name for p in pins} <= set(PROTECTED_PACKAGES)
    assert protected_constraints(("no-such-package-ctfoundation",)) == []
    path = write_constraints(tmp_path / "c.txt", ("numpy", "torch"))
    assert read_requirements(path) == [f"numpy=={importlib.metadata.version('numpy')}",
                                       f"torch=={importlib.metadata.version('torch')}"]


def test_slicer_requirements_follow_pyproject() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    expected = {str(Requirement(r)) for r in project if Requirement(r).name not in SLICER_PROVIDES}
    assert {str(Requirement(r)) for r in read_requirements(SLICER_REQUIREMENTS)} == expected
    assert missing_requirements(read_requirements(SLICER_REQUIREMENTS)) == []  # this environment has them all
