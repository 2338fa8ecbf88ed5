"""Where a model runs: 'auto' picks CUDA when PyTorch sees a GPU."""

from __future__ import annotations

import torch

from CTFoundationLib.errors import CTFoundationError

DEVICE_HELP = "auto (CUDA when present), cpu, cuda or cuda:N"


def select_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' -> CUDA when present, else CPU; a name PyTorch does not know, or a GPU that is not there, is a clear
    error."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except (RuntimeError, TypeError):
        chosen = None
    if chosen is None or chosen.type not in ("cpu", "cuda"):
        raise CTFoundationError(f"device '{device}' is not one this program runs on; use {DEVICE_HELP}")
    if chosen.type == "cuda":
        available = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if available == 0:
            raise CTFoundationError(f"device '{device}' was asked for but PyTorch sees no CUDA GPU; use cpu")
        if (chosen.index or 0) >= available:
            raise CTFoundationError(
                f"device '{device}': there are {available} CUDA GPU(s), cuda:0..cuda:{available - 1}")
    return chosen
