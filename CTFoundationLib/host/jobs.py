"""The model jobs of the background worker: detect, ground, report and CT-CHAT, on plain-data requests.

Each job takes its request (a JSON object of plain options, paths as strings, checked here: a malformed request is
a one-line WorkerError) and a `JobContext`: where its events go, the models kept loaded (`ModelStore`: the
long-lived model process keeps them between jobs, a one-shot worker task uses a fresh store), and the stop flag that
Cancel sets. A job stops at its next step once the flag is set (JobCancelled); a CT-CHAT answer stops at its next
token, keeping the text written so far. Heavy libraries are imported inside the jobs.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from CTFoundationLib.errors import CTInputError, WorkerError
from CTFoundationLib.inference.store import ModelStore

# In the order they happen: the runtime encodes the zero-shot prompts (or reads them cached) while scoring.
DETECT_STEPS = ("read CT", "check CT", "load model", "preprocess", "encode image", "score", "encode prompts",
                "write result")
GROUND_STEPS = ("read CT", "load model", "fvlm: load model", "anatomy", "preprocess", "encode image", "score",
                "fvlm: preprocess", "fvlm: encode and score", "write result")
SIMILAR_STEPS = ("read CT", "load model", "preprocess", "encode image", "search")
DICOM_STEPS = ("read CT", "anatomy", "write DICOM")
ANATOMY_PATHS = ("segmentation", "radgenome", "radgenome_regions")  # AnatomyRequest fields that are paths
CTCLIP_OPTIONS = frozenset({"model_id", "weights", "model_config", "text_encoder", "device", "dtype", "with_text",
                            "home"})
FVLM_OPTIONS = frozenset({"weights", "thresholds", "mode", "config", "text_encoder", "home"})
CHAT_OPTIONS = frozenset({"llm", "lora", "use_lora", "projector", "template", "precision", "ctclip", "ctclip_config",
                          "device", "home"})
ANATOMY_OPTIONS = frozenset({"segmentation", "label_scheme", "radgenome", "radgenome_regions",
                             "use_totalsegmentator", "device"})


class JobCancelled(BaseException):
    """Raised at a job's next step after Cancel (a BaseException: no per-case `except Exception` may keep it)."""


@dataclass
class JobContext:
    """emit(event_type, **fields) sends one event; models keeps the loaded models; stop is set by Cancel."""

    emit: Callable[..., None]
    models: ModelStore = field(default_factory=ModelStore)
    stop: threading.Event = field(default_factory=threading.Event)

    def check(self) -> None:
        if self.stop.is_set():
            raise JobCancelled

    def step_emitter(self, steps: tuple[str, ...] = DETECT_STEPS) -> Callable[[str], None]:
        """A progress callback that turns runtime step names into numbered `step` events (an unknown step name
        keeps the number of the step before it) and ends the job there once it is cancelled."""
        last = [0]

        def step(name: str) -> None:
            self.check()
            canonical = name.removesuffix(" cached")
            last[0] = steps.index(canonical) + 1 if canonical in steps else last[0]
            self.emit("step", name=name, index=last[0], count=len(steps))

        return step


# --- request checks: one-line errors instead of a KeyError or TypeError deep inside -------------------------


def text_field(request: Mapping[str, Any], key: str, task: str) -> str:
    value = request.get(key)
    if not isinstance(value, str) or not value:
        raise WorkerError(f"worker request ({task}): '{key}' must be a non-empty string (a path), got {value!r}")
    return value


def options_field(request: Mapping[str, Any], key: str, allowed: frozenset[str], task: str) -> dict:
    value = request.get(key) or {}
    if not isinstance(value, dict):
        raise WorkerError(f"worker request ({task}): '{key}' must be a JSON object, got {type(value).__name__}")
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise WorkerError(f"worker request ({task}): unknown '{key}' options {unknown}; known: {sorted(allowed)}")
    return dict(value)


# --- detect and ground ------------------------------------------------------------------------------------


def read_request_volume(request: Mapping[str, Any], step: Callable[[str], None], task: str):
    """The request's CT ("ct"), with "volume_info" (where it really came from, e.g. the Slicer node) applied."""
    from CTFoundationLib.io.reading import read_ct
    from CTFoundationLib.models.devices import select_device

    ct = text_field(request, "ct", task)
    select_device(options_field(request, "ctclip", CTCLIP_OPTIONS, task).get("device", "auto"))  # fails early
    step("read CT")
    volume = read_ct(Path(ct))
    if request.get("volume_info"):
        apply_volume_info(volume, Path(text_field(request, "volume_info", task)))
    return volume


def apply_volume_info(volume, path: Path) -> None:
    """Replace the temporary file name with where the CT really came from (e.g. the Slicer node name)."""
    from CTFoundationLib.io.files import read_json_object

    info = read_json_object(path, "volume info", CTInputError)
    volume.source = str(info.get("source", volume.source))
    volume.metadata.update(info.get("metadata", {}))


def request_thresholds(request: Mapping[str, Any], task: str) -> dict:
    from CTFoundationLib.inference.common import load_thresholds

    path = request.get("thresholds")
    return load_thresholds(Path(text_field(request, "thresholds", task)) if path else None)


def detect(request: Mapping[str, Any], context: JobContext) -> Path:
    """Request: ct, volume_info, out (JSON file), ctclip (CTCLIPRuntime.from_registry's options), thresholds, and
    optionally maps (a folder: one NIfTI localisation map per finding, listed under "maps" in the JSON) and
    map_grid ("ct" or "tokens"). Writes what `ctfoundation detect --out [--maps]` writes."""
    from CTFoundationLib.inference.results import detection_report
    from CTFoundationLib.io.files import write_json_atomic
    from CTFoundationLib.io.sanity import summarize

    out = Path(text_field(request, "out", "detect"))
    step = context.step_emitter()
    volume = read_request_volume(request, step, "detect")
    step("check CT")
    summary = summarize(volume)
    for warning in summary["warnings"]:
        context.emit("warning", **warning)
    thresholds = request_thresholds(request, "detect")
    maps_folder, grid = request.get("maps"), request.get("map_grid", "ct")
    if grid not in ("ct", "tokens"):
        raise WorkerError(f"worker request (detect): 'map_grid' must be ct or tokens, got {grid!r}")
    runtime = context.models.ctclip(options_field(request, "ctclip", CTCLIP_OPTIONS, "detect"), step)
    runtime.keep_tokens = bool(maps_folder)  # the maps reuse detection's image pass
    result = runtime.detect(volume, thresholds)
    maps = None
    if maps_folder and runtime.method == "lipro":
        context.emit("warning", code="NO_MAPS", message=f"{runtime.model_id}: the LiPro head has no finding maps")
    elif maps_folder:
        maps = runtime.write_maps(volume, Path(text_field(request, "maps", "detect")), grid=grid)
    step("write result")
    write_json_atomic(out, detection_report(summary, result, maps))
    return out


def ground(request: Mapping[str, Any], context: JobContext) -> Path:
    """Request: ct, volume_info, out (folder), ctclip, thresholds, anatomy (AnatomyRequest's fields), fvlm
    (FVLMScoring.from_registry's options), report (text). Writes what `ctfoundation ground` writes."""
    from CTFoundationLib.anatomy.masks import AnatomyRequest
    from CTFoundationLib.inference.grounding import GROUNDED_FILE, ground_ct

    out = Path(text_field(request, "out", "ground"))
    report = request.get("report") or ""
    if not isinstance(report, str):
        raise WorkerError(f"worker request (ground): 'report' must be text, got {type(report).__name__}")
    step = context.step_emitter(GROUND_STEPS)
    volume = read_request_volume(request, step, "ground")
    ctclip = options_field(request, "ctclip", CTCLIP_OPTIONS, "ground")
    device = ctclip.get("device", "auto")
    thresholds = request_thresholds(request, "ground")
    runtime = context.models.ctclip(ctclip, step)
    fvlm = options_field(request, "fvlm", FVLM_OPTIONS, "ground")
    scoring = context.models.fvlm({**fvlm, "device": device}, step)
    anatomy = {key: Path(value) if key in ANATOMY_PATHS and value else value
               for key, value in options_field(request, "anatomy", ANATOMY_OPTIONS, "ground").items()}
    ground_ct(volume, out, runtime, scoring, AnatomyRequest(**{"device": device, **anatomy}), report, thresholds,
              step)
    step("write result")
    return out / GROUNDED_FILE


def similar(request: Mapping[str, Any], context: JobContext) -> Path:
    """Request: ct, volume_info, index (folder), k, target ("images" or "reports"), ctclip, out (JSON file).
    Writes {"index", "model", "target", "hits": [`describe_hit`, best first]}."""
    from CTFoundationLib.io.files import write_json_atomic
    from CTFoundationLib.retrieval import CaseIndex, describe_hit

    out = Path(text_field(request, "out", "similar"))
    index_folder = Path(text_field(request, "index", "similar"))
    target, k = request.get("target", "images"), request.get("k", 5)
    if target not in ("images", "reports") or isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise WorkerError(f"worker request (similar): 'target' must be images or reports and 'k' a positive integer, "
                          f"got {target!r} and {k!r}")
    step = context.step_emitter(SIMILAR_STEPS)
    volume = read_request_volume(request, step, "similar")
    ctclip = options_field(request, "ctclip", CTCLIP_OPTIONS, "similar")
    runtime = context.models.ctclip(ctclip, step)  # the detection model, kept loaded
    index = CaseIndex.open(index_folder, model_id=runtime.model_id, checkpoint_sha256=runtime.checkpoint_sha256)
    latent = runtime.encode_volume(volume)[0][0].numpy()
    step("search")
    hits = index.search(latent, k, target=target)
    write_json_atomic(out, {"index": str(index.folder), "model": index.model_id, "target": target,
                            "hits": [describe_hit(index, hit) for hit in hits]})
    return out


def dicom(request: Mapping[str, Any], context: JobContext) -> Path:
    """Request: ct, volume_info (the CT on the grid its masks use), dicom_files (the source series' files),
    detection (a `detect --out` JSON file), anatomy (AnatomyRequest's fields, e.g. a segmentation folder; default:
    TotalSegmentator if installed, else the built-in segmentation), maps ({finding: map file} of that detection,
    `detect --maps`, either grid: the positive findings' regions come from them; default: from the grounding),
    out (folder: seg.dcm, sr.dcm)."""
    import json

    from CTFoundationLib.anatomy.masks import AnatomyRequest, build_anatomy
    from CTFoundationLib.inference.results import DetectionResult
    from CTFoundationLib.report.dicom import source_series, write_dicom_outputs
    from CTFoundationLib.vocab import FVLM_ORGANS

    out = Path(text_field(request, "out", "dicom"))
    detection_file = text_field(request, "detection", "dicom")
    files = request.get("dicom_files") or []
    if not isinstance(files, list) or not all(isinstance(p, str) for p in files):
        raise WorkerError(f"worker request (dicom): 'dicom_files' must be a list of paths, got {files!r}")
    step = context.step_emitter(DICOM_STEPS)
    volume = read_request_volume(request, step, "dicom")
    series = source_series(volume, [Path(p) for p in files] or None)
    try:
        detection = DetectionResult.from_dict(json.loads(Path(detection_file).read_text("utf-8"))["detection"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CTInputError(f"detection result {detection_file} cannot be read ({error}); run Detect again") from None
    anatomy = {key: Path(value) if key in ANATOMY_PATHS and value else value
               for key, value in options_field(request, "anatomy", ANATOMY_OPTIONS, "dicom").items()}
    masks = build_anatomy(volume, AnatomyRequest(**anatomy), FVLM_ORGANS, step)
    regions = request_map_regions(request, volume, detection)
    step("write DICOM")
    written = write_dicom_outputs(volume, detection, out, masks, regions, series=series)
    for note in written.notes:
        context.emit("note", message=note)
    return written.sr


def request_map_regions(request: Mapping[str, Any], volume, detection) -> dict | None:
    """The dicom request's `maps` as finding regions (`map_regions`); None without maps (the grounding's)."""
    from CTFoundationLib.inference.maps import read_map_files
    from CTFoundationLib.report.dicom import map_regions

    files = request.get("maps")
    if not files:
        return None
    if not isinstance(files, dict) or not all(isinstance(p, str) for p in files.values()):
        raise WorkerError(f"worker request (dicom): 'maps' must map findings to map files, got {files!r}")
    return map_regions(read_map_files(files, detection.model), volume, detection)


# --- batch reports ----------------------------------------------------------------------------------------


def report(request: Mapping[str, Any], context: JobContext) -> Path:
    """`ctfoundation report` with progress as events: a `step` per case step, a `warning` per failed case.

    Request: inputs (list), out (folder) and report_cases' options (generation as GenerationSettings' fields,
    shard as "I/N")."""
    from CTFoundationLib.io.cases import discover_cases
    from CTFoundationLib.models.ctchat.modeling import GenerationSettings
    from CTFoundationLib.report import Shard
    from CTFoundationLib.report.pipeline import report_cases

    options = {key: value for key, value in request.items() if key not in ("id", "op")}  # the model process's
    inputs = options.pop("inputs", None)
    if not isinstance(inputs, list) or not inputs or not all(isinstance(p, str) for p in inputs):
        raise WorkerError(f"worker request (report): 'inputs' must be a non-empty list of paths, got {inputs!r}")
    out = Path(text_field(options, "out", "report"))
    options.pop("out")
    options["ctclip"] = options_field(options, "ctclip", CTCLIP_OPTIONS, "report")
    if options.get("shard"):
        options["shard"] = Shard.parse(options["shard"])
    try:
        options["generation"] = GenerationSettings(**options_field(options, "generation", frozenset(
            GenerationSettings.__dataclass_fields__), "report"))
        found = discover_cases([Path(p) for p in inputs])
        context.emit("note", message=f"{len(found.cases)} case(s) found")

        def on_case_step(event) -> None:
            context.check()
            context.emit("step", name=f"{event.case_id}: {event.step}", index=event.done, count=event.total)

        summary = report_cases(found.cases, out, **options, on_model_step=context.step_emitter(),
                               on_case_step=on_case_step, skipped_inputs=found.skipped, models=context.models)
    except TypeError as error:  # an option report_cases does not take
        raise WorkerError(f"worker request (report): {error}") from None
    for skipped in found.skipped:
        context.emit("warning", code="INPUT_SKIPPED", message=f"{skipped.path}: {skipped.reason}")
    for outcome in summary.with_status("failed"):
        context.emit("warning", code="CASE_FAILED", message=f"{outcome.case_id}: {outcome.error}")
    return summary.index_html


# --- CT-CHAT: sessions live in the model process, the client holds their ids ----------------------------------


@dataclass
class ChatSessions:
    """The open conversations of a model process: id (the id of the request that opened it: a client can send
    questions before the answer to that request arrives) -> (ChatSession, the key of the model it talks to)."""

    sessions: dict[Any, tuple[Any, str]] = field(default_factory=dict)

    def add(self, session_id: Any, session, model_key: str) -> Any:
        self.sessions[session_id] = (session, model_key)
        return session_id

    def get(self, session_id: Any, models: ModelStore):
        from CTFoundationLib.errors import ChatError

        if session_id not in self.sessions:
            raise ChatError(f"no chat {session_id!r} in the model process (it was restarted or the chat was "
                            "closed); start a new chat")
        session, model_key = self.sessions[session_id]
        if models.kept().get("ct-chat") != model_key:
            raise ChatError("the CT-CHAT model of this chat was unloaded or replaced; start a new chat")
        return session


def chat_options(request: Mapping[str, Any]) -> tuple[str, dict]:
    model = request.get("model") or "ct-chat-llama3.1-8b"
    if not isinstance(model, str):
        raise WorkerError(f"worker request (chat_start): 'model' must be a registry id, got {model!r}")
    return model, options_field(request, "chat", CHAT_OPTIONS, "chat_start")


def chat_start(request: Mapping[str, Any], context: JobContext, sessions: ChatSessions) -> dict:
    """Request: id, model (CT-CHAT registry id), chat (ChatRuntime.from_registry's options, device included),
    ct and volume_info (optional: no CT, general questions), max_new_tokens. Result: the session id (the
    request's id)."""
    from CTFoundationLib.models.ctchat.modeling import GenerationSettings

    model, options = chat_options(request)
    tokens = request.get("max_new_tokens")
    if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1):
        raise WorkerError(f"worker request (chat_start): 'max_new_tokens' must be a positive integer, got {tokens!r}")
    step = context.step_emitter(("read CT", "load model", "encode CT"))
    volume = read_request_volume(request, step, "chat_start") if request.get("ct") else None
    runtime = context.models.chat(model, options, step)
    session = runtime.session(volume)
    if tokens is not None:
        session.settings = GenerationSettings(max_new_tokens=tokens)
    return {"session": sessions.add(request["id"], session, context.models.kept()["ct-chat"])}


def chat_answer(request: Mapping[str, Any], context: JobContext, sessions: ChatSessions) -> dict:
    """Request: session, question and answer_type (or report: true for the report turn). Streams `token` events;
    Cancel stops the answer (kept, marked stopped). Result: the answer, its anatomy paths and the transcript."""
    session = sessions.get(request.get("session"), context.models)

    def on_token(text: str) -> None:
        context.emit("token", text=text)

    if request.get("report"):
        answer = session.generate_report(on_token, context.stop)
    else:
        question = request.get("question")
        if not isinstance(question, str):
            raise WorkerError(f"worker request (chat_ask): 'question' must be text, got {question!r}")
        answer = session.ask(question, str(request.get("answer_type") or "free"), on_token, context.stop)
    return {"answer": answer.to_dict(), "anatomy_paths": answer.anatomy_paths, "transcript": session.transcript()}
