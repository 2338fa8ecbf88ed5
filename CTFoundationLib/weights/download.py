"""Downloading model weights: streamed, hashed on the fly, resumable from `*.part`, verified before use.

A file is written to `<name>.part` (with `<name>.part.json` remembering what it should become), hashed while
it arrives, and renamed into place only when its sha256 matches. After an interruption the bytes already
in `.part` are hashed once and the transfer continues with an HTTP Range request. A checksum mismatch sets
the data aside as `<name>.corrupt`; it is never used.

A server that does not answer costs at most the connect or read timeout per try; each retry is announced with
what is retried and why, and a file that makes no progress for `deadline_s` ($CTFOUNDATION_DOWNLOAD_DEADLINE_S)
is given up. Ctrl-C (KeyboardInterrupt) is never caught here: it ends a read or a pause at once.
"""

from __future__ import annotations

import errno
import hashlib
import os
import queue
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from urllib.parse import urlsplit

import requests
import urllib3

from CTFoundationLib.errors import WeightsError
from CTFoundationLib.io.files import write_json_atomic
from CTFoundationLib.weights.cache import (
    CORRUPT_SUFFIX,
    PART_SUFFIX,
    FileRecord,
    Manifest,
    get_token,
    model_dir,
    now_iso,
    read_json,
)
from CTFoundationLib.weights.hub import (
    CONNECT_TIMEOUT_S,
    READ_TIMEOUT_S,
    NotFoundError,
    Remote,
    RetryableError,
    auth_headers,
    check_response,
    connection_trouble,
    display_url,
    folder_remotes,
    head_metadata,
    list_folder,
    next_step,
    resolve_url,
    short_reason,
)
from CTFoundationLib.weights.registry import FileSpec, ModelSpec, Registry

CHUNK_BYTES = 8 * 1024 * 1024  # bytes per write + hash update
READ_PIECE_BYTES = 256 * 1024  # most bytes taken from the socket per read (measured best on loopback)
MAX_BACKOFF_S = 60.0
USER_AGENT = "ctfoundation-weights"
DEADLINE_ENV = "CTFOUNDATION_DOWNLOAD_DEADLINE_S"
DEFAULT_DEADLINE_S = 180.0

ProgressFn = Callable[[int, "int | None"], None]


def deadline_from_environment() -> float:
    """$CTFOUNDATION_DOWNLOAD_DEADLINE_S, else 180: the seconds one file may go without progress."""
    raw = os.environ.get(DEADLINE_ENV, "").strip()
    if not raw:
        return DEFAULT_DEADLINE_S
    try:
        seconds = float(raw)
    except ValueError:
        seconds = float("nan")
    if not seconds > 0:
        raise WeightsError(f"{DEADLINE_ENV}={raw!r} is not a positive number of seconds; set e.g. 300 or unset it")
    return seconds


@dataclass
class DownloadOptions:
    """How to download. `progress(done_bytes, total_bytes)` is called per file (total None if unknown).

    A try waits at most `connect_timeout_s` for a connection and `read_timeout_s` for each answer or piece of
    data; a file is given up after `retries` failed tries in a row or `deadline_s` without progress.
    """

    retries: int = 5
    backoff_s: float = 1.0
    connect_timeout_s: float = CONNECT_TIMEOUT_S
    read_timeout_s: float = READ_TIMEOUT_S
    deadline_s: float = field(default_factory=deadline_from_environment)
    chunk_bytes: int = CHUNK_BYTES
    progress: ProgressFn | None = None
    on_file: Callable[[str, int | None], None] | None = None  # a file starts: (name, size)
    on_event: Callable[[str], None] | None = None  # one-line notes: skipped, resuming, ...
    session: requests.Session | None = None

    def event(self, message: str) -> None:
        if self.on_event:
            self.on_event(message)


def mib(n: int | None) -> str:
    return "unknown size" if n is None else f"{n / 2**20:,.1f} MiB"


# --- planning ----------------------------------------------------------------------------------------


def plan_model(
    spec: ModelSpec, registry: Registry, session: requests.Session, token: str | None, options: DownloadOptions
) -> tuple[list[Remote], dict[str, tuple[str, list[str]]]]:
    """The concrete files to fetch for a model, and the Hub folders they were expanded from."""
    remotes: list[Remote] = []
    folders: dict[str, tuple[str, list[str]]] = {}
    for file in spec.files:
        if file.source.type in ("manual", "local"):
            raise WeightsError(manual_message(spec, file))
        if file.folder:
            headers = _base_headers(token, True)
            listing = partial(list_folder, session, registry.endpoint, file, spec, headers)
            folder, entries = _retrying(listing, f"{spec.id}/{file.name} (file list)", spec, options)
            found = folder_remotes(registry.endpoint, file, folder, entries, auth=True)
            folders[file.name] = (f"hf:{file.source.repo}@{file.source.revision}/{folder}", [r.rel for r in found])
            remotes.extend(found)
        else:
            remote = _plan_file(spec, file, registry, session, token, options)
            if remote is not None:
                remotes.append(remote)
    return remotes, folders


def _plan_file(
    spec: ModelSpec, file: FileSpec, registry: Registry, session: requests.Session, token: str | None,
    options: DownloadOptions,
) -> Remote | None:
    """One file: its URL plus expected sha256/size (registry first, else the Hub's HEAD metadata)."""
    hf = file.source.type == "hf"
    url = resolve_url(registry.endpoint, file.source) if hf else file.source.url
    auth = hf or file.source.auth
    sha, size, origin = file.sha256, file.size, "registry" if file.sha256 else "computed"
    if sha is None or size is None:
        headers = _base_headers(token, auth)
        try:
            metadata = partial(head_metadata, session, url, headers, spec, f"'{file.name}'")
            hub_sha, hub_size = _retrying(metadata, f"{spec.id}/{file.name}", spec, options)
        except NotFoundError:
            if file.optional:
                options.event(f"{spec.id}: optional file {file.name} is not on the server; skipped")
                return None
            raise
        if sha is None and hub_sha:
            sha, origin = hub_sha, "hub"
        size = size if size is not None else hub_size
    return Remote(file.name, url, sha, size, origin, auth, file.optional)


def manual_message(spec: ModelSpec, file: FileSpec) -> str:
    if file.source.type == "local":
        return f"model '{spec.id}' is built on this machine, not downloaded: run `{file.source.command}`"
    return (
        f"model '{spec.id}' cannot be downloaded automatically: {file.source.instructions} "
        f"(source: {file.source.url}; the file is placed as '{file.name}')"
    )


def _base_headers(token: str | None, auth: bool) -> dict[str, str]:
    return {"User-Agent": USER_AGENT, **auth_headers(token, auth)}


class Attempts:
    """The tries at one file (or file list): each retry announced with what and why, after a growing pause.

    There is no next try after `retries` failures in a row, or when it would start `deadline_s` after the last
    progress; the timeouts of a try are cut to the time left, so giving up comes within the deadline.
    """

    def __init__(self, what: str, options: DownloadOptions):
        self.what, self.options = what, options
        self.failures = 0
        self.last_progress = time.monotonic()

    def timeout(self) -> tuple[float, float]:
        """(connect, read) timeouts for the next request."""
        left = max(0.01, self.options.deadline_s - (time.monotonic() - self.last_progress))
        return min(self.options.connect_timeout_s, left), min(self.options.read_timeout_s, left)

    def progressed(self) -> None:
        self.failures, self.last_progress = 0, time.monotonic()

    def pause_or_stop(self, error: RetryableError) -> str | None:
        """Announce the retry and pause before it (None), or say why there is none."""
        self.failures += 1
        retries, deadline = self.options.retries, self.options.deadline_s
        delay = min(MAX_BACKOFF_S, self.options.backoff_s * 2 ** (self.failures - 1))
        if error.retry_after is not None:
            delay = min(MAX_BACKOFF_S, max(delay, error.retry_after))
        idle = time.monotonic() - self.last_progress
        if self.failures > retries:
            return f"gave up after {self.failures} tries in a row" if retries else "no retries were asked for"
        if idle + delay >= deadline:
            return f"gave up after {idle:.1f} s without progress; {DEADLINE_ENV} allows {deadline:g} s"
        self.options.event(f"{self.what}: {error}; retrying in {delay:g} s (retry {self.failures} of {retries})")
        time.sleep(delay)  # Ctrl-C ends it at once (KeyboardInterrupt)
        return None


def _retrying(call: Callable, what: str, spec: ModelSpec, options: DownloadOptions):
    """`call(timeout)`, retried on RetryableError as `Attempts` allows; then a WeightsError saying why."""
    attempts = Attempts(what, options)
    while True:
        try:
            return call(attempts.timeout())
        except RetryableError as error:
            stop = attempts.pause_or_stop(error)
            if stop:
                raise WeightsError(f"model '{spec.id}': {error}; {stop}; {next_step(spec, error)}") from None


# --- one file ------------------------------------------------------------------------------------------


class PartFile:
    """The growing `.part` file: bytes written so far and their running sha256."""

    def __init__(self, dest: Path, remote: Remote):
        self.dest = dest
        self.path = dest.with_name(dest.name + PART_SUFFIX)
        self.meta = dest.with_name(dest.name + PART_SUFFIX + ".json")
        self.hasher = hashlib.sha256()
        self.done = 0
        self.expect = {"sha256": remote.sha256, "size": remote.size}

    def resume(self, chunk_bytes: int, options: DownloadOptions) -> None:
        """Reuse bytes from an earlier attempt when they are for the same file: hash them once."""
        if not self.path.is_file():
            return
        before = read_json(self.meta, {})
        same = all(before.get(k) in (None, v) or v is None for k, v in self.expect.items())
        size = self.path.stat().st_size
        if not same or (self.expect["size"] is not None and size > self.expect["size"]):
            self.restart()
            return
        options.event(f"resuming {self.dest.name}: checking the {mib(size)} already downloaded")
        with open(self.path, "rb", buffering=0) as handle:
            while block := handle.read(chunk_bytes):
                self.hasher.update(block)
                self.done += len(block)

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.meta, self.expect)

    def restart(self) -> None:
        """Forget the bytes so far (the server would not resume, or they belong to another version)."""
        self.path.unlink(missing_ok=True)
        self.hasher = hashlib.sha256()
        self.done = 0

    def write(self, handle, chunk: bytes) -> None:
        """Append one chunk and hash it; disk-full becomes an honest error (the part is kept for resume)."""
        view = memoryview(chunk)
        try:
            while view:
                view = view[handle.write(view):]
        except OSError as error:
            if error.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
                free = shutil.disk_usage(self.path.parent).free
                raise WeightsError(
                    f"disk full while writing {self.path} ({mib(free)} free): free some space or set CTFOUNDATION_HOME "
                    f"to a larger disk, then run the same command again to resume ({mib(self.done)} kept)"
                ) from None
            reason = error.strerror or error
            raise WeightsError(f"cannot write {self.path}: {reason}; check the disk and try again") from None
        self.hasher.update(chunk)
        self.done += len(chunk)

    def finish(self, remote: Remote, model_id: str) -> FileRecord:
        """Check size and sha256, then rename into place; a mismatch is set aside as `.corrupt`."""
        digest = self.hasher.hexdigest()
        wrong_size = remote.size is not None and self.done != remote.size
        if wrong_size or (remote.sha256 and digest != remote.sha256):
            corrupt = self.dest.with_name(self.dest.name + CORRUPT_SUFFIX)
            os.replace(self.path, corrupt)
            self.meta.unlink(missing_ok=True)
            got = f"{self.done} bytes" if wrong_size else f"sha256 {digest}"
            want = f"{remote.size} bytes" if wrong_size else f"sha256 {remote.sha256}"
            raise WeightsError(
                f"checksum mismatch for '{remote.rel}' of model '{model_id}': expected {want}, got {got}. "
                f"The data was set aside as {corrupt} and is not used; run the download again "
                f"(if it fails the same way, the source or the registry entry is wrong)"
            )
        with open(self.path, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(self.path, self.dest)
        self.meta.unlink(missing_ok=True)
        origin = remote.hash_origin if remote.sha256 else "computed"
        return FileRecord(digest, self.done, now_iso(), display_url(remote.url), origin, self.dest.stat().st_mtime_ns)


def fetch_file(
    session: requests.Session, remote: Remote, dest: Path, spec: ModelSpec, token: str | None,
    options: DownloadOptions,
) -> FileRecord:
    """Download one file to `dest` with resume and retries; return its verified record."""
    part = PartFile(dest, remote)
    part.resume(options.chunk_bytes, options)
    part.start()
    attempts = Attempts(f"{spec.id}/{remote.rel}", options)
    while True:
        before = part.done
        try:
            _transfer(session, remote, part, spec, token, options, attempts.timeout())
            return part.finish(remote, spec.id)
        except RetryableError as error:
            if part.done > before:
                attempts.progressed()
            stop = attempts.pause_or_stop(error)
            if stop:
                raise WeightsError(_gave_up(spec, remote, part, error, stop)) from None


def _gave_up(spec: ModelSpec, remote: Remote, part: PartFile, error: RetryableError, stop: str) -> str:
    if part.done == 0:
        return f"could not get '{remote.rel}' of model '{spec.id}': {error}; {stop}; {next_step(spec, error)}"
    return (
        f"download of '{remote.rel}' of model '{spec.id}' stopped after {mib(part.done)} of {mib(remote.size)} "
        f"({error}; {stop}); the partial file is kept: run the same command again to resume"
    )


def _transfer(
    session: requests.Session, remote: Remote, part: PartFile, spec: ModelSpec, token: str | None,
    options: DownloadOptions, timeout: tuple[float, float],
) -> None:
    """One GET from `part.done` to the end (or to the first failure)."""
    headers = {**_base_headers(token, remote.auth), "Accept-Encoding": "identity"}
    if part.done:
        headers["Range"] = f"bytes={part.done}-"
    try:
        response = session.get(remote.url, headers=headers, stream=True, timeout=timeout)
    except (requests.ConnectionError, requests.Timeout) as error:
        raise connection_trouble(error, remote.url, timeout) from None
    with response:
        if not _accept_range(response, part, remote):
            return
        check_response(response, spec, f"'{remote.rel}'", bool(token) and remote.auth)
        total = _total(response, part.done, remote.size)
        _stream(response, part, total, options, timeout[1])


def _accept_range(response: requests.Response, part: PartFile, remote: Remote) -> bool:
    """Reconcile the answer with a resume request. False: nothing more to read (already complete)."""
    if response.status_code == 416 and part.done:
        if remote.size is None or part.done == remote.size:
            return False
        part.restart()
        raise RetryableError("the server refused to resume; starting the file again")
    if part.done and response.status_code == 200:
        part.restart()  # the server ignored the Range header and sends everything
    elif response.status_code == 206:
        start = response.headers.get("Content-Range", "").removeprefix("bytes ").split("-")[0]
        if start != str(part.done):
            part.restart()
            raise RetryableError("the server resumed at the wrong offset; starting the file again")
    return True


def _total(response: requests.Response, done: int, expected: int | None) -> int | None:
    length = response.headers.get("Content-Length")
    return done + int(length) if length and length.isdigit() else expected


def _stream(
    response: requests.Response, part: PartFile, total: int | None, options: DownloadOptions, read_timeout: float
) -> None:
    """Copy the body into the part file, hashing it; bytes that arrived before a failure are kept.

    The socket is read on this thread while a helper thread hashes and writes the previous chunks.
    """
    host = urlsplit(response.url).hostname
    encoding = response.headers.get("Content-Encoding", "identity").lower()
    if encoding not in ("", "identity"):
        raise WeightsError(
            f"{display_url(response.url)} sent the file {encoding}-encoded although plain bytes were asked for; "
            f"use a server or mirror that serves files as they are"
        )
    read = _reader(response.raw, min(READ_PIECE_BYTES, options.chunk_bytes))
    pending = bytearray()
    _report(options, part, total)
    with open(part.path, "ab", buffering=0) as handle:
        writer = _Writer(part, handle)
        try:
            while True:
                try:
                    piece = read()
                except (urllib3.exceptions.HTTPError, OSError) as error:
                    writer.put(pending)
                    writer.close()
                    if isinstance(error, urllib3.exceptions.ReadTimeoutError):
                        raise RetryableError(f"no data from {host} for {read_timeout:g} s (read timeout)") from None
                    raise RetryableError(f"connection to {host} lost ({short_reason(error)})") from None
                if not piece:
                    break
                pending += piece
                if len(pending) >= options.chunk_bytes:
                    writer.put(pending)
                    pending = bytearray()
                    _report(options, part, total)
            writer.put(pending)
        finally:
            writer.close()
    _report(options, part, total)


def _report(options: DownloadOptions, part: PartFile, total: int | None) -> None:
    if options.progress:
        options.progress(part.done, total)


class _Writer:
    """Hashes and writes chunks on a helper thread; its first error is raised to the reading thread."""

    def __init__(self, part: PartFile, handle, depth: int = 3):
        self.part, self.handle = part, handle
        self.queue: queue.Queue[bytearray | None] = queue.Queue(depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="ctfoundation-weights-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (chunk := self.queue.get()) is not None:
            if self.error is None and chunk:
                try:
                    self.part.write(self.handle, chunk)
                except BaseException as error:  # handed to the reading thread
                    self.error = error

    def put(self, chunk: bytearray) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put(chunk)

    def close(self) -> None:
        """Wait until everything queued is written; raise the writer's error if it had one."""
        if self.thread.is_alive():
            self.queue.put(None)
            self.thread.join()
        if self.error is not None:
            error, self.error = self.error, None
            raise error


def _reader(raw, piece: int) -> Callable[[], bytes]:
    """Read what has arrived (up to `piece` bytes) without waiting to fill a whole chunk.

    urllib3's read(n) keeps reading until it has n bytes and drops them all if the connection breaks
    on the way; read1 hands over each piece as it comes, so an interruption loses nothing.
    """
    if hasattr(raw, "read1"):
        return lambda: raw.read1(piece, decode_content=False)
    return lambda: raw.read(piece, decode_content=False)  # older urllib3: at most `piece` bytes lost on a cut


# --- whole models --------------------------------------------------------------------------------------


@contextmanager
def model_lock(folder: Path) -> Iterator[None]:
    """Keep two processes from downloading into the same model folder at once (POSIX; no-op elsewhere)."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(folder / ".lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise WeightsError(f"another process is writing {folder}; wait for it to finish") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def download_files(
    spec: ModelSpec, registry: Registry, home: Path | str | None, options: DownloadOptions
) -> Path:
    """Fetch every missing or unverified file of one model (no dependencies, no licence check)."""
    if options.session is None:
        with requests.Session() as session:
            return _download_files(spec, registry, home, options, session)
    return _download_files(spec, registry, home, options, options.session)


def _download_files(
    spec: ModelSpec, registry: Registry, home: Path | str | None, options: DownloadOptions,
    session: requests.Session,
) -> Path:
    token = get_token(home)
    folder = model_dir(spec.id, home)
    with model_lock(folder):
        remotes, folders = plan_model(spec, registry, session, token, options)
        manifest = Manifest(spec.id, home)
        todo = [r for r in remotes if not _already_verified(manifest, r)]
        for remote in remotes:
            if remote not in todo:
                options.event(f"{spec.id}: {remote.rel} already verified")
        _check_space(folder, todo)
        for remote in todo:
            if options.on_file:
                options.on_file(remote.rel, remote.size)
            record = fetch_file(session, remote, folder / remote.rel, spec, token, options)
            manifest.record_file(remote.rel, record)
            manifest.save()
        for name, (source, members) in folders.items():
            manifest.record_folder(name, source, members)
        manifest.save()
    return folder


def _already_verified(manifest: Manifest, remote: Remote) -> bool:
    record = manifest.files.get(remote.rel)
    if record is None or not manifest.file_ok(remote.rel):
        return False
    return remote.sha256 in (None, record.sha256) and remote.size in (None, record.size)


def _check_space(folder: Path, todo: list[Remote]) -> None:
    """Refuse to start when the known remaining bytes do not fit on the disk."""
    needed = 0
    for remote in todo:
        if remote.size is not None:
            part = folder / (remote.rel + PART_SUFFIX)
            needed += max(0, remote.size - (part.stat().st_size if part.is_file() else 0))
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise WeightsError(
            f"not enough disk space in {folder}: {mib(needed)} still to download, {mib(free)} free; "
            f"free some space or set CTFOUNDATION_HOME to a larger disk"
        )
