"""Seconds per case and memory of the batch report on the RICORD DICOM (255 slices), CT-CLIP on CPU by default.

Run: .venv/bin/python Testing/benchmarks/bench_report.py [--cases N] [--weights CKPT --model-config JSON]
Without --weights it times the small random CT-CLIP v2 of Testing/small_models.py (real input size).
Prints (1) one case end-to-end through the CLI in a fresh process (start-up, model load, read, detect, key
images, HTML) and (2) N copies of the case through the library with the model loaded once: seconds per
step and per case, and the process's resident memory after each case (flat = bounded memory).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TESTING = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(TESTING), str(TESTING.parent / "CTFoundation")]

from conftest import REPO_ROOT, data_root  # noqa: E402
from small_models import bert_vocab, make_small_ctclip  # noqa: E402

from CTFoundationLib.inference.ctclip import CTCLIPRuntime, read_ctclip_config  # noqa: E402
from CTFoundationLib.io.cases import Case  # noqa: E402
from CTFoundationLib.report import run_batch  # noqa: E402

RICORD_DICOM = "ct/ricord1a_419639-000082_chest_noncontrast/dicom"


def rss_mb() -> tuple[float, float]:
    """(current, peak) resident memory of this process in MB."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cli_one_case(dicom: Path, model_args: list[str], work: Path, device: str) -> None:
    out = work / "cli"
    command = [sys.executable, "-m", "CTFoundationLib", "report", str(dicom), "--out", str(out), "--device", device]
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), CTFOUNDATION_HOME=str(work / "home"))
    start = time.perf_counter()
    subprocess.run(command + model_args, env=env, check=True, capture_output=True)
    wall = time.perf_counter() - start
    result = json.loads(next(out.glob("*/result.json")).read_text())
    steps = ", ".join(f"{k} {v:.2f}" for k, v in result["timings_s"].items())
    print(f"CLI, fresh process, 1 case: {wall:.1f} s wall (includes Python start-up and model load); case: {steps}")


def library_cases(dicom: Path, runtime: CTCLIPRuntime, count: int, work: Path) -> None:
    cases = [Case(f"copy{n}", dicom) for n in range(count)]
    print(f"library, model loaded once, {count} cases:")
    start = time.perf_counter()

    def report(event) -> None:
        if event.step in ("ok", "failed"):
            current, peak = rss_mb()
            print(f"  {event.case_id}: {event.step}, RSS {current:.0f} MB (peak {peak:.0f} MB)")

    summary = run_batch(runtime, cases, work / "library", progress=report)
    total = time.perf_counter() - start
    per_case = [o.seconds for o in summary.outcomes]
    timings = [json.loads((o.folder / "result.json").read_text())["timings_s"] for o in summary.outcomes]
    means = {step: sum(t[step] for t in timings) / len(timings) for step in timings[0]}
    print(f"  seconds per case: {', '.join(f'{s:.1f}' for s in per_case)}; batch total {total:.1f} s")
    print("  mean per step (s): " + ", ".join(f"{k} {v:.2f}" for k, v in means.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dicom", type=Path, default=data_root() / RICORD_DICOM)
    parser.add_argument("--cases", type=int, default=3)
    parser.add_argument("--weights", type=Path, help="checkpoint to time (default: the small random one)")
    parser.add_argument("--model-config", type=Path)
    parser.add_argument("--text-encoder", type=Path, default=bert_vocab())
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}")
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        if args.weights is None:
            args.weights, args.model_config, _ = make_small_ctclip(work / "small")
            print(f"model: small random CT-CLIP v2 ({args.weights.stat().st_size / 2**20:.1f} MB)")
        model_args = ["--weights", str(args.weights), "--text-encoder", str(args.text_encoder)]
        model_args += ["--model-config", str(args.model_config)] if args.model_config else []
        cli_one_case(args.dicom, model_args, work, args.device)
        start = time.perf_counter()
        runtime = CTCLIPRuntime(
            args.weights, args.text_encoder,
            config=read_ctclip_config(args.model_config) if args.model_config else None, device=args.device,
            cache_dir=work / "runtime",
        )
        print(f"model load: {time.perf_counter() - start:.1f} s, RSS {rss_mb()[0]:.0f} MB")
        library_cases(args.dicom, runtime, args.cases, work)


if __name__ == "__main__":
    main()
