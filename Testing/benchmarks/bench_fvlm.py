"""Time and peak memory of one full-size fVLM window encode (ViT-B over a 112 x 288 x 352 window = 1,386 tokens,
plus organ pooling) with random weights, on CPU unless --device says otherwise.

Run: .venv/bin/python Testing/benchmarks/bench_fvlm.py [--device cpu|cuda] [--repeats 3]
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from CTFoundationLib.models.fvlm import FVLM, FVLMConfig
from CTFoundationLib.preprocess import FVLM_WINDOWS


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = FVLM(FVLMConfig()).eval().to(device)
    image = torch.rand(1, 1, *FVLM_WINDOWS.roi, device=device)
    mask = torch.zeros(1, 1, *FVLM_WINDOWS.roi, dtype=torch.uint8, device=device)
    mask[:, :, 20:90, 40:250, 30:320] = 1  # a lung-sized organ
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}; "
          f"window {tuple(image.shape[2:])} -> {model.organ_token_flags(mask).shape[-1]} tokens")
    times = []
    with torch.inference_mode():
        for _ in range(args.repeats):
            start = time.perf_counter()
            model.encode_organs(image, mask)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    print("window encode + pooling: " + ", ".join(f"{t:.2f}" for t in times) + f" s; best {min(times):.2f} s; "
          f"peak RSS {peak_rss_mb():.0f} MB")
    print(f"a case with all four organs: about {4 * min(times):.1f} s (one window per organ)")


if __name__ == "__main__":
    main()
