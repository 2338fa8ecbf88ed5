"""Talking to the Hugging Face Hub (or a mirror, or a plain server) over HTTP with `requests`.

Facts this relies on (Hub HTTP API):
- files: GET/HEAD `<endpoint>/<repo>/resolve/<revision>/<path>`; dataset repos prefix `datasets/`.
- HEAD on an LFS file answers a redirect whose `X-Linked-Etag` is the file's sha256 and `X-Linked-Size`
  its size; small (non-LFS) files carry a git blob id in `ETag` instead, which is not a sha256.
- folders: GET `<endpoint>/api/<repo_type>s/<repo>/tree/<revision>/<path>` lists entries
  (`type`, `path`, `size`, and `lfs.oid` = sha256 for LFS files), paginated with a `Link: rel=next` header.
- gated or private repositories answer 401 without a (valid) token and 403 when the token's user has not
  been granted access; `X-Error-Code` says `GatedRepo`, `RepoNotFound`, `EntryNotFound`, ...
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from urllib.parse import quote, urlsplit, urlunsplit

import requests

from CTFoundationLib.errors import WeightsError
from CTFoundationLib.weights.registry import FileSpec, ModelSpec, Source

SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 30.0
TOKEN_URL = "https://huggingface.co/settings/tokens"


class NotFoundError(WeightsError):
    """HTTP 404: the file or folder is not where the registry says (optional files may be skipped)."""


class RetryableError(Exception):
    """A failure worth retrying: connection trouble, 5xx, 429. Its message says in a few words what happened
    and with which server (no secrets): it is shown with every retry."""

    def __init__(self, message: str, retry_after: float | None = None, connect: bool = False):
        super().__init__(message)
        self.retry_after = retry_after
        self.connect = connect  # failed before any response: probably offline


@dataclass
class Remote:
    """One concrete file to fetch: URL, what we expect, whether to send the token."""

    rel: str  # path inside the model folder
    url: str
    sha256: str | None
    size: int | None
    hash_origin: str  # "registry", "hub" or "computed"
    auth: bool
    optional: bool = False


def display_url(url: str) -> str:
    """A URL safe to show: no user:password, no query string (signed CDN URLs carry credentials there)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def resolve_url(endpoint: str, source: Source, path: str | None = None) -> str:
    """The `resolve` URL of a file in a Hub repository (dataset repos under /datasets/)."""
    prefix = "datasets/" if source.repo_type == "dataset" else ""
    file_path = quote(path if path is not None else source.path, safe="/")
    return f"{endpoint}/{prefix}{source.repo}/resolve/{quote(source.revision, safe='')}/{file_path}"


def auth_headers(token: str | None, send: bool) -> dict[str, str]:
    """The Authorization header when a token exists and this server should get it."""
    return {"Authorization": f"Bearer {token}"} if token and send else {}


# --- errors ------------------------------------------------------------------------------------------


def check_response(response: requests.Response, spec: ModelSpec, what: str, has_token: bool) -> None:
    """Turn an HTTP error status into an honest WeightsError (or RetryableError for 5xx/429)."""
    code = response.status_code
    if code < 400:
        return
    url = display_url(response.url)
    if code == 429 or code >= 500:
        raise RetryableError(f"HTTP {code} from {url}", retry_after=_retry_after(response))
    if code in (401, 403):
        raise WeightsError(_access_message(response, spec, what, has_token))
    if code == 404:
        raise NotFoundError(
            f"{what} of model '{spec.id}' was not found (HTTP 404 at {url}); the registry entry may be out of date: "
            f"check {spec.page}, or get the file yourself and run `ctfoundation weights import {spec.id} FILE`"
        )
    raise WeightsError(f"unexpected HTTP {code} from {url} while getting {what} of model '{spec.id}'")


def _access_message(response: requests.Response, spec: ModelSpec, what: str, has_token: bool) -> str:
    code = response.status_code
    server_says = response.headers.get("X-Error-Message", "")
    if has_token and "invalid" in server_says.lower() and "credential" in server_says.lower():
        return (
            f"the Hugging Face token was rejected (HTTP {code}) while getting {what} of model '{spec.id}': "
            f"create a new read token at {TOKEN_URL} and set HF_TOKEN (or `ctfoundation weights token`)"
        )
    kind = "is gated" if spec.gated or response.headers.get("X-Error-Code") == "GatedRepo" else "needs access rights"
    if has_token:
        return (
            f"model '{spec.id}' {kind} and the token in use has no access (HTTP {code} for {what}): "
            f"accept its licence at {spec.page} with the account the token belongs to, then try again"
        )
    return (
        f"model '{spec.id}' {kind} (HTTP {code} for {what}): accept its licence at {spec.page} "
        f"and set HF_TOKEN to a read token from {TOKEN_URL} (or run `ctfoundation weights token`)"
    )


def _retry_after(response: requests.Response) -> float | None:
    value = response.headers.get("Retry-After", "")
    return float(value) if value.isdigit() else None


def next_step(spec: ModelSpec, error: RetryableError) -> str:
    """What to do after giving up: offline help when no connection was made, else try later."""
    if not error.connect:
        return "try again later"
    return (f"offline? copy the files from a machine that has them and use "
            f"`ctfoundation weights import {spec.id} FILE-OR-FOLDER`")


def connection_trouble(error: requests.RequestException, url: str, timeout: tuple[float, float]) -> RetryableError:
    """What went wrong before an answer came, in a few words: no connection, no answer in time, or the OS's reason."""
    host = urlsplit(url).hostname or url
    if isinstance(error, requests.ConnectTimeout):
        return RetryableError(f"no connection to {host} within {timeout[0]:g} s (connect timeout)", connect=True)
    if isinstance(error, requests.ReadTimeout):
        return RetryableError(f"no answer from {host} within {timeout[1]:g} s (read timeout)")
    return RetryableError(f"cannot reach {host} ({short_reason(error)})", connect=True)


def short_reason(error: Exception) -> str:
    """A one-line cause without URLs' query strings or headers: the OS's words when it gave some."""
    os_words = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", str(error))
    if os_words:
        return os_words.group(1).strip()
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    text = re.sub(r"https?://\S+", lambda m: display_url(m.group(0)), text)
    return text[:200]


# --- metadata ----------------------------------------------------------------------------------------


def head_metadata(
    session: requests.Session, url: str, headers: dict[str, str], spec: ModelSpec, what: str,
    timeout: tuple[float, float],
) -> tuple[str | None, int | None]:
    """(sha256, size) from a HEAD request: the LFS `X-Linked-Etag`/`X-Linked-Size` when the Hub sends them."""
    response = _request(session, "HEAD", url, headers, timeout, allow_redirects=False)
    hops = 0
    while response.is_redirect and not response.headers.get("X-Linked-Etag") and hops < 5:
        location = response.headers.get("Location", "")
        if not location.startswith("/"):
            break  # redirect to a CDN: its headers are not Hub metadata
        response = _request(session, "HEAD", _same_host(url, location), headers, timeout, allow_redirects=False)
        hops += 1
    if response.status_code == 405:
        return None, None  # plain server that does not do HEAD: learn the size from the GET
    check_response(response, spec, what, "Authorization" in headers)
    etag = (response.headers.get("X-Linked-Etag") or response.headers.get("ETag") or "").strip()
    etag = etag.removeprefix("W/").strip('"').lower()
    size = response.headers.get("X-Linked-Size")
    if size is None and not response.is_redirect:
        size = response.headers.get("Content-Length")
    return (etag if SHA256_RE.match(etag) else None), (int(size) if size and size.isdigit() else None)


def _same_host(url: str, location: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, location, "", ""))


def _request(
    session: requests.Session, method: str, url: str, headers: dict[str, str], timeout: tuple[float, float],
    **kwargs,
) -> requests.Response:
    """One request with (connect, read) timeouts; connection problems become RetryableError."""
    try:
        return session.request(method, url, headers=headers, timeout=timeout, **kwargs)
    except (requests.ConnectionError, requests.Timeout) as error:
        raise connection_trouble(error, url, timeout) from None


def list_folder(
    session: requests.Session, endpoint: str, file: FileSpec, spec: ModelSpec, headers: dict[str, str],
    timeout: tuple[float, float],
) -> tuple[str, list[dict]]:
    """Expand a folder entry: (repository folder used, its file entries after select/include/exclude)."""
    source = file.source
    folder = source.path.strip("/")
    listing = partial(_tree, session, endpoint, source, spec=spec, headers=headers, timeout=timeout)
    if source.select:
        folder = _select_subfolder(listing, source, folder, spec)
    entries = [e for e in listing(folder) if e.get("type") == "file"]
    chosen = [e for e in entries if _wanted(e["path"].rsplit("/", 1)[-1], source)]
    if not chosen:
        raise WeightsError(
            f"folder '{folder or '/'}' of {source.repo} has no files matching the registry entry of model "
            f"'{spec.id}'; check {spec.page} and the registry"
        )
    return folder, chosen


def _wanted(name: str, source: Source) -> bool:
    included = not source.include or any(fnmatch.fnmatch(name, g) for g in source.include)
    return included and not any(fnmatch.fnmatch(name, g) for g in source.exclude)


def _select_subfolder(listing: Callable[[str], list[dict]], source: Source, folder: str, spec: ModelSpec) -> str:
    dirs = [e["path"] for e in listing(folder) if e.get("type") == "directory"]
    pattern = source.select.lower()
    matches = [d for d in dirs if fnmatch.fnmatch(d.rsplit("/", 1)[-1].lower(), pattern)]
    if len(matches) != 1:
        names = ", ".join(d.rsplit("/", 1)[-1] for d in dirs) or "none"
        found = "no sub-folder" if not matches else f"{len(matches)} sub-folders"
        raise WeightsError(
            f"model '{spec.id}': {found} of '{folder}' in {source.repo} match '{source.select}' (there are: {names}); "
            f"set the exact folder in a registry override (CTFOUNDATION_REGISTRY)"
        )
    return matches[0]


def _tree(
    session: requests.Session, endpoint: str, source: Source, folder: str, *, spec: ModelSpec,
    headers: dict[str, str], timeout: tuple[float, float],
) -> list[dict]:
    """All entries of one repository folder (not recursive), following the pagination links."""
    url = f"{endpoint}/api/{source.repo_type}s/{source.repo}/tree/{quote(source.revision, safe='')}"
    url += f"/{quote(folder, safe='/')}" if folder else ""
    entries: list[dict] = []
    while url:
        response = _request(session, "GET", url, headers, timeout)
        check_response(response, spec, f"the file list of '{folder or '/'}'", "Authorization" in headers)
        try:
            page = response.json()
        except ValueError:
            message = f"{display_url(url)} did not answer a JSON file list; is the mirror Hub-compatible?"
            raise WeightsError(message) from None
        entries.extend(page if isinstance(page, list) else [])
        url = response.links.get("next", {}).get("url", "")
    return entries


def folder_remotes(
    endpoint: str, file: FileSpec, folder: str, entries: list[dict], auth: bool
) -> list[Remote]:
    """Concrete downloads for a listed folder: local names keep the path below the repository folder."""
    remotes = []
    for entry in entries:
        below = entry["path"][len(folder) + 1 :] if folder else entry["path"]
        rel = below if file.name == "." else f"{file.name}/{below}"
        lfs = entry.get("lfs") or {}
        sha = str(lfs.get("oid", "")).lower()
        sha = sha if SHA256_RE.match(sha) else None
        remotes.append(
            Remote(
                rel=rel,
                url=resolve_url(endpoint, file.source, entry["path"]),
                sha256=sha,
                size=entry.get("size"),
                hash_origin="hub" if sha else "computed",
                auth=auth,
            )
        )
    return remotes
