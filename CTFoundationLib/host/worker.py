"""Background entry point: `python -m CTFoundationLib.host.worker TASK ...` (Slicer runs it with PythonSlicer).

Tasks:
  serve                                  the long-lived model process (host.server): requests on stdin, models kept
  detect REQUEST.json                    one CT -> the JSON `ctfoundation detect --out` writes
  ground REQUEST.json                    one CT -> grounded.json + masks/ as `ctfoundation ground` writes
  report REQUEST.json                    batch reports exactly as `ctfoundation report` writes them
  similar REQUEST.json                   one CT -> its most similar cases in a case index (JSON of the hits)
  dicom REQUEST.json                     one CT's detection -> DICOM SEG + SR referencing its source DICOM series
  download MODEL [--accept-licenses]     weights (and what they depend on) into the cache
  import MODEL FILE_OR_FOLDER [--link]   weights obtained elsewhere, checked and copied into the cache
  devices                                what PyTorch can run on (CPU, CUDA GPUs with name and memory)

Progress goes to stdout as event lines (`host.process.format_event`): started, step, warning, file,
bytes, note, devices, result, error. Exit code (as the CLI's): 0 success, 2 a CTFoundationError (the `error` event
carries its one-line message), 3 an unexpected failure (traceback in the event's `details`), 130 interrupted.
The jobs themselves (detect, ground, report, similar, dicom, CT-CHAT) are in host.jobs.
Heavy libraries (torch) are imported by the tasks that need them, not when this module is imported.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from CTFoundationLib.errors import EXIT_ERROR, EXIT_INTERNAL, EXIT_INTERRUPTED, CTFoundationError, WorkerError
from CTFoundationLib.host import jobs
from CTFoundationLib.host.allocator import reuse_freed_memory
from CTFoundationLib.host.process import format_event
from CTFoundationLib.host.server import serve
from CTFoundationLib.io.files import read_json_object

BYTES_EVENT_INTERVAL_S = 0.25


def emit(event_type: str, **fields) -> None:
    """Print one event line and flush, so the parent sees it at once."""
    print(format_event(event_type, **fields), flush=True)


# --- detect, ground, report: one JSON request each, run once with the models loaded for it ------------------


def read_request(path: Path) -> dict:
    """The task's request: a JSON object of plain options (paths as strings), written by the caller."""
    return read_json_object(path, "worker request", WorkerError)


def one_shot(job: Callable[[dict, jobs.JobContext], Path]) -> Callable[[argparse.Namespace], Path]:
    """A `host.jobs` job as a one-shot task: its request from the file named on the command line."""
    return lambda args: job(read_request(args.request), jobs.JobContext(emit))


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
    "detect": (add_request_argument, one_shot(jobs.detect)),
    "ground": (add_request_argument, one_shot(jobs.ground)),
    "report": (add_request_argument, one_shot(jobs.report)),
    "similar": (add_request_argument, one_shot(jobs.similar)),
    "dicom": (add_request_argument, one_shot(jobs.dicom)),
    "serve": (lambda parser: None, lambda args: None),  # main() hands it to host.server
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
    if task == "serve":  # its events belong to its requests: no task-level started/result
        return serve()
    emit("started", task=task, pid=os.getpid())
    try:
        output = TASKS[task][1](args)
    except CTFoundationError as error:  # expected (bad input, a malformed request): its one line says it all
        emit("error", kind=type(error).__name__, message=str(error), details="")
        return EXIT_ERROR
    except jobs.JobCancelled:
        emit("error", kind="JobCancelled", message="cancelled", details="")
        return EXIT_INTERRUPTED
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
