"""The local weights cache: a folder per model, a manifest of what was verified, settings, licence acknowledgements.

Layout under the cache root ($CTFOUNDATION_HOME, default ~/.cache/ctfoundation, or a root the caller passes):

    settings.json              {"hf_token": "..."} (owner-only permissions; optional)
    licenses.json              licence id -> when it was acknowledged
    models/<model-id>/         the model's files, `*.part` while downloading, `*.corrupt` when set aside
    models/<model-id>/manifest.json
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from CTFoundationLib.errors import WeightsError
from CTFoundationLib.io.files import write_json_atomic
from CTFoundationLib.weights.registry import License

MANIFEST = "manifest.json"
PART_SUFFIX = ".part"
CORRUPT_SUFFIX = ".corrupt"


def cache_root(home: Path | str | None = None) -> Path:
    """The cache root: `home` if given, else $CTFOUNDATION_HOME, else ~/.cache/ctfoundation."""
    if home is not None:
        return Path(home).expanduser()
    env = os.environ.get("CTFOUNDATION_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ctfoundation"


def model_dir(model_id: str, home: Path | str | None = None) -> Path:
    """The folder that holds one model's files."""
    return cache_root(home) / "models" / model_id


def now_iso() -> str:
    """Current UTC time, ISO 8601, to the second."""
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def read_json(path: Path, default: Any) -> Any:
    """Parse a cache JSON file; `default` when absent. A damaged file is an error that names it."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return default
    except (OSError, ValueError) as error:
        raise WeightsError(f"cache file {path} is damaged ({error}); delete it and run the command again") from None
    if not isinstance(data, type(default)):
        raise WeightsError(f"cache file {path} is damaged (not a JSON {type(default).__name__}); delete it and "
                           "run the command again")
    return data


@dataclass
class FileRecord:
    """What the manifest knows about one verified file."""

    sha256: str
    size: int
    verified_at: str
    source: str
    hash_origin: str  # "registry", "hub" (LFS metadata), or "computed" (no published hash)
    mtime_ns: int | None = None  # the file's modification time when verified (older manifests: unknown)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


class Manifest:
    """The per-model manifest: verified files and expanded Hub folders."""

    def __init__(self, model_id: str, home: Path | str | None = None):
        self.model_id = model_id
        self.dir = model_dir(model_id, home)
        self.path = self.dir / MANIFEST
        raw = read_json(self.path, {})
        self.files: dict[str, FileRecord] = {k: FileRecord(**v) for k, v in raw.get("files", {}).items()}
        self.folders: dict[str, dict[str, Any]] = raw.get("folders", {})

    def record_file(self, rel: str, record: FileRecord) -> None:
        self.files[rel] = record

    def record_folder(self, name: str, source: str, members: list[str]) -> None:
        """Remember which files a Hub folder expanded to (so status works offline)."""
        self.folders[name] = {"source": source, "files": sorted(members), "listed_at": now_iso()}

    def forget(self, rel: str) -> None:
        self.files.pop(rel, None)

    def save(self) -> None:
        data = {
            "format": 1,
            "model_id": self.model_id,
            "updated": now_iso(),
            "files": {k: v.to_json() for k, v in sorted(self.files.items())},
            "folders": self.folders,
        }
        write_json_atomic(self.path, data)

    def file_ok(self, rel: str) -> bool:
        """Recorded, present and of the recorded size (the cheap check; `verify` re-hashes)."""
        record = self.files.get(rel)
        target = self.dir / rel
        return record is not None and target.is_file() and target.stat().st_size == record.size


def verified_sha256(path: Path) -> str | None:
    """The sha256 the weights manager verified for an installed file, when the file is still the one it verified
    (same size and modification time); None otherwise, so that the caller hashes it (big checkpoints hash once)."""
    path = Path(path).absolute()
    for folder in path.parents[:3]:
        if (folder / MANIFEST).is_file():
            try:
                record = read_json(folder / MANIFEST, {}).get("files", {}).get(path.relative_to(folder).as_posix())
                stat = path.stat()
            except (WeightsError, OSError):
                return None
            same = isinstance(record, dict) and record.get("mtime_ns") == stat.st_mtime_ns
            return record.get("sha256") if same and record.get("size") == stat.st_size else None
    return None


# --- settings and token ---------------------------------------------------------------------------


def settings_path(home: Path | str | None = None) -> Path:
    return cache_root(home) / "settings.json"


def get_token(home: Path | str | None = None) -> str | None:
    """The Hugging Face token: $HF_TOKEN, else `hf_token` in the cache settings file, else None."""
    token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    if token:
        return token.strip()
    stored = read_json(settings_path(home), {}).get("hf_token")
    return stored.strip() if isinstance(stored, str) and stored.strip() else None


def token_source(home: Path | str | None = None) -> str:
    """Where the token comes from, for status output (never the token itself)."""
    if os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN"):
        return "HF_TOKEN environment variable"
    return f"settings file {settings_path(home)}" if get_token(home) else "none"


def save_token(token: str | None, home: Path | str | None = None) -> Path:
    """Store (or with None, remove) the token in the settings file, readable by the owner only."""
    path = settings_path(home)
    settings = read_json(path, {})
    if token:
        settings["hf_token"] = token.strip()
    else:
        settings.pop("hf_token", None)
    write_json_atomic(path, settings, private=True)
    return path


# --- licence acknowledgements --------------------------------------------------------------------


def _licenses_path(home: Path | str | None) -> Path:
    return cache_root(home) / "licenses.json"


def is_license_acknowledged(license_: License, home: Path | str | None = None) -> bool:
    """True when the licence needs no acknowledgement or was acknowledged once already."""
    return not license_.acknowledge or license_.id in read_json(_licenses_path(home), {})


def acknowledge_license(license_: License, home: Path | str | None = None) -> None:
    """Record once that the user read and accepted this licence."""
    path = _licenses_path(home)
    data = read_json(path, {})
    data.setdefault(license_.id, {"name": license_.name, "url": license_.url, "acknowledged_at": now_iso()})
    write_json_atomic(path, data)
