"""The ``device`` group and ``precision``: what torch device and dtype a run uses."""

from __future__ import annotations

import torch

from neuralpde_cli.errors import UserError, check_choice

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = {"float32": torch.float32, "float64": torch.float64}


def resolve_device(name: str) -> torch.device:
    """auto → CUDA when available, else CPU; cuda without a GPU is an error, not a fallback."""
    check_choice("device", name, DEVICES)
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device=cuda was asked for but no CUDA GPU is available "
                        "(torch.cuda.is_available() is False); use device=cpu or device=auto")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_precision(name: str) -> torch.dtype:
    check_choice("precision", name, PRECISIONS)
    return PRECISIONS[name]
