"""The run directory: the stable interface between a run and everything after it.

Layout (documented in README): ``metrics.csv``, ``checkpoints/{last,best}.pt``, ``plots/``,
``solution.npz``, ``summary.json``, Hydra's ``.hydra/``, the log, and ``.neuralpde.lock``
(held by the process writing the directory, see :class:`RunLock`).
"""

from __future__ import annotations

import csv
import errno
import fcntl
import io
import json
import math
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from neuralpde_cli.errors import UserError
from neuralpde_cli.run.atomic import atomic_write, stale_temp_files


def check_writable(path: Path, what: str = "the run directory") -> None:
    """A UserError naming ``path`` unless a file can be written and synced there (or, when it does
    not exist yet, in the nearest folder above it): catches read-only, not-a-folder, full disks."""
    target = Path(path)
    probe_dir = target
    while not probe_dir.exists() and probe_dir != probe_dir.parent:
        probe_dir = probe_dir.parent
    try:
        if not probe_dir.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, f"{probe_dir} is not a directory")
        with tempfile.TemporaryFile(dir=probe_dir) as handle:
            handle.write(b"ok")
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as exc:
        raise UserError(f"cannot write to {what} {target}: {exc.strerror or exc}") from None


LOCK_NAME = ".neuralpde.lock"


def in_use(what: str, folder: Path, holder: str) -> str:
    return (f"{what}: {folder} is in use by another neuralpde run ({holder}); wait for it to "
            "end or choose another directory")


class RunLock:
    """One writer per run directory, for the life of the process that holds it.

    An ``fcntl.flock`` on ``DIR/.neuralpde.lock``: the kernel drops it when the process ends in
    any way (``kill -9`` included), so a crash cannot leave it stuck. While held, the file
    names its holder; a clean release empties it, so a non-empty file found with the lock free
    means its writer died, and the new holder says so (:attr:`stale`). On file systems without
    working ``flock`` (some network mounts) two hosts are not kept apart.
    """

    def __init__(self, folder: Path, fd: int, stale: str | None) -> None:
        self.folder, self._fd, self.stale = folder, fd, stale

    @classmethod
    def acquire(cls, folder: Path, what: str) -> RunLock:
        """Take ``folder`` (which exists), or a UserError naming the process that holds it."""
        path = Path(folder) / LOCK_NAME
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise UserError(f"cannot write to the run directory {folder}: "
                            f"{exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise UserError(f"cannot lock the run directory {folder}: "
                                f"{exc.strerror or exc}") from None
            raise UserError(in_use(what, folder, holder)) from None
        previous = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
        return cls(Path(folder), fd, previous or None)

    @staticmethod
    def holder(folder: Path) -> str | None:
        """Who holds ``folder`` now (its lock file's text), None when nobody; creates nothing."""
        try:
            fd = os.open(Path(folder) / LOCK_NAME, os.O_RDONLY)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        except OSError:
            return os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
        finally:
            os.close(fd)

    @classmethod
    def claim(cls, folder: Path, unique: bool, what: str) -> RunLock:
        """Create and take ``folder``; with ``unique``, a folder that already exists is not
        shared but skipped for ``folder-1``, ``folder-2``, ... (the first that this process
        creates itself: two processes never get the same one)."""
        folder = Path(folder)
        try:
            if not unique:
                folder.mkdir(parents=True, exist_ok=True)
                return cls.acquire(folder, what)
            folder.parent.mkdir(parents=True, exist_ok=True)
            for k in range(10_000):
                candidate = folder if k == 0 else folder.with_name(f"{folder.name}-{k}")
                try:
                    candidate.mkdir()
                except FileExistsError:
                    continue
                return cls.acquire(candidate, what)
        except OSError as exc:
            raise UserError(f"cannot write to the run directory {folder}: "
                            f"{exc.strerror or exc}") from None
        raise UserError(f"{what}: {folder} and 10000 numbered variants already exist")

    def release(self) -> None:
        """Empty the file (a clean end) and let go; the file stays for the next holder."""
        if self._fd < 0:
            return
        try:
            os.ftruncate(self._fd, 0)
        except OSError:
            pass
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = -1


class RunDir:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            (self.path / "plots").mkdir(parents=True, exist_ok=True)
            (self.path / "checkpoints").mkdir(exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot write to the run directory {self.path}: {exc.strerror}") from None
        check_writable(self.path)
        for partial in stale_temp_files(self.path) + stale_temp_files(self.checkpoints):
            partial.unlink(missing_ok=True)  # left by a killed process; the real files are whole

    @property
    def metrics_csv(self) -> Path:
        return self.path / "metrics.csv"

    @property
    def plots(self) -> Path:
        return self.path / "plots"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def summary_json(self) -> Path:
        return self.path / "summary.json"

    @property
    def solution_npz(self) -> Path:
        return self.path / "solution.npz"

    def write_summary(self, summary: dict[str, Any]) -> None:
        text = json.dumps(jsonable(summary), indent=2, sort_keys=False)
        atomic_write(self.summary_json, lambda h: h.write(text.encode()))

    def read_summary(self) -> dict[str, Any]:
        return json.loads(self.summary_json.read_text()) if self.summary_json.exists() else {}

    def write_solution(self, arrays: dict[str, np.ndarray]) -> None:
        def write(handle: Any) -> None:
            buf = io.BytesIO()
            np.savez_compressed(buf, **arrays)
            handle.write(buf.getvalue())
        atomic_write(self.solution_npz, write)


class MetricsWriter:
    """Appends rows to metrics.csv, flushing each, with a header fixed at creation.

    On resume the rows past the checkpoint's step are dropped first, so the file reads as one
    uninterrupted run.
    """

    def __init__(self, path: Path, columns: list[str], resume_step: int | None = None) -> None:
        self.path = path
        self.columns = columns
        if resume_step is not None and path.exists() and path.stat().st_size > 0:
            with path.open(newline="") as handle:
                rows = [r for r in csv.DictReader(handle) if _step_of(r) <= resume_step]
            old_columns = path.read_text().splitlines()[0].split(",")
            self.columns = old_columns
            text = io.StringIO()
            writer = csv.DictWriter(text, fieldnames=old_columns)
            writer.writeheader()
            writer.writerows(rows)
            atomic_write(path, lambda h: h.write(text.getvalue().encode()))
        else:
            with path.open("w", newline="") as handle:
                csv.writer(handle).writerow(columns)
        self.handle = path.open("a", newline="")
        self.writer = csv.DictWriter(self.handle, fieldnames=self.columns, extrasaction="ignore")

    def write(self, row: dict[str, Any]) -> None:
        self.writer.writerow({k: _fmt(v) for k, v in row.items()})
        self.handle.flush()

    def close(self) -> None:
        self.handle.close()


def read_metrics(path: Path) -> dict[str, np.ndarray]:
    """metrics.csv as columns of floats (blank → NaN; ``phase`` kept as strings)."""
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        return {}
    out: dict[str, np.ndarray] = {}
    for key in rows[0]:
        values = [r[key] for r in rows]
        if key == "phase":
            out[key] = np.array(values)
        else:
            out[key] = np.array([float(v) if v not in ("", None) else math.nan for v in values])
    return out


def _step_of(row: dict[str, Any]) -> float:
    """A row's step; a row cut short by a killed process counts as past any checkpoint."""
    try:
        return int(row["step"]) if row.get("loss") not in ("", None) else math.inf
    except (TypeError, ValueError):
        return math.inf


def _fmt(v: Any) -> Any:
    if isinstance(v, float):
        return f"{v:.8g}"
    return v


def jsonable(obj: Any) -> Any:
    """Plain JSON values: numpy scalars unwrapped, NaN and ±Inf as null (JSON has neither)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
