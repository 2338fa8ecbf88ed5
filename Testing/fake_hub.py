"""A small Hugging Face Hub look-alike on 127.0.0.1 for tests and benchmarks.

It serves real files with HTTP Range support the way the Hub does:
- `[datasets/]<repo>/resolve/<rev>/<path>`: HEAD of an LFS file answers 302 with `X-Linked-Etag` (sha256)
  and `X-Linked-Size`; GET redirects to `/cdn/<sha256>`. Small (non-LFS) files are served directly with
  a git-style `ETag`.
- `/api/<type>s/<repo>/tree/<rev>/<folder>`: the folder's entries, paginated with `Link: rel="next"`.
- `/plain/<name>`: a plain file server (no Hub headers, no HEAD).

Per-file switches (`FakeHub.behave(path, mode)`): "cut" (stop half-way, once), "cut_always", "401", "403",
"bad_token" (401 for an invalid token), "404", "corrupt" (one byte flipped), "short" (a whole answer one byte
short of the published size), "500", "500_once", "no_range" (ignore Range). Bytes served are counted per
repository path in `served`; request headers are logged in `requests_seen`.

`SilentServer` accepts connections on 127.0.0.1 and never answers, as a hung server or proxy does.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

COPY_CHUNK = 1 << 20
STALL_SECONDS = 5  # how long a "stall" transfer holds the connection open after half the file


@dataclass
class HubFile:
    repo_type: str
    repo: str
    revision: str
    path: str
    disk: Path
    size: int
    sha256: str
    lfs: bool


class FakeHub:
    """State of the fake server: files, behaviours, counters."""

    def __init__(self, storage: Path, page_size: int = 1000):
        self.storage = storage
        self.files: dict[tuple[str, str, str, str], HubFile] = {}
        self.by_sha: dict[str, HubFile] = {}
        self.plain: dict[str, HubFile] = {}
        self.modes: dict[str, str] = {}
        self.fired: set[str] = set()
        self.served: dict[str, int] = defaultdict(int)
        self.requests_seen: list[tuple[str, str, dict[str, str]]] = []
        self.page_size = page_size
        self.lock = threading.Lock()
        self.server: ThreadingHTTPServer | None = None

    # --- content ---
    def add(self, repo: str, path: str, data: bytes | Path, *, repo_type: str = "model", revision: str = "main",
            lfs: bool = True) -> HubFile:
        """Publish a file (bytes, or an existing file on disk for big ones)."""
        disk = data if isinstance(data, Path) else self._store(data)
        entry = HubFile(repo_type, repo, revision, path, disk, disk.stat().st_size, _sha256(disk), lfs)
        self.files[(repo_type, repo, revision, path)] = entry
        self.by_sha[entry.sha256] = entry
        return entry

    def add_plain(self, name: str, data: bytes | Path) -> HubFile:
        disk = data if isinstance(data, Path) else self._store(data)
        entry = HubFile("plain", "", "", name, disk, disk.stat().st_size, _sha256(disk), False)
        self.plain[name] = entry
        return entry

    def _store(self, data: bytes) -> Path:
        self.storage.mkdir(parents=True, exist_ok=True)
        disk = self.storage / hashlib.sha256(data).hexdigest()
        disk.write_bytes(data)
        return disk

    def behave(self, path: str, mode: str | None) -> None:
        if mode is None:
            self.modes.pop(path, None)
        else:
            self.modes[path] = mode
        self.fired.discard(path)

    def mode(self, path: str) -> str | None:
        """The active switch for a path; the '*_once'/'cut' modes fire only once."""
        with self.lock:
            mode = self.modes.get(path)
            if mode in ("cut", "500_once"):
                if path in self.fired:
                    return None
                self.fired.add(path)
            return mode

    # --- server ---
    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            state = hub

        self.server = _QuietServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


def _sha256(path: Path) -> str:
    hasher = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(COPY_CHUNK * 8):
            hasher.update(block)
    return hasher.hexdigest()


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:  # clients hanging up are expected here
        pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    state: FakeHub

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    # --- dispatch ---
    def do_HEAD(self) -> None:
        self._dispatch(head=True)

    def do_GET(self) -> None:
        self._dispatch(head=False)

    def _dispatch(self, head: bool) -> None:
        self.state.requests_seen.append((self.command, self.path, dict(self.headers)))
        parts = urlsplit(self.path)
        path = unquote(parts.path)
        if path.startswith("/api/"):
            return self._tree(path, parse_qs(parts.query))
        if path.startswith("/cdn/"):
            entry = self.state.by_sha.get(path[len("/cdn/"):])
            return self._body(entry, head) if entry else self._status(404)
        if path.startswith("/plain/"):
            if head:
                return self._status(405)
            entry = self.state.plain.get(path[len("/plain/"):])
            return self._body(entry, head) if entry else self._status(404)
        return self._resolve(path, head)

    # --- endpoints ---
    def _resolve(self, path: str, head: bool) -> None:
        dataset = path.startswith("/datasets/")
        repo_type, rest = ("dataset", path[len("/datasets/"):]) if dataset else ("model", path[1:])
        bits = rest.split("/")
        if len(bits) < 5 or bits[2] != "resolve":
            return self._status(404)
        key = (repo_type, f"{bits[0]}/{bits[1]}", bits[3], "/".join(bits[4:]))
        entry = self.state.files.get(key)
        if entry is None:
            return self._status(404, {"X-Error-Code": "EntryNotFound"})
        mode = self.state.modes.get(entry.path)
        if mode in ("401", "403"):
            return self._status(int(mode), {"X-Error-Code": "GatedRepo", "X-Error-Message": "Access restricted"})
        if mode == "bad_token":
            return self._status(401, {"X-Error-Message": "Invalid credentials in Authorization header"})
        if mode == "404":
            return self._status(404, {"X-Error-Code": "EntryNotFound"})
        if not entry.lfs:
            return self._body(entry, head, {"ETag": f'"{entry.sha256[:40]}"', "X-Repo-Commit": "0" * 40})
        self.send_response(302)
        self.send_header("Location", f"/cdn/{entry.sha256}")
        self.send_header("X-Linked-Etag", f'"{entry.sha256}"')
        self.send_header("X-Linked-Size", str(entry.size))
        self.send_header("ETag", f'"{entry.sha256[:40]}"')
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _tree(self, path: str, query: dict) -> None:
        bits = path.split("/")  # '', api, <type>s, owner, name, tree, rev, folder...
        if len(bits) < 7 or bits[5] != "tree":
            return self._status(404)
        repo_type, repo, rev = bits[2].rstrip("s"), f"{bits[3]}/{bits[4]}", bits[6]
        folder = "/".join(bits[7:]).strip("/")
        entries = self._entries(repo_type, repo, rev, folder)
        if entries is None:
            return self._status(404, {"X-Error-Code": "EntryNotFound"})
        start = int(query.get("cursor", ["0"])[0])
        page = entries[start:start + self.state.page_size]
        headers = {"Content-Type": "application/json"}
        if start + self.state.page_size < len(entries):
            headers["Link"] = f'<{self.state.url}{path}?cursor={start + self.state.page_size}>; rel="next"'
        self._bytes(json.dumps(page).encode(), headers)

    def _entries(self, repo_type: str, repo: str, rev: str, folder: str) -> list[dict] | None:
        prefix = f"{folder}/" if folder else ""
        files, dirs = [], set()
        for (t, r, v, p), entry in self.state.files.items():
            if (t, r, v) != (repo_type, repo, rev) or not p.startswith(prefix):
                continue
            below = p[len(prefix):]
            if "/" in below:
                dirs.add(prefix + below.split("/")[0])
                continue
            item = {"type": "file", "oid": entry.sha256[:40], "size": entry.size, "path": p}
            if entry.lfs:
                item["lfs"] = {"oid": entry.sha256, "size": entry.size, "pointerSize": 134}
            files.append(item)
        if not files and not dirs:
            return None
        return sorted(({"type": "directory", "oid": "0" * 40, "size": 0, "path": d} for d in dirs),
                      key=lambda e: e["path"]) + sorted(files, key=lambda e: e["path"])

    # --- bodies ---
    def _body(self, entry: HubFile, head: bool, extra: dict[str, str] | None = None) -> None:
        mode = None if head else self.state.mode(entry.path)  # HEAD never triggers a switch
        if mode in ("500", "500_once"):
            return self._status(500)
        size = entry.size - 1 if mode == "short" else entry.size
        start, end, partial = self._range(size, mode)
        if start is None:
            return self._status(416, {"Content-Range": f"bytes */{size}"})
        self.send_response(206 if partial else 200)
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(end - start))
        if partial:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
        self.end_headers()
        if head:
            return
        limit = end - start
        if mode in ("cut", "cut_always", "stall"):
            limit = max(0, min(limit, entry.size // 2 - start))
            self.close_connection = True
        self._send(entry, start, limit, corrupt=(mode == "corrupt"))
        if mode == "stall":  # keep the connection open without sending, as a hung transfer does
            time.sleep(STALL_SECONDS)

    def _range(self, size: int, mode: str | None) -> tuple[int | None, int, bool]:
        header = self.headers.get("Range", "")
        if not header.startswith("bytes=") or mode == "no_range":
            return 0, size, False
        first, _, last = header[len("bytes="):].partition("-")
        start = int(first)
        end = int(last) + 1 if last else size
        if start >= size:
            return None, 0, True
        return start, min(end, size), True

    def _send(self, entry: HubFile, start: int, count: int, corrupt: bool) -> None:
        sent = 0
        try:
            with open(entry.disk, "rb") as handle:
                if not corrupt:
                    sent = _sendfile(self.connection, handle, start, count)
                else:
                    handle.seek(start)
                    data = bytearray(handle.read(count))
                    if data:
                        data[len(data) // 2] ^= 0xFF
                    self.wfile.write(data)
                    sent = len(data)
        except (BrokenPipeError, ConnectionResetError):
            pass
        finally:
            with self.state.lock:
                self.state.served[entry.path] += sent

    def _status(self, code: int, headers: dict[str, str] | None = None) -> None:
        self._bytes(json.dumps({"error": f"HTTP {code}"}).encode(), headers or {}, code)

    def _bytes(self, body: bytes, headers: dict[str, str], code: int = 200) -> None:
        self.send_response(code)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


def _sendfile(sock, handle, start: int, count: int) -> int:
    """Zero-copy send of `count` bytes from `start`; returns what was sent."""
    sent = 0
    while sent < count:
        n = os.sendfile(sock.fileno(), handle.fileno(), start + sent, min(count - sent, 1 << 30))
        if n == 0:
            break
        sent += n
    return sent


class SilentServer:
    """Accepts connections on 127.0.0.1 and never sends a byte; `accepted` is set at the first connection."""

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.05)
        self.connections: list[socket.socket] = []
        self.accepted = threading.Event()
        self.stopped = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        host, port = self.listener.getsockname()[:2]
        return f"http://{host}:{port}"

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                connection, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:  # closed by stop()
                return
            self.connections.append(connection)  # kept open, never read from or written to
            self.accepted.set()

    def stop(self) -> None:
        self.stopped.set()
        self.listener.close()
        for connection in self.connections:
            connection.close()
