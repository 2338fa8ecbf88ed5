"""What the Slicer main thread pays for one detection, and how long the background worker takes.

Main thread (must stay short): MRML node -> CTVolume, the inline sanity checks, writing the CT for the worker,
one poll of the worker's output. Background: worker start to first event (Python + torch import), whole
detection. Uses slicer-core (real MRML and module logics, Testing/slicer_core_app.py), the RICORD DICOM series and a
small random CT-CLIP checkpoint (real input size; a full-size checkpoint costs more in the worker only).

Run: PYTHONPATH=.:Testing .venv/bin/python Testing/benchmarks/bench_slicer_main_thread.py [DICOM_FOLDER]
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import nibabel

TESTING = Path(__file__).resolve().parents[1]
REPO = TESTING.parent
sys.path[:0] = [str(REPO / "CTFoundation"), str(TESTING), str(REPO)]

import slicer_core_app  # noqa: E402
from small_models import bert_vocab, make_small_ctclip  # noqa: E402

slicer = slicer_core_app.start()

import CTFoundation  # noqa: E402
from CTFoundationLib.io.reading import read_ct  # noqa: E402
from CTFoundationLib.io.sanity import check_ct  # noqa: E402

DEFAULT = REPO.parent / "shared/data/ct/ricord1a_419639-000082_chest_noncontrast/dicom"


def timed(function, repeats: int = 5) -> tuple[float, object]:
    """Median wall time in ms over `repeats` calls, and the last result."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times), result


def main() -> None:
    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT
    work = Path(tempfile.mkdtemp(prefix="bench-slicer-"))
    source = read_ct(folder)
    nibabel.save(nibabel.Nifti1Image(source.hu, source.affine_ras), str(work / "ct.nii"))
    node = slicer.util.loadVolume(str(work / "ct.nii"))
    print(f"CT {source.shape_ijk} {source.hu.dtype}, {source.hu.nbytes / 2**20:.0f} MiB")

    convert_ms, volume = timed(lambda: CTFoundation.ctVolumeFromNode(node))
    print(f"main thread: node -> CTVolume            {convert_ms:8.2f} ms (a view, no copy)")
    check_ms, _ = timed(lambda: check_ct(volume))
    print(f"main thread: sanity checks (inline)       {check_ms:8.1f} ms")
    write_ms, _ = timed(lambda: nibabel.save(nibabel.Nifti1Image(volume.hu, volume.affine_ras), str(work / "w.nii")))
    print(f"main thread: write the CT for the worker {write_ms:8.1f} ms")

    checkpoint, config, _ = make_small_ctclip(work / "small")
    logic = CTFoundation.CTFoundationLogic()
    parameters = logic.getParameterNode()
    parameters.weightsFile, parameters.modelConfigFile, parameters.textEncoder = (
        str(checkpoint), str(config), str(bert_vocab()))
    parameters.weightsHome = str(work / "home")
    first_event, poll_ms = [], []
    started = time.perf_counter()
    task = logic.detect(node, device="cpu", waitForCompletion=False,
                        progress=lambda step, fraction: first_event.append(time.perf_counter() - started),
                        callback=lambda outcome, error: None)
    start_ms = (time.perf_counter() - started) * 1000
    while not task.done:
        tick = time.perf_counter()
        task.poll()
        poll_ms.append((time.perf_counter() - tick) * 1000)
        time.sleep(CTFoundation.BackgroundTask.POLL_INTERVAL_MS / 1000)
    total_s = time.perf_counter() - started
    print(f"main thread: start detection (convert + write + spawn) {start_ms:8.1f} ms")
    print(f"main thread: one timer poll, median / max  {statistics.median(poll_ms):.3f} / {max(poll_ms):.1f} ms "
          f"({len(poll_ms)} polls)")
    print(f"worker: first progress event after       {first_event[0]:8.1f} s")
    print(f"worker: whole detection (small model)    {total_s:8.1f} s")


if __name__ == "__main__":
    main()
