"""First and second detection from the Slicer module's logic on the model process, in seconds.

The first detection starts the model process (Python + torch import), loads the model, then reads, preprocesses,
encodes and scores the CT; the second finds the model loaded and costs the CT's way in (the main thread writes the
node's voxels for the process, the process reads them) plus preprocessing, the image encode and scoring.
Runs the logic against the Slicer stand-in (Testing/slicer_standin, real VTK) on the RICORD CT (DICOM series,
512 x 512 x 255), with the demo model by default.

Run: CTFOUNDATION_HOME=/work/demo_home PYTHONPATH=. .venv/bin/python Testing/benchmarks/bench_model_process.py \
         [--model ct-clip-demo] [--device cpu] [--ct DICOM_FOLDER_OR_FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import nibabel

TESTING = Path(__file__).resolve().parents[1]
REPO = TESTING.parent
sys.path[:0] = [str(TESTING / "slicer_standin"), str(REPO / "CTFoundation"), str(REPO)]

import slicer  # noqa: E402

import CTFoundation  # noqa: E402
from CTFoundationLib.host.process import WorkerProcess, python_command  # noqa: E402
from CTFoundationLib.io.reading import read_ct  # noqa: E402
from CTFoundationLib.resources import shared_data_root  # noqa: E402

RICORD = "ct/ricord1a_419639-000082_chest_noncontrast/dicom"


def detect_timed(logic, node, model: str, device: str) -> tuple[float, dict, list[str]]:
    """(wall seconds from the call to the MRML result, the worker's step timings, the step names seen)."""
    steps: list[str] = []
    started = time.perf_counter()
    outcome = logic.detect(node, model=model, device=device, progress=lambda step, fraction: steps.append(step))
    return time.perf_counter() - started, outcome.result.timings_s, steps


def one_shot(logic, node, work: Path, args: argparse.Namespace) -> float:
    """Seconds of one detection in a fresh `python -m CTFoundationLib.host.worker detect REQUEST.json` process
    (the CT written as the module writes it), for comparison."""
    request = {**logic._volumeRequest(node, work), **logic._modelOptions(args.model, args.device),
               "out": str(work / "one-shot.json")}
    (work / "request.json").write_text(json.dumps(request), encoding="utf-8")
    started = time.perf_counter()
    process = WorkerProcess(python_command() + ["detect", str(work / "request.json")], cwd=REPO).start()
    if process.wait() != 0:
        raise SystemExit("\n".join(process.log_tail))
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ct-clip-demo")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--ct", type=Path, help="default: the RICORD DICOM series of the shared data")
    args = parser.parse_args()
    source = read_ct(args.ct or shared_data_root() / RICORD)
    work = Path(tempfile.mkdtemp(prefix="bench-model-process-"))
    nibabel.save(nibabel.Nifti1Image(source.hu, source.affine_ras), str(work / "ct.nii"))
    node = slicer.util.loadVolume(str(work / "ct.nii"))
    print(f"CT {source.shape_ijk} from {args.ct or RICORD}; model {args.model} on {args.device}")

    logic = CTFoundation.CTFoundationLogic()
    started = time.perf_counter()
    logic._volumeRequest(node, work)  # what each detection does on the main thread before sending the request
    handover_s = time.perf_counter() - started
    try:
        first_s, first, first_steps = detect_timed(logic, node, args.model, args.device)
        second_s, second, second_steps = detect_timed(logic, node, args.model, args.device)
        third_s, third, _ = detect_timed(logic, node, args.model, args.device)
    finally:
        logic.stopModelProcess()
    assert "load model" in first_steps and "load model" not in second_steps, (first_steps, second_steps)

    print(f"first detection  {first_s:7.2f} s   (process start + torch import + model load "
          f"{first.get('load_model', 0):.2f} s + the CT)")
    for label, total_s, timings in (("second detection", second_s, second), ("third detection ", third_s, third)):
        computed = sum(timings.get(step, 0.0) for step in ("preprocess", "encode_image", "score"))
        print(f"{label} {total_s:7.2f} s   preprocess {timings.get('preprocess', 0):.2f} s + encode image "
              f"{timings.get('encode_image', 0):.2f} s + score {timings.get('score', 0):.2f} s = {computed:.2f} s; "
              f"the rest {total_s - computed:.2f} s (node -> file on the main thread, read CT in the process, "
              "sanity checks, events)")
    print(f"main thread: node -> uncompressed NIfTI for the process, measured alone {handover_s:.2f} s")
    print(f"one detection in a one-shot worker process (the design before): {one_shot(logic, node, work, args):.2f} s")


if __name__ == "__main__":
    main()
