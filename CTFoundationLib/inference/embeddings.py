"""CT-CLIP latents kept on disk: embedding files (`ctfoundation embed`) and the similar-case index, filled by a runtime.

    save_embedding("case.safetensors", {"image_latent": latent}, runtime, source="ct.nii.gz")
    cases = discover_cases(["cases/"], embeddings=True).cases
    index, skipped = index_cases(cases, "index/", runtime, case_annotations(cases, reports_csv=Path("reports.csv")),
                                 thumbnail=keyimages.thumbnail_png)
    hits = index.search(runtime.encode_texts(["Emphysema."])[0].numpy(), k=5)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from CTFoundationLib.errors import CTFoundationError, CTInputError
from CTFoundationLib.inference.ctclip import CTCLIPRuntime
from CTFoundationLib.io.cases import EMBEDDING_SUFFIX, Case
from CTFoundationLib.io.files import atomic_path
from CTFoundationLib.io.reading import read_ct
from CTFoundationLib.io.reports import CaseAnnotation
from CTFoundationLib.io.volume import CTVolume
from CTFoundationLib.retrieval import CaseIndex, CaseMetadata, source_fingerprint

INDEX_SAVE_INTERVAL_S = 60.0  # `index_cases` writes the index at most this often while it runs, and at the end
Thumbnail = Callable[[CTVolume], bytes]  # a CT -> PNG bytes, e.g. report.keyimages.thumbnail_png


def save_embedding(path: Path, tensors: dict[str, torch.Tensor], runtime: CTCLIPRuntime, **metadata: str) -> None:
    """Tensors in a .safetensors file, tagged with the model and checkpoint sha256 that made them."""
    path = Path(path)
    if path.suffix != EMBEDDING_SUFFIX:
        raise CTFoundationError(f"{path}: the output must be a {EMBEDDING_SUFFIX} file")
    meta = {"model": runtime.model_id, "checkpoint_sha256": runtime.checkpoint_sha256, **metadata}
    with atomic_path(path) as temporary:
        save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, str(temporary), metadata=meta)


def case_latent_and_thumbnail(path: Path, runtime: CTCLIPRuntime,
                              thumbnail: Thumbnail | None = None) -> tuple[torch.Tensor, bytes | None]:
    """(D,) image latent of a CT, or of an embedding file saved by `save_embedding` with this checkpoint, and
    `thumbnail(volume)` of the CT (None without `thumbnail`, or for an embedding file)."""
    if path.suffix != EMBEDDING_SUFFIX:
        volume = read_ct(path)
        return runtime.encode_volume(volume)[0][0], (thumbnail(volume) if thumbnail is not None else None)
    try:
        with safe_open(str(path), "pt") as stored:
            sha256 = (stored.metadata() or {}).get("checkpoint_sha256")
            if sha256 != runtime.checkpoint_sha256:
                raise CTInputError(
                    f"{path}: embedded with checkpoint {str(sha256)[:12]}…, not {runtime.checkpoint_sha256[:12]}…; "
                    "re-embed it with this model"
                )
            if "image_latent" not in stored.keys():
                raise CTInputError(
                    f"{path}: holds no image_latent (a text embedding?); make it with `ctfoundation embed`")
            return stored.get_tensor("image_latent"), None
    except SafetensorError as error:
        raise CTInputError(f"{path}: not a readable embedding file ({error})") from None


def index_cases(cases: Sequence[Case], folder: Path, runtime: CTCLIPRuntime,
                annotations: Mapping[str, CaseAnnotation] | None = None, thumbnail: Thumbnail | None = None,
                on_case: Callable[[Case], None] | None = None) -> tuple[CaseIndex, dict[str, str]]:
    """Add the cases to the index in `folder` (created for this checkpoint if new): image latent, `thumbnail(CT)`
    when given and, from `annotations` (case id -> report, labels; see `io.reports.case_annotations`), the report,
    its text latent (the runtime needs its text tower then) and the labels; a report or labels not given keep the
    ones stored. A case whose source and annotation are unchanged since it was added is skipped; a changed
    annotation alone re-encodes only the report, and an unchanged report keeps its text latent. Returns the index
    and {case id: why it was skipped} for cases that could not be read. The index is saved at the end and at most
    every INDEX_SAVE_INTERVAL_S."""
    index = CaseIndex.open_or_create(Path(folder), model_id=runtime.model_id,
                                     checkpoint_sha256=runtime.checkpoint_sha256, dim=runtime.latent_dim)
    unreadable: dict[str, str] = {}
    added, last_save = 0, time.monotonic()
    for case in cases:
        if on_case is not None:
            on_case(case)
        annotation = (annotations or {}).get(case.case_id, CaseAnnotation())
        stored = index.metadata(case.case_id) if case.case_id in index else None
        if stored is not None:  # what is not given this time stays as stored
            annotation = CaseAnnotation(annotation.report or stored.report,
                                        stored.labels if annotation.labels is None else annotation.labels)
        try:
            fingerprint = source_fingerprint(case.path)
            if stored is not None and stored.fingerprint == fingerprint:
                if (stored.report, stored.labels) == (annotation.report, annotation.labels):
                    continue
                latent, png = index.latent(case.case_id), None  # the image is unchanged: keep its thumbnail
                kept_thumbnail = stored.thumbnail
            else:
                tensor, png = case_latent_and_thumbnail(case.path, runtime, thumbnail)
                latent, kept_thumbnail = tensor.numpy(), None
        except CTFoundationError as error:
            unreadable[case.case_id] = str(error)
            continue
        if stored is not None and annotation.report == stored.report:
            text_latent = index.text_latent(case.case_id)
        else:
            text_latent = runtime.encode_texts([annotation.report])[0].numpy() if annotation.report else None
        metadata = CaseMetadata(str(case.path), fingerprint, annotation.report, annotation.labels, kept_thumbnail)
        index.add(case.case_id, latent, metadata, text_latent=text_latent, thumbnail_png=png)
        added += 1
        if time.monotonic() - last_save > INDEX_SAVE_INTERVAL_S:  # an interrupted run keeps most of its work
            index.save()
            last_save = time.monotonic()
    if added:
        index.save()
    return index, unreadable
