"""The extension as Slicer would build and package it, and every Slicer name the module uses checked against
the real Slicer API.

CMake runs the real CMakeLists.txt files against a stand-in SlicerConfig (Testing/cmake_slicer_standin) with
Slicer's and CTK's file-placement rules; the build and install trees must hold the module, the whole library
and every resource, side by side, and work from there.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import data_root
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
STANDIN_CMAKE = Path(__file__).resolve().parent / "cmake_slicer_standin"
STANDIN_PYTHON = Path(__file__).resolve().parent / "slicer_standin"
CHECKER = data_root().parent / "slicer_api" / "check_slicer_api.py"
SCRIPTED = Path("lib/Slicer-5.10/qt-scripted-modules")
EXTENSION_PARTS = ("CMakeLists.txt", "README.md", "CTFoundation", "CTFoundationLib", "Resources")


def run(*command: str | Path, cwd: Path | None = None) -> str:
    done = subprocess.run([str(c) for c in command], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{command}\n{done.stdout}\n{done.stderr}"
    return done.stdout


def packaged_sources(root: Path) -> dict[str, Path]:
    """What must land in qt-scripted-modules: relative path there -> source file."""
    wanted = {"CTFoundation.py": root / "CTFoundation" / "CTFoundation.py",
              "CTFoundationChat/__init__.py": root / "CTFoundation" / "CTFoundationChat" / "__init__.py",
              "CTFoundationSimilar/__init__.py": root / "CTFoundation" / "CTFoundationSimilar" / "__init__.py",
              "Scripts/ctfoundation_batch.py": root / "CTFoundation" / "Scripts" / "ctfoundation_batch.py"}
    for path in (root / "CTFoundation").glob("CTFoundation*/**/*.py"):  # the module's helper packages, beside it
        wanted[str(path.relative_to(root / "CTFoundation"))] = path
    for folder, pattern in (("CTFoundationLib", "*.py"), ("Resources", "*")):
        for path in (root / folder).rglob(pattern):
            if path.is_file() and "__pycache__" not in path.parts and not path.name.startswith("."):
                wanted[str(path.relative_to(root))] = path
    return wanted


def tree(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts}


@pytest.fixture(scope="module")
def extension(tmp_path_factory):
    """A copy of the extension sources configured, built and installed with the stand-in Slicer."""
    if shutil.which("cmake") is None:
        pytest.skip("cmake is not installed")
    root = tmp_path_factory.mktemp("extension")
    source = root / "src"
    source.mkdir()
    for part in EXTENSION_PARTS:
        copy = shutil.copytree if (REPO / part).is_dir() else shutil.copy2
        kwargs = {"ignore": shutil.ignore_patterns("__pycache__")} if (REPO / part).is_dir() else {}
        copy(REPO / part, source / part, **kwargs)
    run("cmake", "-S", source, "-B", root / "build", f"-DSlicer_DIR={STANDIN_CMAKE}", "-DBUILD_TESTING=ON")
    run("cmake", "--build", root / "build")
    run("cmake", "--install", root / "build", "--prefix", root / "install")
    return source, root / "build", root / "install"


def test_build_and_install_trees_hold_module_library_and_resources(extension) -> None:
    source, build, install = extension
    wanted = packaged_sources(source)
    assert {"CTFoundationLib/host/worker.py", "CTFoundationLib/weights/registry.py",
            "CTFoundationTesting/small_ctclip.py", "CTFoundationMRML/anatomy.py", "CTFoundationChat/__init__.py",
            "Resources/models.json",
            "Resources/UI/CTFoundation.ui", "Resources/Icons/CTFoundation.png",
            "Resources/slicer-requirements.txt"} <= wanted.keys()
    for tree_root in (build / SCRIPTED, install / SCRIPTED):
        assert tree(tree_root) == set(wanted), tree_root
        for relative, original in wanted.items():
            assert (tree_root / relative).read_bytes() == original.read_bytes(), relative
    assert (build / "standin-tests.txt").read_text().split() == [str(source / "CTFoundation" / "CTFoundation.py")]
    description = dict(line.split("=", 1) for line in (build / "standin-extension.txt").read_text().splitlines())
    assert description["EXTENSION_DEPENDS"] == "PyTorch" and description["EXTENSION_CATEGORY"]


@pytest.mark.parametrize(("added", "packaged"), [
    ("CTFoundationLib/models/added_later.py", "CTFoundationLib/models/added_later.py"),
    ("CTFoundation/CTFoundationMRML/added_later.py", "CTFoundationMRML/added_later.py")])
def test_a_new_python_file_is_packaged_without_editing_cmake(extension, added, packaged) -> None:
    source, build, _ = extension
    path = source / added
    path.write_text('"""A module added after the first configure."""\n')
    try:
        run("cmake", "--build", build)
        assert (build / SCRIPTED / packaged).is_file()
    finally:
        path.unlink()


def test_extension_metadata_points_at_files_of_this_repository() -> None:
    """The icon, screenshot and readme the extension index shows are files here, at the paths the URLs name."""
    cmake = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    urls = re.findall(r'set\(EXTENSION_(?:ICONURL|SCREENSHOTURLS) "([^"]+)"\)', cmake)
    assert len(urls) == 2
    for url in (u for value in urls for u in value.split()):
        relative = re.fullmatch(r"https://raw\.githubusercontent\.com/[^/]+/[^/]+/main/(.+)", url).group(1)
        assert (REPO / relative).is_file(), url
    assert '"${CMAKE_CURRENT_SOURCE_DIR}/README.md"' in cmake and (REPO / "README.md").is_file()


def test_installed_module_imports_its_library_and_resources(extension) -> None:
    _, _, install = extension
    folder = install / SCRIPTED
    code = (
        "import json, sys; import CTFoundation, CTFoundationLib, CTFoundationLib.weights.registry as registry; "
        "print(json.dumps({'root': str(CTFoundation.packageRoot()), 'lib': CTFoundationLib.__file__, "
        "'models': sorted(registry.load_registry().models), "
        "'ui': CTFoundation.resourcePath('UI/CTFoundation.ui').is_file()}))"
    )
    paths = [str(STANDIN_PYTHON), str(folder), os.environ.get("PYTHONPATH", "")]  # slicer-core from the environment
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    found = json.loads(subprocess.run([sys.executable, "-c", code], cwd=folder, env=environment, capture_output=True,
                                      text=True, check=True, timeout=120).stdout)
    assert Path(found["root"]) == folder and Path(found["lib"]).is_relative_to(folder)
    assert "ct-clip-v2" in found["models"] and found["ui"]
    worker = subprocess.run([sys.executable, "-m", "CTFoundationLib.host.worker", "download", "--help"], cwd=folder,
                            capture_output=True, text=True, timeout=120)
    assert worker.returncode == 0 and "--accept-licenses" in worker.stdout


def test_icon_is_a_128_pixel_png() -> None:
    with Image.open(REPO / "Resources" / "Icons" / "CTFoundation.png") as icon:
        assert icon.format == "PNG" and icon.size == (128, 128)


@pytest.mark.parametrize("version", ["5.10", "5.12"])
def test_every_slicer_name_exists_in_the_real_api(version: str) -> None:
    """The shared static checker (Slicer 5.10 and 5.12 API) reports nothing on the module, its UI and scripts."""
    if not CHECKER.is_file():
        pytest.fail(f"Slicer API checker not found at {CHECKER}; "
                    "set CTFOUNDATION_DATA so that its parent holds slicer_api/")
    for targets in (["CTFoundation/"], ["CTFoundation/", "Resources/UI/CTFoundation.ui"]):
        done = subprocess.run([sys.executable, str(CHECKER), "--slicer-version", version, "--stats", *targets],
                              cwd=REPO, capture_output=True, text=True, timeout=300)
        report = done.stdout + done.stderr  # findings on stdout, statistics on stderr
        assert done.returncode == 0 and "findings: 0" in report, report
        # the module, its MRML helpers (anatomy, maps), its chat and similar-cases panels, its self-test helpers and
        # the batch script
        assert "python_files=9" in report
