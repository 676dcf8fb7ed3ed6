"""Shared helpers: run the real CLI in a subprocess on tiny configs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def run_cli(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """`neuralpde <args>` as a user runs it (the module form of the console script), on one
    torch thread: the suite runs two workers on two cores (``make test``: pytest -n 2), and
    tiny problems gain nothing from more threads but contention."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "COLUMNS": "120", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "neuralpde_cli.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, env=env)


def read_summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """In-process tests on one torch thread too (see :func:`run_cli`)."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def cli(tmp_path: Path):
    def _run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return run_cli(list(args), tmp_path, timeout)
    return _run
