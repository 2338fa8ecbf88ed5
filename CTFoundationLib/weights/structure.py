"""Is a checkpoint the model it is installed as? The structural checks, one per model family that has one.

A CT-CLIP or fVLM checkpoint is read as its runtime reads it (weights_only, memory-mapped: names and shapes, no
weights) and must be what that runtime's loader accepts: the same keys as the model, with the shapes of the
sizes the registry entry gives (its constructors file when it names one, else the released full size; fVLM takes
its vocabulary and position count from the file, as `load_fvlm` does). Files of the other families are checked
by format only. torch and the model code are imported only when a check runs.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from CTFoundationLib.errors import CheckpointError
from CTFoundationLib.weights.registry import ModelSpec


def _check_ctclip(checkpoint: Path, constructors: Path | None) -> None:
    from CTFoundationLib.models.ctclip import check_ctclip_checkpoint, read_ctclip_config

    check_ctclip_checkpoint(checkpoint, read_ctclip_config(constructors) if constructors else None)


def _check_fvlm(checkpoint: Path, constructors: Path | None) -> None:
    from CTFoundationLib.models.fvlm import check_fvlm_checkpoint, read_fvlm_config

    check_fvlm_checkpoint(checkpoint, read_fvlm_config(constructors) if constructors else None)


@dataclass(frozen=True)
class Layout:
    """What a family's checkpoints look like and how to check one."""

    name: str  # how messages call such a checkpoint
    marker: str  # a part of key names that only this family's checkpoints have
    check: Callable[[Path, Path | None], None]  # (checkpoint, constructors JSON or None); raises CheckpointError


LAYOUTS = {
    "ct-clip": Layout("a CT-CLIP checkpoint", "visual_transformer.", _check_ctclip),
    "fvlm": Layout("an fVLM checkpoint", "visual_encoder.", _check_fvlm),
}


def structure_problem(spec: ModelSpec, files: Mapping[str, Path]) -> str | None:
    """Why the model's checkpoint among `files` (name in the model folder -> path) is not that model; None if it is.

    None also when the family has no structural check or the checkpoint (or its constructors file) is not there.
    """
    layout = LAYOUTS.get(spec.family)
    checkpoint = files.get(spec.entry_name())
    constructors = files.get(spec.runtime.constructors) if spec.runtime.constructors else None
    if layout is None or checkpoint is None or (spec.runtime.constructors and constructors is None):
        return None
    try:
        layout.check(checkpoint, constructors)
    except CheckpointError as error:
        return _looks_like(checkpoint, spec, error)
    return None


def _looks_like(checkpoint: Path, spec: ModelSpec, error: CheckpointError) -> str:
    """One line: what the file looks like instead, or the loader's own reason when it is of the right family."""
    keys = _key_names(checkpoint)
    expected = LAYOUTS[spec.family]
    found = next((layout for layout in LAYOUTS.values() if any(layout.marker in key for key in keys)), None)
    if found is not None and found is not expected:
        return f"{checkpoint} looks like {found.name} (keys {found.marker}*), not model '{spec.id}' ({spec.title})"
    if found is None and keys:
        roots = sorted({key.split(".")[0] for key in keys})
        shown = ", ".join(f"{root}.*" for root in roots[:4]) + (", ..." if len(roots) > 4 else "")
        return f"{checkpoint} does not look like {expected.name} (its keys are {shown}), so it is not model '{spec.id}'"
    reason = re.split(r"\.\s+(?=[A-Z])", str(error), maxsplit=1)[0].rstrip(".")  # without the loader's advice
    return f"model '{spec.id}' cannot load {checkpoint}: {reason}"


def _key_names(checkpoint: Path) -> list[str]:
    """The entry names of a state-dict file, also inside a {"model": ...} wrapper; [] when it is none."""
    from CTFoundationLib.models.checkpoint_io import load_torch_file

    try:
        content = load_torch_file(checkpoint, "checkpoint")
    except CheckpointError:
        return []
    if not isinstance(content, Mapping):
        return []
    inner = content.get("model")
    names = [str(key) for key in content]
    return names + ([str(key) for key in inner] if isinstance(inner, Mapping) else [])
