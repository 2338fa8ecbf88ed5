"""Offline import: check a file or folder obtained elsewhere against the registry and place it in the cache.

Sizes, formats and the checkpoint's structure (`structure.py`) are checked before anything is placed. Each file
is then copied while it is hashed, so the cached copy and the user's file never share their bytes (`link=True`
hard-links instead, on the same filesystem). A file whose sha256 does not fit the registry is not placed.
"""

from __future__ import annotations

import errno
import fnmatch
import hashlib
import json
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

from CTFoundationLib.errors import WeightsError
from CTFoundationLib.io.files import sha256_file
from CTFoundationLib.weights.cache import PART_SUFFIX, FileRecord, Manifest, now_iso
from CTFoundationLib.weights.download import CHUNK_BYTES, mib
from CTFoundationLib.weights.registry import FileSpec, ModelSpec
from CTFoundationLib.weights.structure import structure_problem

FORMAT_BY_SUFFIX = {".safetensors": "safetensors", ".json": "json", ".bin": "torch", ".pt": "torch", ".pth": "torch"}
LINK_FAILURES = {errno.EXDEV, errno.EPERM, errno.EACCES, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP}


@dataclass
class Planned:
    """One source file and where it goes in the model folder."""

    src: Path
    rel: str
    spec: FileSpec


def import_weights(spec: ModelSpec, source: Path | str, home: Path | str | None = None, link: bool = False) -> Path:
    """Verify `source` (a file, or a folder holding the model's files) and place it in the cache."""
    source = Path(source).expanduser()
    if not source.exists():
        raise WeightsError(f"cannot import into '{spec.id}': {source} does not exist")
    planned, folders = _plan(spec, source)
    for item in planned:
        _check_size_and_format(item, spec)
    problem = structure_problem(spec, {item.rel: item.src for item in planned})
    if problem:
        raise WeightsError(f"{problem}; nothing was imported: give the file of model '{spec.id}', or import this one "
                           f"as the model it is (`ctfoundation weights list` shows them)")
    manifest = Manifest(spec.id, home)
    for item in planned:
        record = _place(item, manifest.dir / item.rel, spec, link)
        manifest.record_file(item.rel, record)
        manifest.save()
    for name, members in folders.items():
        manifest.record_folder(name, f"import:{source.resolve()}", members)
    manifest.save()
    return manifest.dir


def _plan(spec: ModelSpec, source: Path) -> tuple[list[Planned], dict[str, list[str]]]:
    """Match the source against the registry's files; complain about what is missing."""
    if source.is_file():
        singles = [f for f in spec.files if not f.folder and not f.optional]
        if len(spec.files) != 1 or len(singles) != 1:
            names = ", ".join(f"{f.name}/" if f.folder else f.name for f in spec.files)
            raise WeightsError(f"model '{spec.id}' needs several files ({names}): give the folder that holds them")
        return [Planned(source, singles[0].name, singles[0])], {}
    planned: list[Planned] = []
    folders: dict[str, list[str]] = {}
    missing: list[str] = []
    for file in spec.files:
        if file.folder:
            members = _folder_members(file, source, spec)
            folders[file.name] = [m.rel for m in members]
            planned.extend(members)
            continue
        found = _find(source, file.name)
        if found is not None:
            planned.append(Planned(found, file.name, file))
        elif not file.optional:
            missing.append(file.name)
    if missing:
        raise WeightsError(f"cannot import into '{spec.id}': {source} lacks {', '.join(missing)}; nothing was imported")
    return planned, folders


def _find(folder: Path, name: str) -> Path | None:
    for candidate in (folder / name, folder / Path(name).name):
        if candidate.is_file():
            return candidate
    return None


def _folder_members(file: FileSpec, source: Path, spec: ModelSpec) -> list[Planned]:
    """Files of a folder entry: `<source>/<name>/` if present, else `source` itself (top level only)."""
    base = source / file.name if file.name != "." and (source / file.name).is_dir() else source
    wanted = [
        p for p in sorted(base.iterdir())
        if p.is_file() and not p.name.endswith(PART_SUFFIX) and _wanted(p.name, file)
    ]
    if not wanted:
        raise WeightsError(f"cannot import into '{spec.id}': {base} holds no files for '{file.name}'")
    prefix = "" if file.name == "." else f"{file.name}/"
    return [Planned(p, prefix + p.name, file) for p in wanted]


def _wanted(name: str, file: FileSpec) -> bool:
    include, exclude = file.source.include, file.source.exclude
    return (not include or any(fnmatch.fnmatch(name, g) for g in include)) and not any(
        fnmatch.fnmatch(name, g) for g in exclude
    )


# --- checking and placing -------------------------------------------------------------------------------


def _check_size_and_format(item: Planned, spec: ModelSpec) -> None:
    """The registry's size (when it has one) and a look at the first bytes."""
    size = item.src.stat().st_size
    expected_size = None if item.spec.folder else item.spec.size
    if expected_size is not None and size != expected_size:
        raise WeightsError(_rejected(item, spec, f"it has {size} bytes, the registry expects {expected_size}"))
    fmt = FORMAT_BY_SUFFIX.get(item.src.suffix, "any") if item.spec.folder else item.spec.format
    problem = check_format(item.src, fmt)
    if problem:
        raise WeightsError(_rejected(item, spec, problem))


def _place(item: Planned, dest: Path, spec: ModelSpec, link: bool) -> FileRecord:
    """Copy (or hard-link) while hashing, then verify the hash before the file replaces an installed one."""
    size = item.src.stat().st_size
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp, digest = _link_or_copy(item.src, dest, link)
    expected = None if item.spec.folder else item.spec.sha256
    if expected and digest != expected:  # checked before the rename: an installed file is never replaced by it
        tmp.unlink(missing_ok=True)
        raise WeightsError(_rejected(item, spec, f"its sha256 is {digest}, the registry expects {expected}"))
    os.replace(tmp, dest)
    origin = "registry" if expected else "computed"
    return FileRecord(digest, size, now_iso(), f"import:{item.src.resolve()}", origin, dest.stat().st_mtime_ns)


def _rejected(item: Planned, spec: ModelSpec, why: str) -> str:
    return f"{item.src} is not the '{item.rel}' file of model '{spec.id}': {why}; it was not imported"


def _link_or_copy(src: Path, dest: Path, link: bool) -> tuple[Path, str]:
    """Place `src` at a temporary name beside `dest`: (that path, its sha256), reading the source once."""
    tmp = dest.with_name(dest.name + ".import" + PART_SUFFIX)
    tmp.unlink(missing_ok=True)
    if link:
        try:
            os.link(src, tmp)
        except OSError as error:
            if error.errno not in LINK_FAILURES:
                raise
        else:
            return tmp, sha256_file(src, CHUNK_BYTES)
    try:
        digest = _copy_hashing(src, tmp)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        if error.errno == errno.ENOSPC:
            raise WeightsError(f"disk full while copying {src} to {dest.parent}; free some space") from None
        raise
    return tmp, digest


def _copy_hashing(src: Path, tmp: Path) -> str:
    hasher = hashlib.sha256()
    with open(src, "rb", buffering=0) as reader, open(tmp, "wb", buffering=0) as writer:
        while block := reader.read(CHUNK_BYTES):
            hasher.update(block)
            view = memoryview(block)
            while view:
                view = view[writer.write(view):]
        os.fsync(writer.fileno())
    shutil.copystat(src, tmp)
    return hasher.hexdigest()


def check_format(path: Path, fmt: str) -> str | None:
    """A cheap look at the first bytes: None when plausible, else what is wrong."""
    with open(path, "rb") as handle:
        head = handle.read(65536)
    if fmt == "torch" and not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):
        return "it is not a PyTorch checkpoint (neither a torch zip archive nor a pickle)"
    if fmt == "safetensors" and not _looks_safetensors(head, path.stat().st_size):
        return "it is not a safetensors file"
    if fmt == "json":
        return _json_problem(path)
    if fmt == "text" and b"\x00" in head:
        return "it is binary, a text file was expected"
    return None


def _looks_safetensors(head: bytes, size: int) -> bool:
    if len(head) < 9:
        return False
    (header_len,) = struct.unpack("<Q", head[:8])
    return 8 + header_len <= size and head[8:9] == b"{"


def _json_problem(path: Path) -> str | None:
    if path.stat().st_size > 64 * 2**20:
        return f"it is {mib(path.stat().st_size)}, too large for a JSON settings file"
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        return f"it is not valid JSON ({error})"
    return None
