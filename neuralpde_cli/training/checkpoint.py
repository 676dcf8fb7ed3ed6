"""Atomic checkpoints that load without running code (``weights_only=True``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from neuralpde_cli.errors import UserError
# atomic file writing lives in run/; re-exported here for the code that imports it from here
from neuralpde_cli.run.atomic import atomic_write, stale_temp_files  # noqa: F401

#: keys every training checkpoint holds; a file without them is not ours.
REQUIRED_KEYS = ("format", "model", "optimizer", "scheduler", "step", "phase_index", "rng")
FORMAT = "neuralpde-checkpoint-1"


def describe(exc: BaseException) -> str:
    """``Type: first line of the message`` (some exceptions have no message at all)."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:200]}" if lines else type(exc).__name__


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    state = {"format": FORMAT, **state}
    atomic_write(path, lambda handle: torch.save(state, handle))


def load_checkpoint(path: Path, map_location: torch.device | str = "cpu") -> dict[str, Any]:
    """Load and check a checkpoint; anything wrong with it is a UserError naming the file."""
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist (a resumable run directory holds "
                        "checkpoints/last.pt)")
    if path.stat().st_size == 0:
        raise UserError(f"checkpoint {path} is empty (0 bytes)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a corrupt file
        raise UserError(f"checkpoint {path} is corrupt or not a neuralpde checkpoint "
                        f"({describe(exc)})") from None
    if not isinstance(state, dict) or any(k not in state for k in REQUIRED_KEYS) \
            or state.get("format") != FORMAT:
        raise UserError(f"checkpoint {path} is not a {FORMAT} file (missing keys or format)")
    return state
