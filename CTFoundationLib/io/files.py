"""Writing files so that readers never see half of one, and hashing them.

Every writer goes through `atomic_path`: the content is written to a temporary file in the destination folder,
then renamed over the destination (atomic on POSIX and Windows within one file system).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from CTFoundationLib.errors import CTFoundationError

TEMPORARY_SUFFIX = ".tmp"


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path`, on any failure it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}{TEMPORARY_SUFFIX}")
    try:
        yield temporary
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_write(path: Path, mode: str = "w", private: bool = False, **open_options: Any) -> Iterator[IO]:
    """An open handle ('w' text, UTF-8 unless told, or 'wb') whose content appears at `path` only when complete.

    The file gets the usual permissions (umask), or owner-only ones when `private`.
    """
    if "b" not in mode:
        open_options.setdefault("encoding", "utf-8")
    with atomic_path(path) as temporary:
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o666)
        with os.fdopen(descriptor, mode, **open_options) as handle:
            yield handle


def write_text_atomic(path: Path, text: str) -> None:
    """UTF-8 text, written atomically (OSError on failure)."""
    with atomic_write(path, newline="") as handle:
        handle.write(text)


def write_json_atomic(path: Path, data: Any, private: bool = False, sort_keys: bool = True) -> None:
    """Indented JSON, written atomically; an unwritable place is a CTFoundationError naming it."""
    try:
        with atomic_write(path, private=private) as handle:
            json.dump(data, handle, indent=2, sort_keys=sort_keys, ensure_ascii=False)
            handle.write("\n")
    except OSError as error:
        raise CTFoundationError(
            f"cannot write {path} ({error.strerror or error}); check the folder and its permissions"
        ) from None


def sha256_file(path: Path, chunk_bytes: int = 8 * 2**20) -> str:
    """sha256 hex digest of a file, read in chunks."""
    hasher = hashlib.sha256()
    with open(path, "rb", buffering=0) as handle:
        while block := handle.read(chunk_bytes):
            hasher.update(block)
    return hasher.hexdigest()
