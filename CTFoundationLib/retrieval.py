"""Case retrieval over CT-CLIP latents: an on-disk case index, cosine top-k search, retrieval metrics.

Per case the index keeps the image latent and, when known, the report text, its text latent and a small
thumbnail (PNG), so it answers image->image, image->report and report->image queries as CT-CLIP's retrieval.
Pure library: it receives latents (CT-CLIP v2: 512-d, L2-normalised image and text latents) and never runs a
model. Every latent is re-normalised here anyway, so scores are cosine similarities in [-1, 1].
Ranking rule everywhere: score descending, exact ties to the lower row index (the CT-CLIP reference ranks with
Python's stable `sorted(..., reverse=True)`, which does the same).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import sys
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from CTFoundationLib.errors import RetrievalError
from CTFoundationLib.vocab import CT_RATE_ABNORMALITIES

INDEX_FORMAT = "ctfoundation-case-index"
INDEX_VERSION = 1
MANIFEST_NAME = "index.json"
_MANIFEST_KEYS = ("model_id", "checkpoint_sha256", "dim", "count", "generation",
                  "latents_file", "latents_sha256", "cases_file", "cases_sha256")
THUMBNAILS = "thumbnails"  # sub-folder of PNG thumbnails, named by the sha256 of their bytes
TARGETS = ("images", "reports")  # what a search ranks: the cases' image latents or their report text latents
_ROW_BLOCK = 1024  # query rows scored at once: bounds the (block, N) score matrix to a few MB per 1000 cases
_REBUILD = "the index is damaged: delete the folder and rebuild it"


@dataclasses.dataclass(frozen=True)
class CaseMetadata:
    """What the index keeps beside one case's latent.

    fingerprint: `source_fingerprint(source_path)` when the latent was computed; a re-run compares it.
    labels: optional 0/1 abnormality flags in a fixed order (e.g. the 18 CT-RATE abnormalities); `add` stores
    any 0/1 sequence (list, NumPy row) as a tuple of ints and a Path source as a string.
    thumbnail: file name of the case's PNG thumbnail in the index's `thumbnails/` folder (set by `add`).
    """

    source_path: str
    fingerprint: str
    report: str | None = None
    labels: tuple[int, ...] | None = None
    thumbnail: str | None = None


@dataclasses.dataclass(frozen=True)
class Hit:
    """One search result: the case, its cosine similarity to the query in [-1, 1], its metadata."""

    case_id: str
    score: float
    metadata: CaseMetadata


def index_model_id(folder: str | Path) -> str:
    """The model id a saved index was built with (from its manifest only; the latents are not read)."""
    return str(_read_manifest(Path(folder))["model_id"])


def describe_hit(index: CaseIndex, hit: Hit, excerpt_chars: int = 300) -> dict[str, Any]:
    """A hit as plain JSON for lists (CLI, Slicer): case id, score, source path and whether it exists here,
    thumbnail path (or None), findings (names of the positive CT-RATE labels; None when unlabelled) and the
    report's first `excerpt_chars` characters (None when it has none)."""
    labels = hit.metadata.labels
    findings = ([name for name, flag in zip(CT_RATE_ABNORMALITIES, labels) if flag]
                if labels is not None and len(labels) == len(CT_RATE_ABNORMALITIES) else None)
    report = hit.metadata.report
    if report is not None and len(report) > excerpt_chars:
        report = report[:excerpt_chars].rsplit(" ", 1)[0] + " …"
    thumbnail = index.thumbnail_path(hit.case_id)
    return {"case_id": hit.case_id, "score": round(hit.score, 6), "source_path": hit.metadata.source_path,
            "reachable": Path(hit.metadata.source_path).exists(),
            "thumbnail": None if thumbnail is None else str(thumbnail), "findings": findings, "report": report}


def source_fingerprint(path: str | Path) -> str:
    """Cheap change detector for a CT source: size and mtime (ns) of a file, or of every file in a folder.

    A folder (DICOM series) gives a sha256 over its sorted (relative path, size, mtime) entries.
    """
    path = Path(path)
    if path.is_file():
        stat = path.stat()
        return f"file:{stat.st_size}:{stat.st_mtime_ns}"
    if not path.is_dir():
        raise RetrievalError(f"{path}: no such file or folder to fingerprint; check the case's source path")
    digest = hashlib.sha256()
    for name, file in sorted((p.relative_to(path).as_posix(), p) for p in path.rglob("*") if p.is_file()):
        stat = file.stat()
        digest.update(f"{name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return f"dir:{digest.hexdigest()}"


class CaseIndex:
    """Image latents of many cases from ONE model checkpoint, kept in a folder and searchable by cosine.

    Folder layout: `index.json` (format, model id, checkpoint sha256, latent width, case count, names and
    sha256 of the data files), `latents.<generation>.npy` (float32 (N, dim), unit rows),
    `text_latents.<generation>.npy` (float32 (N, dim): the report's unit text latent, all-zero for a case
    without one; absent in indexes written before reports were kept), `cases.<generation>.jsonl` (one JSON
    object per row: case_id, source_path, fingerprint, report, labels, thumbnail) and `thumbnails/<sha256>.png`.
    `save()` writes a new generation (thumbnails are content-named, so written before it), fsyncs it, then
    swaps `index.json` with one atomic rename, so a kill at any moment leaves the previous or the new index,
    never a mix; unreferenced generations and thumbnails are deleted by the next successful save.
    One writer per folder at a time.
    Get one with `CaseIndex.open(folder)` or `CaseIndex.open_or_create(folder, model_id=..., ...)`.
    """

    def __init__(self, folder: str | Path, model_id: str, checkpoint_sha256: str, dim: int) -> None:
        """An empty, unsaved index; `open_or_create` is the usual way in."""
        if not isinstance(model_id, str) or not model_id:
            raise RetrievalError(f"{folder}: model_id must be a non-empty string, got {model_id!r}")
        sha = str(checkpoint_sha256).lower()
        if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            raise RetrievalError(f"{folder}: checkpoint_sha256 must be 64 hex digits, got {checkpoint_sha256!r}")
        if not isinstance(dim, int) or dim < 1:
            raise RetrievalError(f"{folder}: latent width must be a positive integer, got {dim!r}")
        self.folder = Path(folder)
        self.model_id = model_id
        self.checkpoint_sha256 = sha
        self.dim = dim
        self._generation = 0
        self._buffer = np.empty((0, dim), dtype=np.float32)
        self._text_buffer = np.empty((0, dim), dtype=np.float32)
        self._pending_thumbnails: dict[str, bytes] = {}
        self._ids: list[str] = []
        self._metadata: list[CaseMetadata] = []
        self._rows: dict[str, int] = {}

    @classmethod
    def open(cls, folder: str | Path, *, model_id: str | None = None,
             checkpoint_sha256: str | None = None) -> CaseIndex:
        """Load a saved index; when model_id / checkpoint_sha256 are given they must equal the recorded ones."""
        folder = Path(folder)
        manifest = _read_manifest(folder)
        index = cls(folder, manifest["model_id"], manifest["checkpoint_sha256"], manifest["dim"])
        index._check_model(model_id, checkpoint_sha256)
        latents = _read_latents(folder, manifest, "latents")
        text_latents = (_read_latents(folder, manifest, "text_latents") if "text_latents_file" in manifest
                        else np.zeros_like(latents))
        for (case_id, metadata), latent, text in zip(_read_cases(folder, manifest), latents, text_latents):
            index.add(case_id, latent, metadata, text_latent=text if text.any() else None)
        index._generation = manifest["generation"]
        return index

    @classmethod
    def open_or_create(cls, folder: str | Path, *, model_id: str, checkpoint_sha256: str,
                       dim: int = 512) -> CaseIndex:
        """The saved index in `folder` (checked to be of this model, checkpoint and width), else a new empty one."""
        folder = Path(folder)
        if not (folder / MANIFEST_NAME).exists():
            return cls(folder, model_id, checkpoint_sha256, dim)
        index = cls.open(folder, model_id=model_id, checkpoint_sha256=checkpoint_sha256)
        if index.dim != dim:
            raise RetrievalError(f"{folder}: the index holds {index.dim}-d latents, not {dim}-d; "
                                 "use another index folder for this model")
        return index

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, case_id: object) -> bool:
        return case_id in self._rows

    @property
    def case_ids(self) -> tuple[str, ...]:
        """Case ids in row order."""
        return tuple(self._ids)

    @property
    def latents(self) -> np.ndarray:
        """A copy of the (N, dim) float32 unit latents, in row order."""
        return self._buffer[: len(self)].copy()

    @property
    def text_latents(self) -> np.ndarray:
        """A copy of the (N, dim) float32 report text latents in row order; all-zero rows for cases without one."""
        return self._text_buffer[: len(self)].copy()

    def latent(self, case_id: str) -> np.ndarray:
        """The (dim,) unit image latent of `case_id` (a copy)."""
        self.metadata(case_id)  # a clear error for an unknown case
        return self._buffer[self._rows[case_id]].copy()

    def text_latent(self, case_id: str) -> np.ndarray | None:
        """The (dim,) unit report latent of `case_id` (a copy), or None when it has none."""
        self.metadata(case_id)
        latent = self._text_buffer[self._rows[case_id]]
        return latent.copy() if latent.any() else None

    def with_report_latent(self) -> np.ndarray:
        """Row numbers of the cases that have a report text latent, ascending."""
        return np.flatnonzero(self._text_buffer[: len(self)].any(axis=1))

    def thumbnail_path(self, case_id: str) -> Path | None:
        """The saved PNG thumbnail of `case_id`, or None when it has none (or it is not saved yet)."""
        name = self.metadata(case_id).thumbnail
        path = None if name is None else self.folder / THUMBNAILS / name
        return path if path is not None and path.is_file() else None

    def metadata(self, case_id: str) -> CaseMetadata:
        """The metadata stored for `case_id`."""
        if case_id not in self._rows:
            raise RetrievalError(f"{self.folder}: no case {case_id!r} in the index")
        return self._metadata[self._rows[case_id]]

    def contains(self, case_id: str, fingerprint: str) -> bool:
        """True when `case_id` is indexed from a source with this fingerprint, so a re-run can skip it."""
        row = self._rows.get(case_id)
        return row is not None and self._metadata[row].fingerprint == fingerprint

    def add(self, case_id: str, latent: ArrayLike, metadata: CaseMetadata, text_latent: ArrayLike | None = None,
            thumbnail_png: bytes | None = None) -> None:
        """Insert a case, or replace its latent and metadata when `case_id` is already indexed.

        latent: (dim,) image latent, stored re-normalised to unit length. text_latent: (dim,) latent of the
        case's report, likewise (None: the case has no report latent). thumbnail_png: the PNG bytes of its
        thumbnail, which replace `metadata.thumbnail`. Nothing is written until `save()`.
        """
        if not isinstance(case_id, str) or not case_id:
            raise RetrievalError(f"{self.folder}: case id must be a non-empty string, got {case_id!r}")
        if np.shape(latent) != (self.dim,):
            raise RetrievalError(f"{self.folder}: latent of case {case_id!r} has shape {np.shape(latent)}, but "
                                 f"this index holds ({self.dim},) latents of {self.model_id}")
        if thumbnail_png is not None:
            if not bytes(thumbnail_png).startswith(b"\x89PNG\r\n\x1a\n"):
                raise RetrievalError(f"{self.folder}: the thumbnail of case {case_id!r} is not a PNG image")
            name = hashlib.sha256(thumbnail_png).hexdigest()[:32] + ".png"
            self._pending_thumbnails[name] = bytes(thumbnail_png)
            metadata = dataclasses.replace(metadata, thumbnail=name)
        metadata = _canonical(metadata, f"{self.folder}: case {case_id!r}")
        vector = _unit_rows(latent, self.dim, f"latent of case {case_id!r}")[0]
        text = (np.zeros(self.dim, np.float32) if text_latent is None
                else _unit_rows(text_latent, self.dim, f"report latent of case {case_id!r}")[0])
        row = self._rows.get(case_id)
        if row is None:
            row = len(self._ids)
            self._reserve(row + 1)
            self._ids.append(case_id)
            self._metadata.append(metadata)
            self._rows[case_id] = row
        else:
            self._metadata[row] = metadata
        self._buffer[row] = vector
        self._text_buffer[row] = text

    def labels(self) -> np.ndarray:
        """(N, L) uint8 0/1 labels in row order, e.g. for `map_at_k(index.latents, index.labels())`."""
        unlabelled = [case_id for case_id, m in zip(self._ids, self._metadata) if m.labels is None]
        if not self._ids or unlabelled:
            raise RetrievalError(f"{self.folder}: {len(unlabelled)} of {len(self)} cases have no labels "
                                 f"(first: {unlabelled[:3]}); add labels to every case first")
        widths = {len(m.labels) for m in self._metadata}
        if len(widths) > 1:
            raise RetrievalError(f"{self.folder}: cases carry label vectors of different lengths {sorted(widths)}")
        return np.array([m.labels for m in self._metadata], dtype=np.uint8)

    def search(self, query_latent: ArrayLike, k: int, exclude: str | Collection[str] = (),
               target: str = "images") -> list[Hit]:
        """Top-k cases by cosine to one (dim,) query, best first, skipping the case ids in `exclude`.

        target: "images" ranks the cases' image latents (image->image with an image query, report->image with
        a text query); "reports" ranks their report text latents (image->report), over the cases that have one.
        For volume->volume search pass the query's own case id as `exclude`. Fewer than k hits when fewer
        cases are eligible.
        """
        if np.shape(query_latent) != (self.dim,):
            raise RetrievalError(f"{self.folder}: query latent has shape {np.shape(query_latent)}, "
                                 f"expected ({self.dim},)")
        return self.search_batch(np.asarray(query_latent)[None], k, [exclude], target)[0]

    def search_batch(self, query_latents: ArrayLike, k: int,
                     exclude: Sequence[str | Collection[str]] | None = None, target: str = "images") -> list[list[Hit]]:
        """`search` for (Q, dim) queries at once; exclude, when given, holds one id or id set per query."""
        queries = _unit_rows(query_latents, self.dim, f"{self.folder}: query latents")
        excludes = [()] * len(queries) if exclude is None else exclude
        if len(excludes) != len(queries):
            raise RetrievalError(f"{self.folder}: {len(queries)} queries but {len(excludes)} exclude entries")
        if not isinstance(k, int) or k < 1:
            raise RetrievalError(f"{self.folder}: k must be a positive integer, got {k!r}")
        if target not in TARGETS:
            raise RetrievalError(f"{self.folder}: search target {target!r}, expected one of {TARGETS}")
        candidates = self._buffer[: len(self)] if target == "images" else self._text_buffer[: len(self)]
        if target == "reports" and not len(self.with_report_latent()):
            raise RetrievalError(f"{self.folder}: no indexed case has a report; index the cases with their "
                                 "reports (--reports CSV, a report file beside the CT or a 'report' column)")
        results: list[list[Hit]] = []
        for start, block in _blocks(queries):
            scores = block @ candidates.T
            if target == "reports":  # cases without a report latent (all-zero rows) are not candidates
                scores[:, ~candidates.any(axis=1)] = -np.inf
            for offset, excluded in enumerate(excludes[start: start + len(block)]):
                scores[offset, [self._rows[c] for c in _id_set(excluded) if c in self._rows]] = -np.inf
            for row_scores, order in zip(scores, _ranked(scores, k)):
                results.append([Hit(self._ids[j], float(row_scores[j]), self._metadata[j])
                                for j in order if row_scores[j] > -np.inf])
        return results

    def save(self) -> None:
        """Write the index atomically (see the class docstring); creates the folder if needed."""
        self.folder.mkdir(parents=True, exist_ok=True)
        generation = self._generation + 1
        latents_file, cases_file = f"latents.{generation}.npy", f"cases.{generation}.jsonl"
        text_file = f"text_latents.{generation}.npy"
        thumbnails = self._write_thumbnails()
        manifest = {
            "format": INDEX_FORMAT,
            "version": INDEX_VERSION,
            "model_id": self.model_id,
            "checkpoint_sha256": self.checkpoint_sha256,
            "dim": self.dim,
            "count": len(self),
            "generation": generation,
            "latents_file": latents_file,
            "latents_sha256": _write_synced(self.folder / latents_file, _npy_bytes(self._buffer[: len(self)])),
            "text_latents_file": text_file,
            "text_latents_sha256": _write_synced(self.folder / text_file, _npy_bytes(self._text_buffer[: len(self)])),
            "cases_file": cases_file,
            "cases_sha256": _write_synced(self.folder / cases_file, self._cases_jsonl()),
        }
        temporary = self.folder / f"{MANIFEST_NAME}.tmp"
        _write_synced(temporary, json.dumps(manifest, indent=2).encode())
        os.replace(temporary, self.folder / MANIFEST_NAME)
        _sync_folder(self.folder)
        self._generation = generation
        for stale in [*self.folder.glob("latents.*.npy"), *self.folder.glob("text_latents.*.npy"),
                      *self.folder.glob("cases.*.jsonl")]:
            if stale.name not in (latents_file, text_file, cases_file):
                stale.unlink(missing_ok=True)
        for stale in self.folder.glob(f"{THUMBNAILS}/*.png"):
            if stale.name not in thumbnails:
                stale.unlink(missing_ok=True)

    def _write_thumbnails(self) -> set[str]:
        """Write the thumbnails added since the last save; returns the names every case refers to."""
        referenced = {m.thumbnail for m in self._metadata if m.thumbnail is not None}
        pending = {name: png for name, png in self._pending_thumbnails.items() if name in referenced}
        if pending:
            (self.folder / THUMBNAILS).mkdir(exist_ok=True)
        for name, png in pending.items():
            _write_synced(self.folder / THUMBNAILS / name, png)
        if pending:
            _sync_folder(self.folder / THUMBNAILS)
        self._pending_thumbnails.clear()
        return referenced

    def _check_model(self, model_id: str | None, checkpoint_sha256: str | None) -> None:
        sha = None if checkpoint_sha256 is None else str(checkpoint_sha256).lower()
        if (model_id is not None and model_id != self.model_id) or (sha is not None and sha != self.checkpoint_sha256):
            raise RetrievalError(
                f"{self.folder}: this index holds latents of {self.model_id} (checkpoint sha256 "
                f"{self.checkpoint_sha256[:12]}...), not of {model_id or self.model_id} (checkpoint sha256 "
                f"{(sha or self.checkpoint_sha256)[:12]}...); latents of different checkpoints are not "
                "comparable: use another index folder or rebuild this one")

    def _reserve(self, rows: int) -> None:
        if rows > len(self._buffer):
            grown = np.empty((max(rows, 2 * len(self._buffer), 64), self.dim), dtype=np.float32)
            grown[: len(self)] = self._buffer[: len(self)]
            self._buffer = grown
            text = np.zeros_like(grown)
            text[: len(self)] = self._text_buffer[: len(self)]
            self._text_buffer = text

    def _cases_jsonl(self) -> bytes:
        lines = [json.dumps({"case_id": case_id, **dataclasses.asdict(metadata)}, ensure_ascii=False)
                 for case_id, metadata in zip(self._ids, self._metadata)]
        return "".join(line + "\n" for line in lines).encode("utf-8")


def recall_at_k(text_latents: ArrayLike, image_latents: ArrayLike,
                ks: Sequence[int] = (1, 5, 10, 50)) -> dict[int, float]:
    """Report->volume Recall@K: the fraction of reports whose own volume is among their K best-scored volumes.

    text_latents, image_latents: (N, D); row i of both comes from the same study (the only true match).
    Definition as in the CT-CLIP reference (ibrahimethemhamamci/CT-CLIP @ a2a155c,
    scripts/report_to_volume_new.py): each report is scored against all N volumes by the dot product of the
    latents (cosine here, as the latents are unit length), the K highest are taken with a stable sort, and
    it counts as a hit when its own volume is among them; Recall@K = hits / N. The reference reports
    K = 5, 10, 50, 100 and a random-vector baseline (about K / N), which is not computed here.
    Returns {K: recall in [0, 1]}; each K must be <= N.
    """
    texts = _unit_rows(text_latents, None, "text latents")
    images = _unit_rows(image_latents, texts.shape[1], "image latents")
    if len(texts) != len(images):
        raise RetrievalError(f"recall_at_k needs one volume per report: got {len(texts)} reports, "
                             f"{len(images)} volumes")
    ks = _check_ks(ks, len(images), "volumes")
    ranks = np.concatenate([_own_rank(block, images, start) for start, block in _blocks(texts)])
    return {k: float(np.mean(ranks < k)) for k in ks}


def map_at_k(image_latents: ArrayLike, labels: ArrayLike, ks: Sequence[int] = (1, 5, 10, 50),
             exclude_query: bool = True) -> dict[int, float]:
    """Volume->volume MAP@K as CT-CLIP computes it: mean label overlap (Jaccard) of the K nearest volumes.

    image_latents: (N, D); labels: (N, L) 0/1 abnormality flags (L = 18 for CT-RATE).
    Definition from the CT-CLIP reference (ibrahimethemhamamci/CT-CLIP @ a2a155c,
    scripts/volume_to_volume_new.py): the candidates are the volumes with at least one positive label, and
    every volume, labelled or not, is a query. For query q the K candidates of highest cosine are taken
    (stable sort), each scores the Jaccard overlap |q AND c| / |q OR c| of the label vectors, and q's value is
    the mean of those K scores; MAP@K is the mean over all N queries. So it is a graded precision@K averaged
    over queries, not textbook average precision, and a query with no positive label scores 0.
    Two departures from that script: the query is removed from its own candidates (`exclude_query=False`
    keeps it, as the script does, where it comes first with overlap 1), and each K is averaged on its own
    (the script appends to one list across its K loop, so its j-th printed value is the mean of the true
    values for its first j Ks).
    Returns {K: value in [0, 1]}; each K must be <= the number of candidates (minus one with exclude_query).
    """
    latents = _unit_rows(image_latents, None, "image latents")
    flags = _label_matrix(labels, len(latents))
    pool = np.flatnonzero(flags.any(axis=1))
    ks = _check_ks(ks, len(pool) - int(exclude_query),
                   "candidate volumes (volumes with a positive label, less the query)" if exclude_query
                   else "candidate volumes (volumes with a positive label)")
    column_of = np.full(len(latents), -1)
    column_of[pool] = np.arange(len(pool))
    totals = dict.fromkeys(ks, 0.0)
    for start, block in _blocks(latents):
        scores = block @ latents[pool].T
        if exclude_query:
            columns = column_of[start: start + len(block)]
            in_pool = np.flatnonzero(columns >= 0)
            scores[in_pool, columns[in_pool]] = -np.inf
        top = _ranked(scores, max(ks))
        overlap = np.take_along_axis(_jaccard(flags[start: start + len(block)], flags[pool]), top, axis=1)
        for k in ks:
            totals[k] += float(overlap[:, :k].mean(axis=1).sum())
    return {k: totals[k] / len(latents) for k in ks}


@dataclasses.dataclass(frozen=True)
class IndexMetrics:
    """CT-CLIP's retrieval metrics of one index. Each dict maps K -> value in [0, 1]; empty when not computable.

    report_cases: cases with a report latent (the Recall@K population); labelled_cases: cases with labels (the
    mAP@K queries); candidates: labelled cases with at least one positive label (the mAP@K candidates);
    image_to_image_chance: the mAP@K of a random ranking (any K): the mean over queries of the mean label
    overlap with every candidate (None when mAP is not computed); skipped: why a metric or some K were left out.
    """

    report_to_image: dict[int, float]
    image_to_report: dict[int, float]
    image_to_image: dict[int, float]
    image_to_image_chance: float | None
    report_cases: int
    labelled_cases: int
    candidates: int
    skipped: tuple[str, ...]


def index_metrics(index: CaseIndex, ks: Sequence[int] = (1, 5, 10, 50)) -> IndexMetrics:
    """Recall@K both ways over the cases with a report, mAP@K (`map_at_k`) over the labelled cases.

    report->image is `recall_at_k` (CT-CLIP's report_to_volume); image->report is the same count with the
    roles swapped (each volume's own report among its K best-scored reports; CT-CLIP publishes only the
    report->volume direction). A K larger than the population is left out and named in `skipped`.
    """
    skipped: list[str] = []
    with_report = index.with_report_latent()
    texts, images = index.text_latents[with_report], index.latents[with_report]
    recall_ks = _fitting(ks, len(with_report), "report cases", skipped)
    to_image = recall_at_k(texts, images, recall_ks) if recall_ks else {}
    to_report = recall_at_k(images, texts, recall_ks) if recall_ks else {}
    labelled = [row for row, case_id in enumerate(index.case_ids) if index.metadata(case_id).labels is not None]
    flags = np.array([index.metadata(index.case_ids[row]).labels for row in labelled], dtype=np.uint8)
    widths = {len(index.metadata(index.case_ids[row]).labels) for row in labelled}
    candidates = int(flags.any(axis=1).sum()) if labelled and len(widths) == 1 else 0
    if len(widths) > 1:
        skipped.append(f"mAP@K: cases carry label vectors of different lengths {sorted(widths)}")
    map_ks = _fitting(ks, candidates - 1, "labelled candidate cases (less the query)", skipped)
    to_image_image = map_at_k(index.latents[labelled], flags, map_ks) if map_ks else {}
    chance = _chance_overlap(flags.astype(bool)) if map_ks else None
    return IndexMetrics(to_image, to_report, to_image_image, chance, len(with_report), len(labelled), candidates,
                        tuple(skipped))


def format_index_metrics(metrics: IndexMetrics) -> str:
    """The metrics as printed by `ctfoundation search-metrics`: one line per metric, K=value pairs."""
    def row(name: str, values: dict[int, float], population: str) -> str:
        pairs = "  ".join(f"@{k}={value:.3f}" for k, value in values.items()) or "not computed"
        return f"{name:<34} {pairs}   ({population})"

    reports = f"{metrics.report_cases} cases with a report"
    lines = [row("report->image Recall", metrics.report_to_image, reports),
             row("image->report Recall", metrics.image_to_report, reports),
             row("image->image mAP (shared findings)", metrics.image_to_image,
                 f"{metrics.labelled_cases} labelled queries, {metrics.candidates} candidates")]
    if metrics.report_to_image:
        lines.append(f"{'chance Recall (K / cases)':<34} " + "  ".join(
            f"@{k}={k / metrics.report_cases:.3f}" for k in metrics.report_to_image))
    if metrics.image_to_image_chance is not None:
        lines.append(f"{'chance mAP (random ranking)':<34} {metrics.image_to_image_chance:.3f}")
    return "\n".join(lines + [f"note: {why}" for why in metrics.skipped])


def _chance_overlap(flags: np.ndarray) -> float:
    """Mean over queries of the mean Jaccard overlap with every candidate but the query: a random ranking's mAP."""
    pool = np.flatnonzero(flags.any(axis=1))
    overlap = _jaccard(flags, flags[pool])
    counts = np.full(len(flags), float(len(pool)))
    in_pool = np.isin(np.arange(len(flags)), pool)
    counts[in_pool] -= 1  # the query is not its own candidate; its self-overlap is 1
    sums = overlap.sum(axis=1) - in_pool.astype(float)
    return float(np.mean(sums / counts))


def _fitting(ks: Sequence[int], available: int, what: str, skipped: list[str]) -> tuple[int, ...]:
    """The Ks that fit `available` items; the others are named in `skipped`."""
    kept = tuple(k for k in _check_ks(ks, sys.maxsize, what) if k <= available)
    if len(kept) < len(tuple(ks)):
        left = [k for k in ks if k > available]
        skipped.append(f"K = {', '.join(map(str, left))} left out: only {max(available, 0)} {what}")
    return kept


def _unit_rows(latents: ArrayLike, dim: int | None, what: str) -> np.ndarray:
    """(n, d) or (d,) latents -> (n, d) float32 rows of unit L2 norm; refuses a wrong width, NaN/inf, zero rows."""
    array = np.asarray(latents, dtype=np.float64)
    array = array[None] if array.ndim == 1 else array
    if array.ndim != 2 or array.shape[1] < 1 or (dim is not None and array.shape[1] != dim):
        expected = f"(n, {dim})" if dim is not None else "(n, D)"
        raise RetrievalError(f"{what}: shape {np.shape(latents)}, expected {expected}")
    if not np.isfinite(array).all():
        raise RetrievalError(f"{what}: contain NaN or infinite values; recompute them")
    norms = np.linalg.norm(array, axis=1, keepdims=True)
    if (norms == 0).any():
        raise RetrievalError(f"{what}: {int((norms == 0).sum())} all-zero rows have no direction; recompute them")
    return (array / norms).astype(np.float32)


def _blocks(rows: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    for start in range(0, len(rows), _ROW_BLOCK):
        yield start, rows[start: start + _ROW_BLOCK]


def _ranked(scores: np.ndarray, k: int) -> np.ndarray:
    """(Q, N) scores -> (Q, min(k, N)) column indices, best first, exact ties to the lower index.

    For k < N: a linear-time selection of the k best per row (all above the k-th best score, then the
    lowest-index columns equal to it), and a stable sort of those k only.
    """
    columns = scores.shape[1]
    if k >= columns:
        return np.argsort(-scores, axis=1, kind="stable")
    kth = np.partition(scores, columns - k, axis=1)[:, columns - k, None]
    above, equal = scores > kth, scores == kth
    room = k - above.sum(axis=1, keepdims=True)
    chosen = np.nonzero(above | (equal & (np.cumsum(equal, axis=1) <= room)))[1].reshape(len(scores), k)
    order = np.argsort(-np.take_along_axis(scores, chosen, axis=1), axis=1, kind="stable")
    return np.take_along_axis(chosen, order, axis=1)


def _own_rank(block: np.ndarray, images: np.ndarray, start: int) -> np.ndarray:
    """0-based rank of volume start+i among all volumes for report row i of `block` (ties: lower index first)."""
    scores = block @ images.T
    rows = np.arange(len(block))
    own_columns = start + rows
    own = scores[rows, own_columns][:, None]
    lower = np.arange(len(images))[None] < own_columns[:, None]
    return ((scores > own) | ((scores == own) & lower)).sum(axis=1)


def _jaccard(queries: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """(Q, L), (C, L) 0/1 with every candidate non-empty -> (Q, C) |q AND c| / |q OR c|."""
    q, c = queries.astype(np.float64), candidates.astype(np.float64)
    shared = q @ c.T
    return shared / (q.sum(axis=1)[:, None] + c.sum(axis=1)[None] - shared)


def _check_ks(ks: Sequence[int], available: int, what: str) -> tuple[int, ...]:
    ks = tuple(ks)
    if not ks or any(not isinstance(k, (int, np.integer)) or k < 1 for k in ks):
        raise RetrievalError(f"K values must be positive integers, got {ks}")
    if max(ks) > available:
        raise RetrievalError(f"K = {max(ks)} needs at least {max(ks)} {what}, but there are {max(available, 0)}; "
                             "use smaller K values or more cases")
    return tuple(int(k) for k in ks)


def _label_matrix(labels: ArrayLike, rows: int) -> np.ndarray:
    flags = np.asarray(labels)
    if flags.ndim != 2 or len(flags) != rows:
        raise RetrievalError(f"labels: shape {flags.shape}, expected ({rows}, number of abnormalities)")
    if not np.isin(flags, (0, 1)).all():
        raise RetrievalError("labels must be 0/1 flags; threshold probabilities before evaluating")
    return flags.astype(bool)


def _canonical(metadata: CaseMetadata, what: str) -> CaseMetadata:
    """Metadata with plain JSON-ready types (str paths, int label flags); refuses labels other than 0/1."""
    labels = metadata.labels
    if labels is not None:
        flags = np.asarray(labels)
        if flags.ndim != 1 or not np.isin(flags, (0, 1)).all():
            raise RetrievalError(f"{what}: labels must be a sequence of 0/1 flags, got {labels!r}")
        labels = tuple(int(v) for v in flags)
    report = None if metadata.report is None else str(metadata.report)
    thumbnail = None if metadata.thumbnail is None else str(metadata.thumbnail)
    return CaseMetadata(str(metadata.source_path), str(metadata.fingerprint), report, labels, thumbnail)


def _id_set(exclude: str | Collection[str]) -> Collection[str]:
    return (exclude,) if isinstance(exclude, str) else exclude


def _write_synced(path: Path, data: bytes) -> str:
    """Write `data` to `path`, flushed to disk; returns its sha256 hex digest."""
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    return hashlib.sha256(data).hexdigest()


def _sync_folder(folder: Path) -> None:
    """Make a rename inside `folder` durable (POSIX; Windows has no folder handles to fsync)."""
    if os.name == "posix":
        handle = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(handle)
        finally:
            os.close(handle)


def _read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise RetrievalError(f"{folder}: no case index here ({MANIFEST_NAME} missing); build one with "
                             "CaseIndex.open_or_create(...) and save()")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RetrievalError(f"{path}: unreadable ({error}); {_REBUILD}") from error
    if not isinstance(manifest, dict) or manifest.get("format") != INDEX_FORMAT:
        raise RetrievalError(f"{path}: not a CTFoundation case index; point to the index folder")
    if manifest.get("version") != INDEX_VERSION:
        raise RetrievalError(f"{path}: index format version {manifest.get('version')!r}, this CTFoundation "
                             f"reads version {INDEX_VERSION}; rebuild the index")
    missing = [key for key in _MANIFEST_KEYS if key not in manifest]
    if missing:
        raise RetrievalError(f"{path}: lacks {', '.join(missing)}; {_REBUILD}")
    return manifest


def _read_checked(folder: Path, manifest: dict[str, Any], kind: str) -> bytes:
    """The bytes of the manifest's `<kind>_file`, refused unless they match its recorded sha256."""
    path = folder / str(manifest[f"{kind}_file"])
    try:
        data = path.read_bytes()
    except OSError as error:
        raise RetrievalError(f"{path}: cannot be read ({error.strerror or error}); {_REBUILD}") from error
    if hashlib.sha256(data).hexdigest() != manifest[f"{kind}_sha256"]:
        raise RetrievalError(f"{path}: content does not match its checksum in {MANIFEST_NAME}; {_REBUILD}")
    return data


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _read_latents(folder: Path, manifest: dict[str, Any], kind: str) -> np.ndarray:
    """The manifest's `<kind>_file` (latents or text_latents), checked against its checksum, dtype and shape."""
    if f"{kind}_sha256" not in manifest:
        raise RetrievalError(f"{folder / MANIFEST_NAME}: lacks {kind}_sha256; {_REBUILD}")
    path = folder / str(manifest[f"{kind}_file"])
    try:
        latents = np.load(io.BytesIO(_read_checked(folder, manifest, kind)), allow_pickle=False)
    except ValueError as error:
        raise RetrievalError(f"{path}: not a NumPy array file ({error}); {_REBUILD}") from error
    if latents.dtype != np.float32 or latents.shape != (manifest["count"], manifest["dim"]):
        raise RetrievalError(f"{path}: {latents.dtype} {latents.shape}, but {MANIFEST_NAME} records float32 "
                             f"({manifest['count']}, {manifest['dim']}); {_REBUILD}")
    return latents


def _read_cases(folder: Path, manifest: dict[str, Any]) -> list[tuple[str, CaseMetadata]]:
    path = folder / str(manifest["cases_file"])
    cases = []
    for number, line in enumerate(_read_checked(folder, manifest, "cases").decode("utf-8").splitlines(), 1):
        try:
            record = json.loads(line)
            labels = record["labels"]
            metadata = CaseMetadata(record["source_path"], record["fingerprint"], record["report"],
                                    None if labels is None else tuple(labels), record.get("thumbnail"))
            cases.append((record["case_id"], metadata))
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise RetrievalError(f"{path}, line {number}: bad case record ({error}); {_REBUILD}") from error
    if len(cases) != manifest["count"] or len({case_id for case_id, _ in cases}) != len(cases):
        raise RetrievalError(f"{path}: {len(cases)} records ({len({c for c, _ in cases})} distinct ids), "
                             f"{MANIFEST_NAME} records {manifest['count']}; {_REBUILD}")
    return cases
