"""Where a model runs: 'auto' picks CUDA when PyTorch sees a GPU."""

from __future__ import annotations

import torch

from CTFoundationLib.errors import CTFoundationError


def select_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' -> CUDA when present, else CPU; 'cuda' without a GPU is a clear error."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CTFoundationError("--device cuda was asked for but PyTorch sees no CUDA GPU; use --device cpu")
    return torch.device(device)
