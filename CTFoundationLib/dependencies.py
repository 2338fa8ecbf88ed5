"""Which Python packages a host environment (3D Slicer's Python) still lacks, and what must not change in it.

Slicer ships its own numpy, SimpleITK and requests (and scipy, pydicom); installing our requirements must
never replace them, so installs run with a constraints list that pins their present versions.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement

from CTFoundationLib.errors import DependencyError

PROTECTED_PACKAGES = ("numpy", "SimpleITK", "requests")


def read_requirements(path: Path) -> list[str]:
    """Requirement lines of a requirements file, without comments and blank lines."""
    lines = (line.split("#", 1)[0].strip() for line in Path(path).read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line]


def installed_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def missing_requirements(requirements: list[str]) -> list[str]:
    """The requirements that are not installed, or installed in a version outside their specifier."""
    missing = []
    for text in requirements:
        try:
            requirement = Requirement(text)
        except InvalidRequirement as error:
            raise DependencyError(f"requirement '{text}' is not valid ({error}); fix the requirements file") from None
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        version = installed_version(requirement.name)
        if version is None or not requirement.specifier.contains(version, prereleases=True):
            missing.append(text)
    return missing


def protected_constraints(names: tuple[str, ...] = PROTECTED_PACKAGES) -> list[str]:
    """`name==version` pins of the installed protected packages (pip constraints: never upgraded or removed)."""
    return [f"{name}=={version}" for name in names if (version := installed_version(name)) is not None]


def write_constraints(path: Path, names: tuple[str, ...] = PROTECTED_PACKAGES) -> Path:
    """A pip constraints file (`pip install -c FILE ...`) that keeps the protected packages as they are."""
    path = Path(path)
    path.write_text("\n".join(protected_constraints(names)) + "\n", encoding="utf-8")
    return path
