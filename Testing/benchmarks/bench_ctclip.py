"""CT-CLIP v2 detection benchmark on the RICORD DICOM with a full-size random-weight model.

Prints wall times (read + preprocess, model load, image encode, prompt encode cold and cached, total),
peak RSS, the image encode's achieved GFLOP/s against this machine's own fp32 matmul GFLOP/s, and
the same run done reference-style (the image re-encoded for each of the 18 findings, each prompt pair
padded to 512 tokens): one reference pass is timed and multiplied by 18, as stated in the output.
With --reference-python/--reference-checkout, two passes of the reference's OWN code (CT-CLIP @ a2a155c, in its
own venv, through reference_pass.py) are timed too, after the product run: 18 passes = the first + 17 x the second.

Run: .venv/bin/python Testing/benchmarks/bench_ctclip.py [--dicom DIR] [--workdir DIR] [--dtype fp32|bf16]
       [--reference-python PY --reference-checkout DIR]   (how to set them up: reference_pass.py's docstring)
The full-size checkpoint (~2 GB, with the two unused `_extra` projections as in the official file) is
written once to --workdir and reused. The measurement itself runs in a fresh process so peak RSS is the
runtime's own.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from CTFoundationLib.vocab import CT_RATE_ABNORMALITIES

REPO = Path(__file__).resolve().parents[2]
DEFAULT_DICOM = REPO.parent / "shared/data/ct/ricord1a_419639-000082_chest_noncontrast/dicom"
VOCAB = REPO.parent / "shared/data/vocab/bert-base-uncased_vocab.txt"
INPUT_FILE = "ricord_input.pt"


def make_full_size_checkpoint(path: Path) -> None:
    """Random full-size CT-CLIP v2 weights in the official key layout, `_extra` projections included."""
    from CTFoundationLib.models.ctclip import CTCLIP, CTCLIPConfig

    torch.manual_seed(0)
    model = CTCLIP(CTCLIPConfig.full_size())
    state = model.state_dict()
    state["text_transformer.embeddings.position_ids"] = torch.arange(512)[None]
    state["to_text_latent_extra.weight"] = torch.randn(512, 768) * 0.02
    state["to_visual_latent_extra.weight"] = torch.randn(512, 294912) * 0.002
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)


def matmul_gflops(size: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * size**3 / best / 1e9


def _timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def measure(checkpoint: Path, dicom: Path, dtype: str, no_allocator: bool = False, save_input: bool = False) -> dict:
    """Runs in the child process: the product path (allocator tuned as the CLI does), then the reference-style pass."""
    from CTFoundationLib.host.allocator import reuse_freed_memory
    from CTFoundationLib.inference.ctclip import CTCLIPRuntime
    from CTFoundationLib.io.reading import read_ct

    figures = {"threads": torch.get_num_threads(), "matmul_gflops": matmul_gflops(),
               "allocator_tuned": reuse_freed_memory() if not no_allocator else False}
    start = time.perf_counter()
    volume = read_ct(dicom)
    figures["read_s"] = time.perf_counter() - start
    cache = checkpoint.parent / f"runtime_cache_{time.time_ns()}"
    runtime = CTCLIPRuntime(checkpoint, VOCAB, device="cpu", dtype=dtype, cache_dir=cache)
    tensor = runtime.prepare(volume)
    if save_input:  # the reference-code pass reads the same input
        torch.save(tensor, checkpoint.parent / INPUT_FILE)
    figures["preprocess_s"] = runtime.timings_s["preprocess"]
    figures["load_model_s"] = runtime.timings_s["load_model"]
    start = time.perf_counter()
    latent, _ = runtime.model.encode_image(tensor)
    figures["encode_image_s"] = time.perf_counter() - start
    runtime.prompt_latents()
    figures["encode_prompts_cold_s"] = runtime.timings_s["encode_prompts"]
    cached = CTCLIPRuntime(checkpoint, VOCAB, device="cpu", dtype=dtype, cache_dir=cache)
    cached.prompt_latents()
    figures["encode_prompts_cached_s"] = cached.timings_s["encode_prompts_cached"]
    start = time.perf_counter()
    probabilities = runtime.probabilities(latent)
    figures["score_s"] = time.perf_counter() - start
    figures["p_present"] = float(probabilities[0, 0])  # of CT_RATE_ABNORMALITIES[0], the reference pass's finding
    figures["total_s"] = sum(
        figures[k] for k in ("read_s", "preprocess_s", "encode_image_s", "encode_prompts_cached_s", "score_s")
    )
    figures["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    with FlopCounterMode(display=False) as counter:
        runtime.model.encode_image(tensor)
    figures["encode_image_gflop"] = counter.get_total_flops() / 1e9
    figures["encode_image_gflops"] = figures["encode_image_gflop"] / figures["encode_image_s"]
    figures["reference_prompt_pair_512_s"] = _reference_prompt_pair_seconds(runtime, CT_RATE_ABNORMALITIES[0])
    return figures


def _reference_prompt_pair_seconds(runtime, name: str) -> float:
    encoded = runtime.tokenizer(
        [f"{name} is present.", f"{name} is not present."],
        padding="max_length", truncation=True, max_length=512, return_tensors="pt",
    )
    model = runtime._text_model()
    return _timed(lambda: model.encode_text(encoded["input_ids"], encoded["attention_mask"]))


def report(figures: dict) -> None:
    per_finding = figures["encode_image_s"] + figures["reference_prompt_pair_512_s"]
    reference_total = figures["read_s"] + figures["preprocess_s"] + 18 * per_finding
    print(f"threads {figures['threads']}, fp32 matmul {figures['matmul_gflops']:.1f} GFLOP/s, "
          f"allocator tuned (CTFoundationLib.host.allocator): {figures['allocator_tuned']}")
    for key in ("read_s", "preprocess_s", "load_model_s", "encode_image_s", "encode_prompts_cold_s",
                "encode_prompts_cached_s", "score_s", "total_s"):
        print(f"{key:28s} {figures[key]:8.3f}")
    print(f"{'peak RSS':28s} {figures['peak_rss_gb']:8.2f} GB")
    print(f"image encode: {figures['encode_image_gflop']:.0f} GFLOP, {figures['encode_image_gflops']:.1f} GFLOP/s "
          f"= {figures['matmul_gflops'] / figures['encode_image_gflops']:.2f}x the matmul floor's time")
    print(f"reference style: 18 x (image pass {figures['encode_image_s']:.2f} s + prompt pair padded to 512 "
          f"{figures['reference_prompt_pair_512_s']:.2f} s) + read/preprocess = {reference_total:.1f} s "
          "(one pass timed, multiplied by 18)")
    print(f"speed-up over reference style (total, prompts cached): {reference_total / figures['total_s']:.1f}x")
    model_work_s = figures["encode_image_s"] + figures["encode_prompts_cached_s"] + figures["score_s"]
    print(f"speed-up, model work only (encode + score vs 18 passes): {18 * per_finding / model_work_s:.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dicom", type=Path, default=DEFAULT_DICOM)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/ctfoundation-bench"))
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--no-allocator-tuning", action="store_true", help="glibc's default mmap/trim thresholds")
    parser.add_argument("--reference-python", type=Path, help="a Python with the reference's dependencies")
    parser.add_argument("--reference-checkout", type=Path, help="CT-CLIP checkout (transformer_maskgit/, CT_CLIP/)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--save-input", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    reference = bool(args.reference_python or args.reference_checkout)
    if reference and not (args.reference_python and args.reference_checkout):
        parser.error("--reference-python and --reference-checkout go together")
    checkpoint = args.workdir / "ct_clip_v2_fullsize_random.pt"
    if args.child:
        print(json.dumps(measure(checkpoint, args.dicom, args.dtype, args.no_allocator_tuning, args.save_input)))
        return
    if not checkpoint.is_file():
        print(f"writing a full-size random checkpoint to {checkpoint} …", flush=True)
        make_full_size_checkpoint(checkpoint)
    child = [sys.executable, __file__, "--child", "--dicom", str(args.dicom), "--workdir", str(args.workdir),
             "--dtype", args.dtype, *(["--no-allocator-tuning"] if args.no_allocator_tuning else []),
             *(["--save-input"] if reference else [])]
    output = subprocess.run(child, check=True, capture_output=True, text=True).stdout
    figures = json.loads(output.strip().splitlines()[-1])
    report(figures)
    if reference:
        report_reference_code(figures, reference_code_pass(args, checkpoint))


def reference_code_pass(args: argparse.Namespace, checkpoint: Path) -> dict:
    """One pass of the reference's own CT-CLIP code on the product run's input, in its own interpreter."""
    command = [str(args.reference_python), str(Path(__file__).with_name("reference_pass.py")),
               "--checkout", str(args.reference_checkout), "--checkpoint", str(checkpoint),
               "--volume", str(checkpoint.parent / INPUT_FILE), "--vocab", str(VOCAB), "--passes", "2",
               "--constructors", str(write_constructors(checkpoint.parent / "constructors.json")),
               "--pathology", CT_RATE_ABNORMALITIES[0]]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def write_constructors(path: Path) -> Path:
    """The full-size reference constructor arguments as JSON, for the reference-code pass."""
    from CTFoundationLib.models.ctclip import FULL_SIZE_CONSTRUCTORS

    path.write_text(json.dumps(FULL_SIZE_CONSTRUCTORS))
    return path


def report_reference_code(figures: dict, reference: dict) -> None:
    first, later = reference["passes_s"]
    total = figures["read_s"] + figures["preprocess_s"] + first + 17 * later
    print(f"reference code (transformers {reference['transformers']}, {reference['threads']} threads): a pass (prompt "
          f"pair padded to 512 + image) {first:.2f} s first, {later:.2f} s next; first + 17 x next + read/preprocess "
          f"= {total:.1f} s")
    print(f"speed-up over the reference code (total, prompts cached): {total / figures['total_s']:.1f}x; "
          f"P({reference['pathology']}) ours {figures['p_present']:.6f} "
          f"vs reference {reference['probabilities'][0]:.6f}")


if __name__ == "__main__":
    main()
