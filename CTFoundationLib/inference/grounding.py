"""A grounded result per case: for each anatomy segment, its findings (CT-CLIP and fVLM side by side), thresholds,
positive flags and the report/answer sentences about it. JSON-ready (`GroundedCase.to_dict`).

Findings go to segments by `Resources/anatomy/finding_anatomy.json` (CT-RATE finding -> fVLM organ and RadGenome
region); sentences by their grounded RadGenome path (a segment takes a sentence whose path lies on its branch: the
same place, an ancestor or a descendant, so "right lower lobe" goes to `lung_right` and `lung_lower_lobe_right`,
not to the left lung). Without a threshold, positive means P >= DEFAULT_THRESHOLD (P(positive) > P(negative)).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path

from CTFoundationLib.anatomy.masks import AnatomyMasks, AnatomyRequest, Segment, build_anatomy
from CTFoundationLib.anatomy.sentences import GroundedSentence, default_grounder
from CTFoundationLib.errors import CTFoundationError, WeightsError
from CTFoundationLib.inference.common import Progress, load_thresholds
from CTFoundationLib.inference.ctclip import CTCLIPRuntime
from CTFoundationLib.inference.fvlm import MODES, FVLMResult, FVLMRuntime
from CTFoundationLib.inference.maps import maps_record, write_map_niftis
from CTFoundationLib.inference.results import DetectionResult
from CTFoundationLib.io.files import write_json_atomic
from CTFoundationLib.io.sanity import summarize
from CTFoundationLib.io.volume import CTVolume
from CTFoundationLib.resources import ANATOMY_RESOURCES
from CTFoundationLib.vocab import FVLM_ORGANS
from CTFoundationLib.weights import load_registry, resolve_weights

DEFAULT_THRESHOLD = 0.5
GROUNDED_FILE = "grounded.json"


@cache
def finding_map() -> dict:
    return json.loads((ANATOMY_RESOURCES / "finding_anatomy.json").read_text())


@dataclass
class Score:
    probability: float
    threshold: float
    positive: bool
    threshold_source: str  # "given" or "default"


@dataclass
class SegmentFinding:
    name: str
    ctclip: Score | None = None
    fvlm: Score | None = None

    @property
    def positive(self) -> bool:
        return any(s.positive for s in (self.ctclip, self.fvlm) if s)

    @property
    def max_probability(self) -> float:
        return max((s.probability for s in (self.ctclip, self.fvlm) if s), default=0.0)


@dataclass
class GroundedSegment:
    name: str
    title: str
    region: str | None
    path: str | None
    fvlm_organ: str | None
    laterality: str | None
    volume_ml: float
    centroid_ras_mm: list[float]
    findings: list[SegmentFinding] = field(default_factory=list)
    sentences: list[dict] = field(default_factory=list)

    @property
    def positive(self) -> bool:
        return any(f.positive for f in self.findings)

    @property
    def score(self) -> float:
        """The highest P(positive) of its findings (what colours the segment)."""
        return max((f.max_probability for f in self.findings), default=0.0)


@dataclass
class GroundedCase:
    source: str
    anatomy: dict
    models: dict
    segments: dict[str, GroundedSegment]
    unplaced_findings: list[str]
    unplaced_sentences: list[dict]

    def to_dict(self) -> dict:
        segments = {
            name: {**asdict(s), "positive": s.positive, "score": round(s.score, 6),
                   "findings": [{**asdict(f), "positive": f.positive} for f in s.findings]}
            for name, s in self.segments.items()
        }
        return {"source": self.source, "anatomy": self.anatomy, "models": self.models, "segments": segments,
                "unplaced_findings": self.unplaced_findings, "unplaced_sentences": self.unplaced_sentences,
                "finding_map": finding_map()["description"]}


DEMO_FVLM = "fvlm-demo"  # stands in for the official fVLM when that is not installed


@dataclass
class FVLMScoring:
    """A loaded fVLM with its thresholds and mode, or (runtime None) why fVLM is skipped. notice: what the output
    must say about the model used (the demo fVLM standing in for missing official weights)."""

    runtime: FVLMRuntime | None
    skipped: str | None = None
    thresholds: Mapping[str, float] | None = None
    mode: str = "organ"
    notice: str | None = None

    @classmethod
    def from_registry(cls, *, weights: Path | str | None = None, thresholds: Path | str | None = None,
                      mode: str = "organ", **runtime_options) -> FVLMScoring:
        """The installed fVLM (or `weights`) ready to score; without either, the demo fVLM (`fvlm-demo`) when it
        is built, with a notice saying so; else a scoring that says fVLM is skipped.

        runtime_options: FVLMRuntime.from_registry's (config, text_encoder, device, home, progress).
        """
        if mode not in MODES:
            raise CTFoundationError(f"fVLM mode must be one of {list(MODES)}, got {mode!r}")
        try:
            resolve_weights("fvlm", weights, home=runtime_options.get("home"))
        except WeightsError as error:
            if weights is not None:
                raise
            try:
                resolve_weights(DEMO_FVLM, home=runtime_options.get("home"))
            except WeightsError:
                return cls(None, f"fVLM skipped: {error} (or build the demo fVLM: `python -m training.demo build "
                                 "--model fvlm-demo` from the repository root)")
            runtime = FVLMRuntime.from_registry(DEMO_FVLM, **runtime_options)
            notice = (f"no official fVLM weights installed: the organ scores come from the demo fVLM "
                      f"({load_registry().get(DEMO_FVLM).runtime.notice})")
            return cls(runtime, None, load_thresholds(Path(thresholds) if thresholds else None), mode, notice)
        runtime = FVLMRuntime.from_registry(weights=weights, **runtime_options)
        return cls(runtime, None, load_thresholds(Path(thresholds) if thresholds else None), mode)

    def score(self, volume, anatomy: AnatomyMasks) -> tuple[FVLMResult | None, dict]:
        """(fVLM result or None, its record for `GroundedCase.models`) of one CT and its anatomy."""
        if self.runtime is None:
            return None, {"available": False, "reason": self.skipped}
        organs = self.runtime.organs
        organ_labels = anatomy.fvlm_labels(organs)
        if not organ_labels.any():
            reason = f"fVLM skipped: none of its organs ({', '.join(organs)}) is in the anatomy masks"
            return None, {"available": False, "reason": reason}
        result = self.runtime.score(volume, organ_labels, self.thresholds, self.mode)
        return result, {**result.to_dict(), **({"notice": self.notice} if self.notice else {})}


def _score(probability: float, threshold: float | None) -> Score:
    chosen = DEFAULT_THRESHOLD if threshold is None else threshold
    return Score(round(probability, 6), chosen, probability >= chosen, "default" if threshold is None else "given")


def segments_for(anatomy: AnatomyMasks, region: str | None, fvlm_organ: str | None = None) -> list[str]:
    """Segments showing a finding/sentence: those of its fVLM organ, else of its region, else of the region's hosts."""
    if fvlm_organ and (names := anatomy.names_in(fvlm_organ=fvlm_organ)):
        return names
    if region is None:
        return []
    if names := anatomy.names_in(region=region):
        return names
    hosts = finding_map()["region_hosts"].get(region, [])
    return [n for host in hosts for n in (anatomy.names_in(region=host) or ([host] * (host in anatomy.segments)))]


def _on_branch(segment: Segment, path: str) -> bool:
    own = segment.info.path or ""
    return bool(own) and (path == own or path.startswith(own + "/") or own.startswith(path + "/"))


def ground_case(anatomy: AnatomyMasks, ctclip: DetectionResult | None, fvlm: FVLMResult | None,
                sentences: list[GroundedSentence], models: dict, source: str) -> GroundedCase:
    """Put the model findings and the grounded sentences on the anatomy segments."""
    segments = {
        name: GroundedSegment(name, s.info.title, s.info.region, s.info.path, s.info.fvlm_organ, s.info.laterality,
                              round(anatomy.volume_ml(name), 2),
                              [round(float(v), 1) for v in anatomy.centroid_ras(name)])
        for name, s in anatomy.segments.items()
    }
    ctclip_by_name = {f.name: f for f in ctclip.findings} if ctclip else {}
    fvlm_by_name = {f.name: f for f in fvlm.findings} if fvlm else {}
    unplaced_findings = []
    for finding, where in finding_map()["findings"].items():
        if finding not in ctclip_by_name and finding not in fvlm_by_name:
            continue
        targets = segments_for(anatomy, where["region"], where["fvlm_organ"])
        if not targets:
            unplaced_findings.append(finding)
        c, f = ctclip_by_name.get(finding), fvlm_by_name.get(finding)
        for name in targets:
            segments[name].findings.append(SegmentFinding(
                finding, _score(c.probability, c.threshold) if c else None,
                _score(f.probability, f.threshold) if f else None))
    unplaced_sentences = []
    for sentence in sentences:
        entry = {"text": sentence.text, "path": sentence.path, "laterality": sentence.laterality,
                 "negated": sentence.negated}
        targets = [n for n, s in anatomy.segments.items() if sentence.path and _on_branch(s, sentence.path)]
        targets = targets or (segments_for(anatomy, sentence.region) if sentence.region else [])
        if sentence.laterality in ("left", "right"):  # "left pleural effusion" -> the left lung only
            targets = [n for n in targets if anatomy.segments[n].info.laterality in (None, sentence.laterality)]
        for name in targets:
            segments[name].sentences.append(entry)
        if not targets:
            unplaced_sentences.append({**entry, "region": sentence.region})
    return GroundedCase(source, anatomy.summary(), models, segments, unplaced_findings, unplaced_sentences)


@dataclass(frozen=True)
class FVLMMapsRequest:
    """Where fVLM's finding maps go (one NIfTI per scored finding) and on which grid ("tokens" or "ct")."""

    folder: Path
    grid: str = "tokens"

    def write(self, volume: CTVolume, fvlm: FVLMScoring, result: FVLMResult | None) -> dict:
        """The maps of the last fVLM score of `volume` -> their record ({written: False, reason} without fVLM)."""
        if result is None:
            return {"written": False, "reason": "fVLM did not score this CT"}
        organs = {}
        for organ, maps in fvlm.runtime.finding_maps(volume).items():
            written = write_map_niftis(maps, volume, self.folder, grid=self.grid)
            organs[organ] = maps_record(self.folder, written, maps.model, self.grid)["findings"]
        return {"written": True, "folder": str(self.folder), "grid": self.grid, "model": result.model,
                "units": "logit (each token's share of ln(P / (1 - P)), less a per-finding constant)",
                "organs": organs}


def ground_ct(volume: CTVolume, out: Path, ctclip: CTCLIPRuntime, fvlm: FVLMScoring,
              anatomy: AnatomyRequest = AnatomyRequest(), report: str = "",
              thresholds: Mapping[str, float] | None = None, progress: Progress | None = None,
              fvlm_maps: FVLMMapsRequest | None = None) -> GroundedCase:
    """Ground one CT: anatomy, CT-CLIP and fVLM scores per segment, the report's sentences on their segments;
    writes `out/grounded.json` (the input summary and `GroundedCase.to_dict`) and `out/masks/<segment>.nii.gz`;
    with `fvlm_maps`, fVLM's finding maps too (recorded under `fvlm_maps`)."""
    summary = summarize(volume)
    masks = build_anatomy(volume, anatomy, FVLM_ORGANS, progress)
    detection = ctclip.detect(volume, thresholds)
    if fvlm_maps is not None and fvlm.runtime is not None:
        fvlm.runtime.keep_windows = True  # the maps reuse the scoring pass
    fvlm_result, fvlm_record = fvlm.score(volume, masks)
    sentences = default_grounder().ground_report(report)
    case = ground_case(masks, detection, fvlm_result, sentences,
                       {"ct-clip": detection.to_dict(), "fvlm": fvlm_record}, volume.source)
    written = masks.save_nifti(Path(out) / "masks")
    result = case.to_dict()
    for name, path in written.items():
        result["segments"][name]["mask_file"] = str(path.relative_to(out))
    if fvlm_maps is not None:
        result["fvlm_maps"] = fvlm_maps.write(volume, fvlm, fvlm_result)
    write_json_atomic(Path(out) / GROUNDED_FILE, {"input": summary, **result})
    return case
