"""Batch reports by registry id and plain options: load the models once, then `run_batch` over the cases.

    found = discover_cases([...])
    report_cases(found.cases, "reports/", ctclip={"model_id": "ct-clip-v2", "device": "auto"}, anatomy=True,
                 narrative="ct-chat-llama3.1-8b", skipped_inputs=found.skipped)

The CLI (`ctfoundation report`), the background worker and headless Slicer all come through here; every option
is plain data (paths, ids, numbers), so a request can travel as JSON.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from CTFoundationLib.anatomy.masks import AnatomyRequest
from CTFoundationLib.errors import CTFoundationError
from CTFoundationLib.inference.chat import ChatRuntime, available_chat_model, chat_dependency
from CTFoundationLib.inference.common import Progress, load_thresholds
from CTFoundationLib.inference.ctclip import CTCLIPRuntime
from CTFoundationLib.inference.store import ModelStore
from CTFoundationLib.io.cases import Case, SkippedInput, require_outside_series
from CTFoundationLib.io.files import require_writable_folder
from CTFoundationLib.models.ctchat.modeling import GenerationSettings
from CTFoundationLib.report.anatomy_section import anatomy_section
from CTFoundationLib.report.batch import BatchProgress, BatchSummary, Shard, run_batch
from CTFoundationLib.report.dicom import DicomExport, MapRegions
from CTFoundationLib.report.maps_section import maps_section
from CTFoundationLib.report.narrative import narrative_section
from CTFoundationLib.report.sections import ReportSection


def report_cases(
    cases: Sequence[Case],
    out: Path | str,
    *,
    ctclip: Mapping[str, Any] | None = None,
    thresholds: Path | str | None = None,
    anatomy: bool = False,
    use_totalsegmentator: bool = True,
    fvlm: Mapping[str, Any] | None = None,
    narrative: str | None = None,
    maps: bool = False,
    chat: Mapping[str, Any] | None = None,
    generation: GenerationSettings = GenerationSettings(),
    shard: Shard | None = None,
    force: bool = False,
    on_model_step: Progress | None = None,
    on_case_step: Callable[[BatchProgress], None] | None = None,
    skipped_inputs: Sequence[SkippedInput] = (),
    dicom_out: Path | str | None = None,
    read_workers: int = 0,
    models: ModelStore | None = None,
) -> BatchSummary:
    """Report every case (of the shard) into `out`; cases finished before with the same settings are skipped.

    ctclip: CTCLIPRuntime.from_registry's options (model_id, weights, model_config, text_encoder, device, dtype).
    anatomy: add the per-anatomy findings section (fvlm: FVLMScoring.from_registry's options).
    narrative: a CT-CHAT registry id whose report is added (chat: load_chat_model's options; it reads the token
    grid of the detection model, which must be the CT-CLIP that CT-CHAT was trained with).
    maps: add the finding-maps section (key images through each positive finding's map maximum, one NIfTI map per
    finding in the case's maps/ folder).
    skipped_inputs: files of the input folders that are not cases (`discover_cases`), listed in the summary.
    dicom_out: a folder for a DICOM SEG (anatomy, positive-finding regions) and SR (the findings) per DICOM case,
    in `<dicom_out>/<case folder>/`; other cases get a one-line note that DICOM output needs a DICOM source. The
    finding regions come from the finding maps (`MapRegions`), or from the grounding for a checkpoint without maps.
    read_workers: processes that read the next CTs while the model works (for a GPU; 0: read in turn).
    models: where the models come from and stay loaded (a long-lived process's store); default: loaded for this call.
    """
    ctclip = dict(ctclip or {})
    if narrative:
        if not (chat or {}).get("llm") and not (chat or {}).get("lora"):
            narrative = available_chat_model(narrative)
        encoder = chat_dependency(narrative, "ct-clip")
        if ctclip.get("model_id", "ct-clip-v2") != encoder:
            raise CTFoundationError(f"a {narrative} narrative needs the detection model {encoder} (its image encoder), "
                                    f"not {ctclip.get('model_id')}")
    threshold_table = load_thresholds(Path(thresholds) if thresholds else None)
    out = Path(out)
    require_outside_series(out, cases)
    require_writable_folder(out)  # before the model loads: an unusable output folder fails at once
    if dicom_out is not None:
        require_outside_series(Path(dicom_out), cases)
        require_writable_folder(Path(dicom_out))
    models = models or ModelStore()
    runtime = models.ctclip(ctclip, on_model_step)
    dicom = None
    if dicom_out is not None:
        dicom = DicomExport(Path(dicom_out), AnatomyRequest(use_totalsegmentator=use_totalsegmentator,
                                                            device=ctclip.get("device", "auto")),
                            **dicom_regions(runtime))
    sections: list[ReportSection] = []
    if anatomy:
        device = ctclip.get("device", "auto")
        request = AnatomyRequest(use_totalsegmentator=use_totalsegmentator, device=device)
        scoring = models.fvlm({**dict(fvlm or {}), "device": device}, on_model_step)
        sections.append(anatomy_section(request, scoring))
    if maps:
        sections.append(maps_section(runtime))
    if narrative:
        model = models.chat_model(narrative, {**dict(chat or {}), "device": ctclip.get("device", "auto")},
                                  on_model_step)
        runtime.keep_tokens = True  # detection's image pass also gives CT-CHAT its token grid: one pass per CT
        chat_runtime = ChatRuntime(model, runtime, progress=on_model_step, cache_tokens=False)
        sections.append(narrative_section(chat_runtime, narrative, generation, chat))
    return run_batch(runtime, cases, out, thresholds=threshold_table, sections=sections, shard=shard, force=force,
                     progress=on_case_step, skipped_inputs=skipped_inputs, dicom=dicom, read_workers=read_workers)


def dicom_regions(runtime: CTCLIPRuntime) -> dict:
    """DicomExport's region option: the finding maps' regions (sharing detection's image pass), none given (the
    grounding's) when the checkpoint has no maps (LiPro)."""
    try:
        runtime.require_maps()
    except CTFoundationError:
        return {}
    runtime.keep_tokens = True
    return {"regions": MapRegions(runtime)}
