"""What the runtimes share: step timing with progress, checkpoint hashes, thresholds files, their cache files."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from CTFoundationLib.errors import CTFoundationError
from CTFoundationLib.io.files import sha256_file, write_json_atomic
from CTFoundationLib.vocab import CT_RATE_ABNORMALITIES
from CTFoundationLib.weights.cache import cache_root, read_json, verified_sha256

Progress = Callable[[str], None]
log = logging.getLogger(__name__)


class StepTimer:
    """Times named steps: tells `notify` (the step's `label`) when one starts and keeps its wall time in `seconds`
    (name -> s, rounded to ms); `current` is the step running or last run."""

    def __init__(self, notify: Progress | None = None, label: Callable[[str], str] = str) -> None:
        self.notify, self.label, self.current = notify or (lambda step: None), label, "start"
        self.seconds: dict[str, float] = {}
        self.started = time.perf_counter()

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self.current = name
        self.notify(self.label(name))
        start = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - start, 3)


def load_thresholds(source: Path | Mapping[str, float] | None, names: Sequence[str] = CT_RATE_ABNORMALITIES) -> dict:
    """Per-finding decision thresholds from a JSON file ({name: value} or {"thresholds": {...}}) or a mapping."""
    if source is None:
        return {}
    if isinstance(source, Mapping):
        table = dict(source)
    else:
        try:
            table = json.loads(Path(source).read_text())
        except (OSError, ValueError) as error:
            raise CTFoundationError(f"thresholds file {source} cannot be read as JSON ({error})") from error
        table = table.get("thresholds", table) if isinstance(table, dict) else None
    if not isinstance(table, dict):
        raise CTFoundationError(f"thresholds {source}: expected a JSON object mapping finding names to numbers")
    unknown = sorted(set(table) - set(names))
    if unknown:
        raise CTFoundationError(f"thresholds {source}: unknown findings {unknown}; use the names {list(names)}")
    bad = {k: v for k, v in table.items()
           if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0}
    if bad:
        raise CTFoundationError(f"thresholds {source}: values must be probabilities in [0, 1], got {bad}")
    return {name: float(value) for name, value in table.items()}


def file_sha256(path: Path, cache_file: Path | None = None) -> str:
    """sha256 of a file: the one the weights manager verified for an unchanged installed file, else computed and
    remembered in `cache_file` by (path, size, mtime) so that big checkpoints are hashed once."""
    recorded = verified_sha256(path)
    if recorded:
        return recorded
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    known = read_json(cache_file, {}) if cache_file else {}
    if key in known:
        return known[key]
    digest = sha256_file(path)
    if cache_file:
        known[key] = digest
        write_json_atomic(cache_file, known)
    return digest


def default_cache_dir() -> Path:
    """Runtime caches (prompt latents, checkpoint hashes) inside the weights cache ($CTFOUNDATION_HOME)."""
    return cache_root() / "runtime"


def cached_tensor(path: Path, name: str, shape: tuple[int, ...] | None = None) -> torch.Tensor | None:
    """Tensor `name` of a cache file this program wrote; None when the file is absent or damaged (unreadable, or
    not of `shape`): a damaged cache file is removed, logged and computed again, never trusted or fatal."""
    if not path.is_file():
        return None
    try:
        tensor = load_file(path)[name]
    except (SafetensorError, OSError, KeyError) as error:
        problem = f"unreadable ({error})"
    else:
        if shape is None or tuple(tensor.shape) == tuple(shape):
            return tensor
        problem = f"of shape {tuple(tensor.shape)}, not {tuple(shape)}"
    log.warning("cache file %s is %s; computing it again", path, problem)
    path.unlink(missing_ok=True)
    return None
