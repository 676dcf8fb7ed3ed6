"""One writer per run directory, nothing written for a refused command, nothing ignored.

Through the real console script (subprocesses: a lock is only worth something between
processes). Independent commands of one test run side by side to keep the file fast. A
writer that must be caught mid-run runs HOLD: the CLI with the solver held at a barrier
(lock taken, summary written, no training yet) until the test creates a file.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import read_summary
from neuralpde_cli.equations.diffusion import DiffusionConfig, FieldConfig, SteadyDiffusion
from neuralpde_cli.errors import UserError

QUIET = ["trainer.progress=false"]
#: a heat run of a few seconds: 20 ic + 60 Adam + 2 L-BFGS steps, one metrics row each
SMOKE = [*QUIET, "experiment=smoke"]
#: a steady diffusion solve by multigrid on 33² nodes: well under a second of work
GRID = [*QUIET, "equation=diffusion", "ansatz.resolution=33"]

HOLD = '''
import sys, time
from pathlib import Path
import neuralpde_cli.run.plots as plots
import neuralpde_cli.solvers.dispatch as dispatch

marker, go = Path(sys.argv[1]), Path(sys.argv[2])
real = dispatch.run_solver
def held(*args, **kwargs):
    marker.write_text("holding")
    while not go.exists():
        time.sleep(0.02)
    return real(*args, **kwargs)
dispatch.run_solver = held
plots.make_plots = lambda *args, **kwargs: []   # pictures are not under test here
from neuralpde_cli.cli import main
sys.exit(main(sys.argv[3:]))
'''


# --- helpers ---------------------------------------------------------------------------------
def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONWARNINGS": "ignore", "COLUMNS": "120", "OMP_NUM_THREADS": "1"}


def start(args: list[str], cwd: Path) -> subprocess.Popen:
    """``neuralpde ARGS`` in the background."""
    return subprocess.Popen([sys.executable, "-m", "neuralpde_cli.cli", *args], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())


def run_all(commands: list[list[str]], cwd: Path, timeout: float = 120) -> list[subprocess.CompletedProcess]:
    """Several ``neuralpde`` commands at once (each one's exit code and output)."""
    procs = [start(args, cwd) for args in commands]
    out = []
    for args, proc in zip(commands, procs):
        stdout, stderr = proc.communicate(timeout=timeout)
        out.append(subprocess.CompletedProcess(args, proc.returncode, stdout, stderr))
    return out


def held_writer(tmp_path: Path, args: list[str]) -> tuple[subprocess.Popen, Path]:
    """A writer stopped at the barrier, its lock taken; returns it and the file that frees it."""
    script, marker, go = tmp_path / "hold.py", tmp_path / "holding", tmp_path / "go"
    script.write_text(HOLD)
    proc = subprocess.Popen([sys.executable, str(script), str(marker), str(go), "solve", *args],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=_env())
    deadline = time.monotonic() + 120
    while not marker.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the held writer never got going: {proc.communicate()[1][-2000:]}")
        time.sleep(0.02)
    return proc, go


def snapshot(root: Path) -> dict[str, str]:
    """Every file and folder under root: path → SHA-256 of its bytes (folders: "dir")."""
    out = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        out[key] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def metric_steps(run_dir: Path) -> list[int]:
    with (run_dir / "metrics.csv").open(newline="") as handle:
        return [int(row["step"]) for row in csv.DictReader(handle)]


def one_error_line(result: subprocess.CompletedProcess, *words: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("neuralpde: error: "), result.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])


# --- one writer per run directory ------------------------------------------------------------
def test_a_second_writer_and_a_resume_refuse_while_a_run_writes(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    first, go = held_writer(tmp_path, [*SMOKE, f"hydra.run.dir={run_dir}"])
    try:
        before = snapshot(run_dir)
        second, resume = run_all([["solve", *SMOKE, f"hydra.run.dir={run_dir}"],
                                  ["solve", f"resume={run_dir}"]], tmp_path)
        for result in (second, resume):
            one_error_line(result, str(run_dir), "in use by another neuralpde run",
                           f"pid {first.pid}")
        assert snapshot(run_dir) == before, "a refused writer changed the running run's files"
    except BaseException:
        first.kill()  # never leave a writer waiting at the barrier
        first.communicate()
        raise
    go.touch()
    out, err = first.communicate(timeout=120)
    assert first.returncode == 0, err[-2000:]
    assert metric_steps(run_dir) == list(range(1, 83)), "rows of another writer in metrics.csv"
    summary = read_summary(run_dir)
    assert summary["status"] == "completed" and summary["steps"] == 82
    assert (run_dir / ".neuralpde.lock").read_text() == "", "a clean end releases the lock"


def test_a_dead_writers_lock_is_taken_over_with_a_warning(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    dead, _ = held_writer(tmp_path, [*GRID, f"hydra.run.dir={run_dir}"])
    dead.send_signal(signal.SIGKILL)
    dead.communicate(timeout=30)
    assert f"pid {dead.pid}" in (run_dir / ".neuralpde.lock").read_text()
    (result,) = run_all([["solve", *GRID, f"hydra.run.dir={run_dir}"]], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    log = (run_dir / "solve.log").read_text()
    assert "took over" in log and f"pid {dead.pid}" in log, log
    assert read_summary(run_dir)["status"] == "completed"


def test_default_directories_that_exist_are_not_shared(tmp_path: Path) -> None:
    """Every default directory the run could compose in the next 60 s exists already (an
    earlier run in the same second): the run takes NAME-1 and leaves them alone."""
    now = dt.datetime.now()
    taken = set()
    for s in range(60):
        moment = now + dt.timedelta(seconds=s)
        folder = tmp_path / "outputs" / f"{moment:%Y-%m-%d}" / f"{moment:%H-%M-%S}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "earlier.txt").write_text("an earlier run's file")
        taken.add(folder)
    before = snapshot(tmp_path / "outputs")
    (result,) = run_all([["solve", *GRID]], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    made = {p for p in (tmp_path / "outputs").glob("*/*") if p not in taken}
    assert len(made) == 1, made
    new = made.pop()
    assert new.name.endswith("-1") and new.with_name(new.name[:-2]) in taken
    assert read_summary(new)["status"] == "completed"
    assert {k: v for k, v in snapshot(tmp_path / "outputs").items()
            if not k.startswith(str(new.relative_to(tmp_path / "outputs")))} == before


# --- nothing written for a refused command -----------------------------------------------------
def test_rejected_configs_write_nothing(tmp_path: Path) -> None:
    (tmp_path / "outputs" / "old").mkdir(parents=True)
    (tmp_path / "outputs" / "old" / "keep.txt").write_text("keep")
    np.save(tmp_path / "k.npy", np.full((4, 4), 2.0))
    before = snapshot(tmp_path)
    dim, unused, typo, chain = run_all([
        ["solve", *QUIET, "equation.dim=-1"],
        ["solve", *GRID, "equation.kappa.path=k.npy", f"hydra.run.dir={tmp_path / 'new'}"],
        ["solve", *QUIET, "equation.dimm=3"],
        ["solve", *GRID, "multigrid.levels=6", f"hydra.run.dir={tmp_path / 'new2'}"],
    ], tmp_path)
    one_error_line(dim, "equation.dim=-1")
    one_error_line(unused, "equation.kappa.path='k.npy'", "equation.kappa.kind=constant", "file")
    one_error_line(typo, "equation.dimm")
    one_error_line(chain, "multigrid.levels=6")
    assert snapshot(tmp_path) == before


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A completed multigrid run (it checkpoints its solution, so it can be resumed)."""
    root = tmp_path_factory.mktemp("finished")
    (result,) = run_all([["solve", *GRID, f"hydra.run.dir={root / 'run'}"]], root)
    assert result.returncode == 0, result.stderr[-2000:]
    return root / "run"


def test_refused_resumes_leave_the_directory_byte_for_byte(finished_run: Path,
                                                          tmp_path: Path) -> None:
    override, failed, notarun = (tmp_path / n for n in ("override", "failed", "notarun"))
    shutil.copytree(finished_run, override)
    shutil.copytree(finished_run, failed)
    (failed / "checkpoints" / "last.pt").unlink()
    summary = read_summary(failed)
    summary.update({"status": "failed", "error": "equation.dim=-1 must be an integer ≥ 1"})
    (failed / "summary.json").write_text(json.dumps(summary))
    notarun.mkdir()
    (notarun / "notes.txt").write_text("not a run")
    before = {d: snapshot(d) for d in (override, failed, notarun)}
    refused, no_checkpoint, not_a_run, no_dir = run_all([
        ["solve", f"resume={override}", "optimizer.tol=1e-6", "optimizer.max_cycles=5"],
        ["solve", f"resume={failed}"],
        ["solve", f"resume={notarun}"],
        ["solve", f"resume={tmp_path / 'missing'}"],
    ], tmp_path)
    one_error_line(refused, "refused: optimizer.tol=1e-6 optimizer.max_cycles=5")
    one_error_line(no_checkpoint, "last.pt does not exist")
    one_error_line(not_a_run, ".hydra/config.yaml not found")
    one_error_line(no_dir, "no such run directory")
    assert {d: snapshot(d) for d in (override, failed, notarun)} == before
    assert not (tmp_path / "missing").exists()


def test_resume_applies_and_records_the_overrides_it_allows(finished_run: Path,
                                                            tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    saved = (run_dir / ".hydra" / "config.yaml").read_text()
    assert "log_every: 100" in saved
    # a repeated saved value changes nothing and is accepted; the new log_every is applied
    (result,) = run_all([["solve", f"resume={run_dir}", "ansatz.resolution=33",
                          "trainer.log_every=7"]], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = read_summary(run_dir)
    assert summary["status"] == "completed"
    assert summary["resume_overrides"] == ["trainer.log_every=7"]
    assert summary["config"]["trainer"]["log_every"] == 7
    assert (run_dir / ".hydra" / "config.yaml").read_text() == \
        saved.replace("log_every: 100", "log_every: 7")
    assert "resumed with trainer.log_every=7" in (run_dir / "solve.log").read_text()


# --- one residual, and a status that says when the tolerance was not met -------------------------
def test_float32_multigrid_reports_one_residual_and_the_unmet_tolerance(finished_run: Path,
                                                                         tmp_path: Path) -> None:
    run_dir = tmp_path / "f32"
    (result,) = run_all([["solve", *QUIET, "equation=diffusion", "precision=float32",
                          "ansatz.resolution=129", f"hydra.run.dir={run_dir}"]], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = read_summary(run_dir)
    with (run_dir / "metrics.csv").open(newline="") as handle:
        last = float(list(csv.DictReader(handle))[-1]["rel_residual"])
    residual = summary["metrics"]["rel_residual"]
    assert last == pytest.approx(residual, rel=1e-7)  # metrics.csv keeps 8 digits
    assert residual > 1e-10 and summary["tolerance_met"] is False
    assert "float32" in summary["stop_reason"] and "optimizer.tol=1e-10 not met" in \
        summary["stop_reason"]
    assert "neuralpde: warning: optimizer.tol=1e-10 not met" in result.stderr
    assert summary["cycles"] < 50, "a stalled residual stops the cycles"
    # the float32 solution is still as good as float32 allows against the direct solve
    assert summary["metrics"]["rel_l2_error"] < 1e-5
    # float64 meets the tolerance, and says so
    done = read_summary(finished_run)
    assert done["tolerance_met"] is True and done["metrics"]["rel_residual"] <= 1e-10


@pytest.mark.parametrize("kind,key,value", [
    ("constant", "path", "k.npy"), ("constant", "contrast", 10.0),
    ("checkerboard", "width", 0.2), ("gaussian_bump", "cells", 8), ("file", "value", 3.0),
])
def test_a_field_key_the_kind_does_not_read_is_an_error(kind: str, key: str, value: object) -> None:
    cfg = FieldConfig(**{"kind": kind, "path": "k.npy" if kind == "file" else None, key: value})
    with pytest.raises(UserError, match=rf"equation\.kappa\.{key}=.* is not used by "
                                        rf"equation\.kappa\.kind={kind}"):
        SteadyDiffusion(DiffusionConfig(kappa=cfg), torch.float64, torch.device("cpu"))
