"""Writing files so that readers never see half of one, hashing them, and reading small JSON objects.

Every writer goes through `atomic_path`: the content is written to a temporary file in the destination folder,
then renamed over the destination (atomic on POSIX and Windows within one file system).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from CTFoundationLib.errors import CTFoundationError, OutputError

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
    """UTF-8 text, written atomically; an unwritable place is an OutputError naming it."""
    try:
        with atomic_write(path, newline="") as handle:
            handle.write(text)
    except OSError as error:
        raise cannot_write(path, error) from None


def cannot_write(path: Path, error: OSError) -> OutputError:
    """The one-line error for a file or folder that cannot be written."""
    return OutputError(f"cannot write {path} ({error.strerror or error}); check the folder, its permissions and the "
                       "free disk space")


def write_json_atomic(path: Path, data: Any, private: bool = False, sort_keys: bool = True) -> None:
    """Indented standard JSON (NaN and infinity refused, as strict readers do), written atomically; an unwritable
    place (OutputError) or a non-finite number (CTFoundationError) is an error naming the file."""
    try:
        text = json.dumps(data, indent=2, sort_keys=sort_keys, ensure_ascii=False, allow_nan=False)
    except ValueError as error:
        raise CTFoundationError(f"cannot write {path}: {error} (a result that is not a number); nothing written") \
            from None
    try:
        with atomic_write(path, private=private) as handle:
            handle.write(text + "\n")
    except OSError as error:
        raise cannot_write(path, error) from None


def read_json_object(path: Path, what: str, error: type[CTFoundationError] = CTFoundationError) -> dict:
    """The JSON object in `path`; else one `error` naming `what` and the file."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as reason:
        raise error(f"{what} {path} cannot be read as JSON ({reason})") from None
    if not isinstance(value, dict):
        raise error(f"{what} {path}: expected a JSON object, got {type(value).__name__}")
    return value


def sha256_file(path: Path, chunk_bytes: int = 8 * 2**20) -> str:
    """sha256 hex digest of a file, read in chunks."""
    hasher = hashlib.sha256()
    with open(path, "rb", buffering=0) as handle:
        while block := handle.read(chunk_bytes):
            hasher.update(block)
    return hasher.hexdigest()


def require_writable_folder(folder: Path, what: str = "output folder") -> None:
    """Create `folder` if needed and prove a file can be written in it; else a CTFoundationError saying so (checked
    before reading inputs or loading models, so an unusable output fails at once)."""
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise OutputError(
            f"{what} {folder}: cannot write there ({error.strerror or error}); choose a folder you can write to"
        ) from None
