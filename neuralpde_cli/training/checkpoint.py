"""Atomic checkpoints that load without running code (``weights_only=True``)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from neuralpde_cli.errors import UserError

#: keys every training checkpoint holds; a file without them is not ours.
REQUIRED_KEYS = ("format", "model", "optimizer", "scheduler", "step", "phase_index", "rng")
FORMAT = "neuralpde-checkpoint-1"


def atomic_write(path: Path, write: Any) -> None:
    """Write through a temporary file in the same folder, fsync it, then rename over ``path``.

    A crash (even ``kill -9``) at any moment leaves either the old file or the new one.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (a power cut, not only a killed process)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot fsync a directory
        pass
    finally:
        os.close(fd)


def stale_temp_files(folder: Path) -> list[Path]:
    """Partial writes that a killed process left behind (``.NAME.XXXX.tmp``)."""
    return sorted(folder.glob(".*.tmp")) if folder.is_dir() else []


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
