"""Background entry point: `python -m CTFoundationLib.host.worker TASK ...` (Slicer runs it with PythonSlicer).

Tasks:
  detect REQUEST.json                    one CT -> the JSON `ctfoundation detect --out` writes
  ground REQUEST.json                    one CT -> grounded.json + masks/ as `ctfoundation ground` writes
  report REQUEST.json                    batch reports exactly as `ctfoundation report` writes them
  download MODEL [--accept-licenses]     weights (and what they depend on) into the cache
  import MODEL FILE_OR_FOLDER [--link]   weights obtained elsewhere, checked and copied into the cache
  devices                                what PyTorch can run on (CPU, CUDA GPUs with name and memory)

Progress goes to stdout as event lines (`host.process.format_event`): started, step, warning, file,
bytes, note, devices, result, error. Exit code (as the CLI's): 0 success, 2 a CTFoundationError (the `error` event
carries its message), 3 an unexpected failure (traceback in the event's `details`), 130 interrupted.
Heavy libraries (torch) are imported by the tasks that need them, not when this module is imported.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from CTFoundationLib.errors import EXIT_ERROR, EXIT_INTERNAL, EXIT_INTERRUPTED, CTFoundationError, CTInputError
from CTFoundationLib.host.allocator import reuse_freed_memory
from CTFoundationLib.host.process import format_event

# In the order they happen: the runtime encodes the zero-shot prompts (or reads them cached) while scoring.
DETECT_STEPS = ("read CT", "check CT", "load model", "preprocess", "encode image", "score", "encode prompts",
                "write result")
GROUND_STEPS = ("read CT", "load model", "fvlm: load model", "anatomy", "preprocess", "encode image", "score",
                "fvlm: preprocess", "fvlm: encode and score", "write result")
BYTES_EVENT_INTERVAL_S = 0.25
ANATOMY_PATHS = ("segmentation", "radgenome", "radgenome_regions")  # AnatomyRequest fields that are paths


def emit(event_type: str, **fields) -> None:
    """Print one event line and flush, so the parent sees it at once."""
    print(format_event(event_type, **fields), flush=True)


def step_emitter(steps: tuple[str, ...] = DETECT_STEPS) -> Callable[[str], None]:
    """A progress callback that turns runtime step names into numbered `step` events (an unknown step name
    keeps the number of the step before it)."""
    last = [0]

    def step(name: str) -> None:
        canonical = name.removesuffix(" cached")
        last[0] = steps.index(canonical) + 1 if canonical in steps else last[0]
        emit("step", name=name, index=last[0], count=len(steps))

    return step


# --- detect, ground, report: one JSON request each ------------------------------------------------------


def read_request(path: Path) -> dict:
    """The task's request: a JSON object of plain options (paths as strings), written by the caller."""
    try:
        request = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise CTFoundationError(f"worker request {path} cannot be read as JSON ({error})") from None
    if not isinstance(request, dict):
        raise CTFoundationError(f"worker request {path}: expected a JSON object")
    return request


def read_request_volume(request: dict, step: Callable[[str], None]):
    """The request's CT ("ct"), with "volume_info" (where it really came from, e.g. the Slicer node) applied."""
    from CTFoundationLib.io.reading import read_ct
    from CTFoundationLib.models.devices import select_device

    select_device(request.get("ctclip", {}).get("device", "auto"))  # a bad device name fails before any work
    step("read CT")
    volume = read_ct(Path(request["ct"]))
    if request.get("volume_info"):
        apply_volume_info(volume, Path(request["volume_info"]))
    return volume


def run_detect(args: argparse.Namespace) -> Path:
    """Request: ct, volume_info, out (JSON file), ctclip (CTCLIPRuntime.from_registry's options), thresholds, and
    optionally maps (a folder: one NIfTI localisation map per finding, listed under "maps" in the JSON) and
    map_grid ("ct" or "tokens")."""
    from CTFoundationLib.inference.common import load_thresholds
    from CTFoundationLib.inference.ctclip import CTCLIPRuntime
    from CTFoundationLib.inference.results import detection_report
    from CTFoundationLib.io.files import write_json_atomic
    from CTFoundationLib.io.sanity import summarize

    request, step = read_request(args.request), step_emitter()
    volume = read_request_volume(request, step)
    step("check CT")
    summary = summarize(volume)
    for warning in summary["warnings"]:
        emit("warning", **warning)
    thresholds = load_thresholds(request.get("thresholds"))
    runtime = CTCLIPRuntime.from_registry(**request.get("ctclip", {}), progress=step)
    runtime.keep_tokens = bool(request.get("maps"))  # the maps reuse detection's image pass
    result = runtime.detect(volume, thresholds)
    maps = None
    if request.get("maps") and runtime.method == "lipro":
        emit("warning", code="NO_MAPS", message=f"{runtime.model_id}: the LiPro head has no finding maps")
    elif request.get("maps"):
        maps = runtime.write_maps(volume, Path(request["maps"]), grid=request.get("map_grid", "ct"))
    step("write result")
    out = Path(request["out"])
    write_json_atomic(out, detection_report(summary, result, maps))
    return out


def run_ground_task(args: argparse.Namespace) -> Path:
    """Request: ct, volume_info, out (folder), ctclip, thresholds, anatomy (AnatomyRequest's fields), fvlm
    (FVLMScoring.from_registry's options), report (text)."""
    from CTFoundationLib.anatomy.masks import AnatomyRequest
    from CTFoundationLib.inference.common import load_thresholds
    from CTFoundationLib.inference.ctclip import CTCLIPRuntime
    from CTFoundationLib.inference.grounding import GROUNDED_FILE, FVLMScoring, ground_ct

    request, step = read_request(args.request), step_emitter(GROUND_STEPS)
    volume = read_request_volume(request, step)
    ctclip = request.get("ctclip", {})
    device = ctclip.get("device", "auto")
    thresholds = load_thresholds(request.get("thresholds"))
    runtime = CTCLIPRuntime.from_registry(**ctclip, progress=step)
    scoring = FVLMScoring.from_registry(**request.get("fvlm", {}), device=device, progress=step)
    anatomy = {key: Path(value) if key in ANATOMY_PATHS and value else value
               for key, value in request.get("anatomy", {}).items()}
    out = Path(request["out"])
    ground_ct(volume, out, runtime, scoring, AnatomyRequest(**{"device": device, **anatomy}),
              request.get("report", ""), thresholds, step)
    step("write result")
    return out / GROUNDED_FILE


def apply_volume_info(volume, path: Path) -> None:
    """Replace the temporary file name with where the CT really came from (e.g. the Slicer node name)."""
    try:
        info = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise CTInputError(f"volume info {path} cannot be read as JSON ({error})") from error
    volume.source = str(info.get("source", volume.source))
    volume.metadata.update(info.get("metadata", {}))


def run_report_task(args: argparse.Namespace) -> Path:
    """`ctfoundation report` with progress as events: a `step` per case step, a `warning` per failed case.

    Request: inputs (list), out (folder) and report_cases' options (generation as GenerationSettings' fields,
    shard as "I/N")."""
    from CTFoundationLib.io.cases import discover_cases
    from CTFoundationLib.models.ctchat.modeling import GenerationSettings
    from CTFoundationLib.report import Shard
    from CTFoundationLib.report.pipeline import report_cases

    request = read_request(args.request)
    found = discover_cases([Path(p) for p in request.pop("inputs")])
    cases = found.cases
    out = Path(request.pop("out"))
    if request.get("shard"):
        request["shard"] = Shard.parse(request["shard"])
    request["generation"] = GenerationSettings(**request.get("generation", {}))
    emit("note", message=f"{len(cases)} case(s) found")
    model_step = step_emitter()

    def on_case_step(event) -> None:
        emit("step", name=f"{event.case_id}: {event.step}", index=event.done, count=event.total)

    summary = report_cases(cases, out, **request, on_model_step=model_step, on_case_step=on_case_step,
                           skipped_inputs=found.skipped)
    for skipped in found.skipped:
        emit("warning", code="INPUT_SKIPPED", message=f"{skipped.path}: {skipped.reason}")
    for outcome in summary.with_status("failed"):
        emit("warning", code="CASE_FAILED", message=f"{outcome.case_id}: {outcome.error}")
    return summary.index_html


# --- weights --------------------------------------------------------------------------------------------


def add_weights_arguments(parser: argparse.ArgumentParser, importing: bool) -> None:
    parser.add_argument("model", help="model id from the registry, e.g. ct-clip-v2")
    if importing:
        parser.add_argument("source", type=Path, help="file or folder holding the model's files")
        parser.add_argument("--link", action="store_true", help="hard-link instead of copying (same filesystem)")
    else:
        parser.add_argument("--no-deps", action="store_true", help="not the models this one depends on")
    parser.add_argument("--home", type=Path, help="weights cache root (default: $CTFOUNDATION_HOME)")
    parser.add_argument("--accept-licenses", action="store_true", help="the user has read and accepted them")


def run_download(args: argparse.Namespace) -> Path:
    from CTFoundationLib.weights import DownloadOptions, download_model

    last = [0.0]

    def on_bytes(done: int, total: int | None) -> None:
        now = time.monotonic()
        if now - last[0] >= BYTES_EVENT_INTERVAL_S or (total is not None and done >= total):
            last[0] = now
            emit("bytes", done=done, total=total)

    options = DownloadOptions(
        progress=on_bytes,
        on_file=lambda name, size: emit("file", name=name, size=size),
        on_event=lambda message: emit("note", message=message),
    )
    return download_model(
        args.model, home=args.home, with_deps=not args.no_deps, accept_licenses=args.accept_licenses, options=options
    )


def run_import(args: argparse.Namespace) -> Path:
    from CTFoundationLib.weights import import_model

    emit("note", message=f"checking {args.source}")
    return import_model(
        args.model, args.source, home=args.home, accept_licenses=args.accept_licenses, link=args.link
    )


# --- devices --------------------------------------------------------------------------------------------


def run_devices(args: argparse.Namespace) -> None:
    import torch

    devices = [{"id": "auto", "label": "auto (GPU when present)"}, {"id": "cpu", "label": "CPU"}]
    for index in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        properties = torch.cuda.get_device_properties(index)
        memory_gb = properties.total_memory / 2**30
        devices.append({"id": f"cuda:{index}", "label": f"cuda:{index} {properties.name} ({memory_gb:.0f} GB)"})
    emit("devices", devices=devices, torch=torch.__version__)


def add_request_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("request", type=Path, help="JSON file of the task's options (see the task's docstring)")


# --- main -----------------------------------------------------------------------------------------------

TASKS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], object]]] = {
    "detect": (add_request_argument, run_detect),
    "ground": (add_request_argument, run_ground_task),
    "report": (add_request_argument, run_report_task),
    "download": (lambda parser: add_weights_arguments(parser, importing=False), run_download),
    "import": (lambda parser: add_weights_arguments(parser, importing=True), run_import),
    "devices": (lambda parser: None, run_devices),
}


def parse(argv: list[str]) -> tuple[str, argparse.Namespace]:
    """Split off the task name, then build only that task's parser (keeps torch out of weights tasks)."""
    if not argv or argv[0] not in TASKS:
        raise SystemExit(f"usage: python -m CTFoundationLib.host.worker {{{','.join(TASKS)}}} ... (got {argv[:1]})")
    task = argv[0]
    parser = argparse.ArgumentParser(prog=f"CTFoundationLib.host.worker {task}")
    TASKS[task][0](parser)
    return task, parser.parse_args(argv[1:])


def main(argv: list[str] | None = None) -> int:
    task, args = parse(sys.argv[1:] if argv is None else argv)
    reuse_freed_memory()
    emit("started", task=task, pid=os.getpid())
    try:
        output = TASKS[task][1](args)
    except CTFoundationError as error:
        emit("error", kind=type(error).__name__, message=str(error), details=traceback.format_exc())
        return EXIT_ERROR
    except KeyboardInterrupt:
        emit("error", kind="KeyboardInterrupt", message="interrupted", details="")
        return EXIT_INTERRUPTED
    except Exception as error:  # reported to the GUI with its traceback instead of dying silently
        message = f"unexpected {type(error).__name__}: {error}"
        emit("error", kind=type(error).__name__, message=message, details=traceback.format_exc())
        return EXIT_INTERNAL
    emit("result", task=task, path=str(output) if output is not None else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
