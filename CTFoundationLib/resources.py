"""The one place that finds the extension's `Resources/` folder and the shared data folder.

`Resources/` sits beside `CTFoundationLib/` both in the repository and in an installed Slicer module.
"""

from __future__ import annotations

import os
from pathlib import Path

RESOURCES = Path(__file__).resolve().parents[1] / "Resources"
ANATOMY_RESOURCES = RESOURCES / "anatomy"


def shared_data_root() -> Path:
    """The shared (real, non-redistributable) data folder: $CTFOUNDATION_DATA, else ../shared/data beside the
    repository."""
    env = os.environ.get("CTFOUNDATION_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"
