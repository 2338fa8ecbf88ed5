"""CT-CLIP latents kept on disk: embedding files (`ctfoundation embed`) and the similar-case index, filled by a runtime.

    save_embedding("case.safetensors", {"image_latent": latent}, runtime, source="ct.nii.gz")
    index, skipped = index_cases(discover_cases(["cases/"], embeddings=True), "index/", runtime)
    hits = index.search(runtime.encode_texts(["Emphysema."])[0].numpy(), k=5)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from CTFoundationLib.errors import CTFoundationError, CTInputError
from CTFoundationLib.inference.ctclip import CTCLIPRuntime
from CTFoundationLib.io.cases import EMBEDDING_SUFFIX, Case
from CTFoundationLib.io.files import atomic_path
from CTFoundationLib.io.reading import read_ct
from CTFoundationLib.retrieval import CaseIndex, CaseMetadata, source_fingerprint

INDEX_SAVE_INTERVAL_S = 60.0  # `index_cases` writes the index at most this often while it runs, and at the end


def save_embedding(path: Path, tensors: dict[str, torch.Tensor], runtime: CTCLIPRuntime, **metadata: str) -> None:
    """Tensors in a .safetensors file, tagged with the model and checkpoint sha256 that made them."""
    path = Path(path)
    if path.suffix != EMBEDDING_SUFFIX:
        raise CTFoundationError(f"{path}: the output must be a {EMBEDDING_SUFFIX} file")
    meta = {"model": runtime.model_id, "checkpoint_sha256": runtime.checkpoint_sha256, **metadata}
    with atomic_path(path) as temporary:
        save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, str(temporary), metadata=meta)


def case_latent(path: Path, runtime: CTCLIPRuntime) -> torch.Tensor:
    """(D,) image latent of a CT, or of an embedding file saved by `save_embedding` with this checkpoint."""
    if path.suffix != EMBEDDING_SUFFIX:
        return runtime.encode_volume(read_ct(path))[0][0]
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
            return stored.get_tensor("image_latent")
    except SafetensorError as error:
        raise CTInputError(f"{path}: not a readable embedding file ({error})") from None


def index_cases(cases: Sequence[Case], folder: Path, runtime: CTCLIPRuntime,
                on_case: Callable[[Case], None] | None = None) -> tuple[CaseIndex, dict[str, str]]:
    """Add the cases' image latents to the index in `folder` (created for this checkpoint if new); cases whose
    source is unchanged since they were added are skipped. Returns the index and {case id: why it was skipped}
    for cases that could not be read. The index is saved at the end and at most every INDEX_SAVE_INTERVAL_S."""
    index = CaseIndex.open_or_create(Path(folder), model_id=runtime.model_id,
                                     checkpoint_sha256=runtime.checkpoint_sha256, dim=runtime.latent_dim)
    unreadable: dict[str, str] = {}
    added, last_save = 0, time.monotonic()
    for case in cases:
        if on_case is not None:
            on_case(case)
        try:
            fingerprint = source_fingerprint(case.path)
            if index.contains(case.case_id, fingerprint):
                continue
            latent = case_latent(case.path, runtime)
        except CTFoundationError as error:
            unreadable[case.case_id] = str(error)
            continue
        index.add(case.case_id, latent.numpy(), CaseMetadata(str(case.path), fingerprint))
        added += 1
        if time.monotonic() - last_save > INDEX_SAVE_INTERVAL_S:  # an interrupted run keeps most of its work
            index.save()
            last_save = time.monotonic()
    if added:
        index.save()
    return index, unreadable
