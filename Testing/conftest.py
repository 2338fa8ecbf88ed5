"""Shared pytest fixtures: where the read-only shared data and golden fixtures live."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_ROOT = REPO_ROOT.parent / "shared"


def fixtures_root() -> Path:
    """Golden fixtures folder: $CTFOUNDATION_FIXTURES, default ../shared/fixtures beside the repository."""
    return Path(os.environ.get("CTFOUNDATION_FIXTURES", SHARED_ROOT / "fixtures"))


def data_root() -> Path:
    """Real test data: $CTFOUNDATION_DATA, default ../shared/data beside the repository."""
    return Path(os.environ.get("CTFOUNDATION_DATA", SHARED_ROOT / "data"))


def fixture_folders(prefix: str) -> list[Path]:
    """Every fixture folder whose name starts with `prefix` (one test case each)."""
    root = fixtures_root()
    return sorted(p for p in root.glob(f"{prefix}*") if p.is_dir()) if root.is_dir() else []


@pytest.fixture(scope="session")
def ct_dir() -> Path:
    path = data_root() / "ct"
    if not path.is_dir():
        pytest.fail(f"shared CT data not found at {path}; set CTFOUNDATION_DATA")
    return path


@pytest.fixture(scope="session")
def demo_home(tmp_path_factory):
    """ct-clip-demo built by the real command path into a fresh cache (demo set, training, export, install); one
    per test session, so that the demo fVLM reuses its demo set. Returns (home, training record)."""
    from training.demo import build

    home = tmp_path_factory.mktemp("home")
    record = build.train_demo(data_root(), home)
    return home, record
