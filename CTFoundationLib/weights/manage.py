"""What is installed, checking it again, removing it, and finding it for other commands."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from CTFoundationLib.errors import WeightsError
from CTFoundationLib.io.files import sha256_file
from CTFoundationLib.weights.cache import CORRUPT_SUFFIX, PART_SUFFIX, Manifest, cache_root, model_dir, now_iso
from CTFoundationLib.weights.registry import FileSpec, ModelSpec, Registry, load_registry
from CTFoundationLib.weights.structure import structure_problem

INSTALLED, PARTIAL, MISSING = "installed", "partial", "missing"
BUILD_RECORD = "training_record.json"  # written beside a model built on this machine


@dataclass
class ModelStatus:
    """The state of one model in the cache: installed, partial or missing, and why."""

    model_id: str
    state: str
    folder: Path
    present: list[str] = field(default_factory=list)  # verified files
    missing: list[str] = field(default_factory=list)  # registry files (or folders) not yet verified
    corrupt: list[str] = field(default_factory=list)  # files set aside after a failed check
    partial_bytes: int = 0  # bytes in .part files
    size_bytes: int = 0  # bytes of verified files


def model_status(spec: ModelSpec, home: Path | str | None = None) -> ModelStatus:
    """Compare the registry entry with the cache, without network or hashing (sizes only)."""
    manifest = Manifest(spec.id, home)
    status = ModelStatus(spec.id, MISSING, manifest.dir)
    for file in spec.files:
        members = _members(file, manifest)
        if members is None or not all(manifest.file_ok(m) for m in members) or _outdated(file, manifest):
            status.missing.append(_label(file))
    for rel in manifest.files:
        if manifest.file_ok(rel):
            status.present.append(rel)
            status.size_bytes += manifest.files[rel].size
    if manifest.dir.is_dir():
        status.partial_bytes = sum(p.stat().st_size for p in manifest.dir.rglob(f"*{PART_SUFFIX}"))
        status.corrupt = sorted(str(p.relative_to(manifest.dir)) for p in manifest.dir.rglob(f"*{CORRUPT_SUFFIX}"))
    status.state = _state(status, spec)
    return status


def _outdated(file: FileSpec, manifest: Manifest) -> bool:
    """The registry pins a sha256 and the verified file is another version (the registry was updated)."""
    record = manifest.files.get(file.name)
    return bool(file.sha256 and record and record.sha256 != file.sha256)


def _label(file: FileSpec) -> str:
    if not file.folder:
        return file.name
    return f"{file.name}/" if file.name != "." else f"the files of {file.source.repo}"


def _members(file: FileSpec, manifest: Manifest) -> list[str] | None:
    """The local files a registry entry stands for; None when a folder was never listed."""
    if not file.folder:
        return [file.name]
    listed = manifest.folders.get(file.name)
    return list(listed["files"]) if listed else None


def _state(status: ModelStatus, spec: ModelSpec) -> str:
    required_missing = [m for m in status.missing if not _is_optional(m, spec)]
    if not required_missing:
        return INSTALLED
    return PARTIAL if status.present or status.partial_bytes else MISSING


def _is_optional(name: str, spec: ModelSpec) -> bool:
    return any(f.optional and f.name == name for f in spec.files)


def all_status(registry: Registry | None = None, home: Path | str | None = None) -> list[ModelStatus]:
    registry = registry or load_registry()
    return [model_status(spec, home) for spec in registry.models.values()]


# --- resolve ------------------------------------------------------------------------------------------


def resolve_weights(
    model_id: str, override: Path | str | None = None, *, home: Path | str | None = None,
    registry: Registry | None = None,
) -> Path:
    """The local path of a model's weights (file or folder) for other commands.

    `override` (a local file or folder given instead, e.g. by `--weights` or `--llm`) wins when given and must
    exist. Otherwise the model must be installed; if not, the WeightsError says what is missing and how to get it.
    """
    if override is not None:
        path = Path(override).expanduser()
        if not path.exists():
            raise WeightsError(f"{path} (given for {model_id}): no such file or folder; give an existing path or "
                               "leave the option out to use the installed model")
        return path.resolve()
    registry = registry or load_registry()
    spec = registry.get(model_id)
    status = model_status(spec, home)
    if status.state != INSTALLED:
        raise WeightsError(not_installed_message(spec, status))
    if spec.runtime.demo_version is not None:
        require_current_build(spec, status.folder)
    return (status.folder / spec.entry_name()).resolve()


def require_current_build(spec: ModelSpec, folder: Path) -> None:
    """A model built on this machine must come from the build the registry names (its training_record.json)."""
    try:
        built = json.loads((folder / BUILD_RECORD).read_text(encoding="utf-8")).get("demo_version")
    except (OSError, ValueError, AttributeError):
        built = None
    if built != spec.runtime.demo_version:
        command = next(f.source.command for f in spec.files if f.source.type == "local")
        raise WeightsError(f"model {spec.id} on this machine comes from an older build ({built}, this version needs "
                           f"{spec.runtime.demo_version}); rebuild it with `{command}` from the repository root")


def not_installed_message(spec: ModelSpec, status: ModelStatus) -> str:
    missing = ", ".join(m for m in status.missing if not _is_optional(m, spec))
    local = next((f for f in spec.files if f.source.type == "local"), None)
    if local is not None:
        how = f"build it on this machine with `{local.source.command}` ({local.source.instructions})"
    elif spec.manual:
        manual = next(f for f in spec.files if f.source.type == "manual")
        how = f"get it from {manual.source.url} ({manual.source.instructions})"
    else:
        gated = f" (gated: accept its licence at {spec.page} and set HF_TOKEN)" if spec.gated else ""
        how = (
            f"get it with `ctfoundation weights download {spec.id}`{gated} "
            f"or `ctfoundation weights import {spec.id} FILE`"
        )
    return f"model {spec.id} is not installed: missing {missing}; {how}"


# --- verify -------------------------------------------------------------------------------------------


@dataclass
class VerifyResult:
    model_id: str
    ok: list[str] = field(default_factory=list)
    bad: dict[str, str] = field(default_factory=dict)  # file -> why; set aside as .corrupt
    missing: list[str] = field(default_factory=list)


def verify_model(spec: ModelSpec, home: Path | str | None = None) -> VerifyResult:
    """Re-hash every recorded file and check the checkpoint's structure (`structure.py`).

    A file that no longer matches, or a checkpoint that is not the model, is set aside as `.corrupt`.
    """
    manifest = Manifest(spec.id, home)
    result = VerifyResult(spec.id)
    expected = {f.name: f.sha256 for f in spec.files if f.sha256}
    for rel, record in sorted(manifest.files.items()):
        path = manifest.dir / rel
        if not path.is_file():
            result.missing.append(rel)
            manifest.forget(rel)
            continue
        digest = sha256_file(path)
        if digest == record.sha256 and expected.get(rel, digest) == digest:
            record.verified_at = now_iso()
            result.ok.append(rel)
        else:
            _set_aside(manifest, rel, "its sha256 changed", result)
    problem = structure_problem(spec, {rel: manifest.dir / rel for rel in result.ok})
    if problem:
        _set_aside(manifest, spec.entry_name(), problem, result)
    manifest.save()
    return result


def _set_aside(manifest: Manifest, rel: str, why: str, result: VerifyResult) -> None:
    """Rename a file that failed verification to `.corrupt` (never used) and record why."""
    path = manifest.dir / rel
    os.replace(path, path.with_name(path.name + CORRUPT_SUFFIX))
    manifest.forget(rel)
    if rel in result.ok:
        result.ok.remove(rel)
    result.bad[rel] = why


# --- remove -------------------------------------------------------------------------------------------


def remove_model(model_id: str, home: Path | str | None = None) -> int:
    """Delete a model's folder (files, partial downloads, manifest). Returns the bytes freed."""
    folder = model_dir(model_id, home)
    root = cache_root(home).resolve()
    if not folder.exists():
        return 0
    if root not in folder.resolve().parents:
        raise WeightsError(f"refusing to remove {folder}: it is not inside the cache {root}")
    files = [p.stat() for p in folder.rglob("*") if p.is_file() and not p.is_symlink()]
    freed = sum(s.st_size for s in files if s.st_nlink == 1)  # hard-linked imports free nothing
    shutil.rmtree(folder)
    return freed
