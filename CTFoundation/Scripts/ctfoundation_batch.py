"""Headless CTFoundation in 3D Slicer: CT-CLIP detection JSON, or batch reports, for CT files or DICOM folders.

    Slicer --no-main-window --python-script ctfoundation_batch.py -- CT [CT ...] --out OUT [options]
    Slicer --no-main-window --python-script ctfoundation_batch.py -- INPUT [INPUT ...] --out DIR --report

Detection: CT is a volume file Slicer reads (NIfTI, NRRD, MHA, ...) or a DICOM folder (imported into a
temporary DICOM database; the CT series with the most files is loaded). One CT: OUT is the JSON file;
several: OUT is a folder that receives <name>.json per CT. Each JSON is exactly what the CLI's `detect --out`
writes. --report: the inputs (CT files, DICOM folders, folders of cases, a CSV list) go to the same batch
report code as `ctfoundation report`, in the module's background process: DIR/<case>/result.json and
report.html, DIR/index.html, DIR/summary.csv; finished cases are skipped.
Exit code: 0 when every CT succeeded, 1 when any failed (each failure is printed), 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import slicer

MODULE_FOLDER = Path(__file__).resolve().parents[1]  # holds CTFoundation.py (source checkout and install)
if str(MODULE_FOLDER) not in sys.path:
    sys.path.insert(0, str(MODULE_FOLDER))

from CTFoundation import CTFoundationLogic  # noqa: E402
from CTFoundationLib.errors import CTFoundationError, CTInputError  # noqa: E402
from CTFoundationLib.weights import load_registry  # noqa: E402


def parseArguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ctfoundation_batch.py", description=__doc__.split("\n")[0])
    parser.add_argument("inputs", type=Path, nargs="+", help="CT files or DICOM folders")
    parser.add_argument("--out", type=Path, required=True, help="JSON file (one CT) or folder (several)")
    parser.add_argument("--model", choices=load_registry().ids("ct-clip"), default="ct-clip-v2")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda[:N]")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--weights", default="", help="checkpoint file (default: the installed weights)")
    parser.add_argument("--model-config", default="", help="constructor JSON for checkpoints of other sizes")
    parser.add_argument("--text-encoder", default="", help="CXR-BERT folder or vocab.txt (default: installed)")
    parser.add_argument("--thresholds", default="", help="JSON {finding: threshold} for the positive flags")
    parser.add_argument("--home", default="", help="weights cache root (default: $CTFOUNDATION_HOME)")
    parser.add_argument("--report", action="store_true",
                        help="batch reports into the folder OUT (as `ctfoundation report`)")
    parser.add_argument("--anatomy", action="store_true", help="with --report: the per-anatomy findings section")
    parser.add_argument("--install-dependencies", action="store_true",
                        help="install missing Python packages into Slicer without asking")
    return parser.parse_args(argv[1:] if argv[:1] == ["--"] else argv)


def configureLogic(args: argparse.Namespace) -> CTFoundationLogic:
    logic = CTFoundationLogic()
    parameters = logic.getParameterNode()
    parameters.dtype = args.dtype
    parameters.weightsFile = args.weights
    parameters.modelConfigFile = args.model_config
    parameters.textEncoder = args.text_encoder
    parameters.thresholdsFile = args.thresholds
    parameters.weightsHome = args.home
    if args.install_dependencies and logic.missingDependencies():
        logic.installDependencies(askConfirmation=False)
    return logic


def outputPath(args: argparse.Namespace, source: Path) -> Path:
    if len(args.inputs) == 1:
        return args.out
    name = source.name.removesuffix(".gz").rsplit(".", 1)[0] if source.is_file() else source.name
    return args.out / f"{name}.json"


def loadDicomFolder(folder: Path):
    """Import the folder into a temporary DICOM database; load its CT series with the most files."""
    from DICOMLib import DICOMUtils

    database = slicer.dicomDatabase
    DICOMUtils.importDicom(str(folder), database)
    series = [uid for patient in database.patients() for study in database.studiesForPatient(patient)
              for uid in database.seriesForStudy(study)]
    ctSeries = [uid for uid in series if database.fileValue(database.filesForSeries(uid)[0], "0008,0060") == "CT"]
    if not ctSeries:
        raise CTInputError(f"{folder}: no CT series found among {len(series)} DICOM series")
    largest = max(ctSeries, key=lambda uid: len(database.filesForSeries(uid)))
    for nodeId in DICOMUtils.loadSeriesByUID([largest]):
        node = slicer.mrmlScene.GetNodeByID(nodeId)
        if node is not None and node.IsA("vtkMRMLScalarVolumeNode"):
            return node
    raise CTInputError(f"{folder}: the CT series {largest} could not be loaded as a volume")


def loadVolumeFile(path: Path):
    if not path.is_file():
        raise CTInputError(f"{path}: no such file or folder")
    try:
        return slicer.util.loadVolume(str(path))
    except RuntimeError as error:
        raise CTInputError(f"{path}: Slicer cannot read this file as a volume ({error})") from error


def detectOne(logic: CTFoundationLogic, args: argparse.Namespace, source: Path) -> None:
    """Load one CT, run detection, write its JSON (inside a temporary DICOM database for folders)."""
    from CTFoundationLib.io.files import write_json_atomic

    if source.is_dir():
        from DICOMLib import DICOMUtils

        with DICOMUtils.TemporaryDICOMDatabase():
            outcome = logic.detect(loadDicomFolder(source), model=args.model, device=args.device, maps=False)
    else:
        outcome = logic.detect(loadVolumeFile(source), model=args.model, device=args.device, maps=False)
    write_json_atomic(outputPath(args, source), outcome.report)
    print(f"{source}: {outputPath(args, source)}", flush=True)


def reportAll(logic: CTFoundationLogic, args: argparse.Namespace) -> int:
    """Batch reports of all inputs into args.out; prints each failed case and where the index is."""
    outcome = logic.report(args.inputs, args.out, model=args.model, device=args.device, anatomy=args.anatomy,
                           progress=lambda step, fraction: print(f"{fraction:4.0%} {step}", flush=True))
    for row in outcome.failed:
        print(f"error: {row['case_id']}: {row['error']}", file=sys.stderr, flush=True)
    print(f"index: {outcome.indexHtml}", flush=True)
    return 1 if outcome.failed else 0


def main(argv: list[str]) -> int:
    try:
        args = parseArguments(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    failures = 0
    try:
        logic = configureLogic(args)
    except CTFoundationError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 1
    if args.report:
        try:
            return reportAll(logic, args)
        except CTFoundationError as error:
            print(f"error: {error}", file=sys.stderr, flush=True)
            return 1
    for source in args.inputs:
        try:
            detectOne(logic, args, source)
        except CTFoundationError as error:
            failures += 1
            print(f"error: {source}: {error}", file=sys.stderr, flush=True)
        slicer.mrmlScene.Clear()
    return 1 if failures else 0


if __name__ == "__main__":
    slicer.util.exit(main(sys.argv[1:]))
