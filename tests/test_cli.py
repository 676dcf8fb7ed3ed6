"""The real CLI on tiny configs: run directories, errors, sweeps."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import read_summary

TINY = ["trainer.progress=false", "experiment=smoke"]


def test_top_level_help_lists_subcommands(cli) -> None:
    out = cli("--help")
    assert out.returncode == 0 and "solve" in out.stdout


def test_unknown_subcommand_is_one_clean_line(cli) -> None:
    out = cli("sovle")
    assert out.returncode == 2 and "solve" in out.stderr and "Traceback" not in out.stderr


def test_solve_help_shows_groups_and_options(cli) -> None:
    out = cli("solve", "--help")
    assert out.returncode == 0
    for word in ("equation: ", "heat", "ansatz: ", "mlp", "optimizer: ", "adam_lbfgs", "device: "):
        assert word in out.stdout, word


def test_cfg_job_prints_the_composed_config(cli) -> None:
    out = cli("solve", "--cfg", "job", "equation.dim=3")
    assert out.returncode == 0 and "dim: 3" in out.stdout and "diffusivity: 0.5" in out.stdout


@pytest.mark.parametrize("dim", [1, 2])
def test_heat_run_writes_a_complete_run_directory(cli, tmp_path: Path, dim: int) -> None:
    run_dir = tmp_path / f"heat{dim}d"
    out = cli("solve", *TINY, f"equation.dim={dim}", "optimizer.adam_steps=300",
              "optimizer.lbfgs_steps=5", "trainer.eval_every=100", f"hydra.run.dir={run_dir}")
    assert out.returncode == 0, out.stderr[-2000:]
    for name in ("metrics.csv", "summary.json", "solution.npz", "checkpoints/last.pt",
                 "checkpoints/best.pt", "plots/losses.png", "plots/solution.png",
                 "plots/moments.png", ".hydra/config.yaml", ".hydra/overrides.yaml", "solve.log"):
        assert (run_dir / name).exists(), name
    with (run_dir / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["step"]) for r in rows] == list(range(1, len(rows) + 1))
    assert {r["phase"] for r in rows} == {"ic", "adam", "lbfgs"}
    assert all(np.isfinite(float(r["loss"])) for r in rows)
    summary = read_summary(run_dir)
    assert summary["status"] == "completed" and summary["device"] == "cpu"
    assert summary["versions"]["torch"] == torch.__version__
    metrics = summary["metrics"]
    # a broken solver (no time evolution, wrong diffusivity) sits far above these
    assert metrics["rel_l2_error"] < 0.1, metrics
    assert metrics["std_rel_error"] < 0.05, metrics
    with np.load(run_dir / "solution.npz") as data:
        t, x, u, u_exact = data["t"], data["x"], data["u"], data["u_exact"]
    assert t.shape == (3,) and x.shape[1] == dim and u.shape == u_exact.shape == (3, x.shape[0])


def test_same_seed_same_losses(cli, tmp_path: Path) -> None:
    runs = []
    for name in ("a", "b"):
        out = cli("solve", *TINY, f"hydra.run.dir={tmp_path / name}")
        assert out.returncode == 0, out.stderr[-2000:]
        runs.append([r["loss"] for r in csv.DictReader((tmp_path / name / "metrics.csv").open())])
    assert runs[0] == runs[1]


@pytest.mark.parametrize("override,expected", [
    ("equation=wave", "equation=wave is not an option of equation; choose one of"),
    ("ansatz=transformer", "ansatz=transformer is not an option of ansatz; choose one of"),
    ("equation.diffusivity=-1", "equation.diffusivity=-1.0 must be > 0"),
    ("equation.dim=0", "equation.dim=0 must be an integer ≥ 1"),
    ("sampler.batch_size=0", "sampler.batch_size=0 must be a positive integer"),
    ("equation.t_final=0", "equation.t_final=0.0 must be > 0"),
    ("equation.initial_cov=[[1.0,2.0],[2.0,1.0]]", "not symmetric positive definite"),
    ("equation.dim=abc", "equation.dim"),
    ("ansatz=grid", "ansatz=grid cannot solve equation=heat"),
])
def test_bad_input_is_one_clear_line(cli, tmp_path: Path, override: str, expected: str) -> None:
    out = cli("solve", *TINY, override, f"hydra.run.dir={tmp_path / 'bad'}")
    assert out.returncode != 0
    assert expected in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "bad" / "metrics.csv").exists(), "no work may start on bad input"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_gpu_is_refused(cli, tmp_path: Path) -> None:
    out = cli("solve", *TINY, "device=cuda", f"hydra.run.dir={tmp_path / 'gpu'}")
    assert out.returncode == 2 and "device=cuda" in out.stderr and "Traceback" not in out.stderr


def test_sweep_writes_a_summary_row_per_job(cli, tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    out = cli("solve", "-m", *TINY, "optimizer.lr=1e-3,3e-3", "ansatz.width=8,-4",
              f"hydra.sweep.dir={sweep}")
    # width=-4 jobs fail cleanly: rows with their error; the others still run
    assert out.returncode == 1, out.stderr[-2000:]
    with (sweep / "sweep_summary.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4
    ok = [r for r in rows if r["status"] == "completed"]
    failed = [r for r in rows if r["status"] == "failed"]
    assert len(ok) == 2 and len(failed) == 2
    assert all(float(r["rel_l2_error"]) < 1 for r in ok)
    assert all("ansatz.width" in r["error"] for r in failed)
    # Hydra's sweeper writes each swept value in its canonical form
    assert {float(r["override.optimizer.lr"]) for r in rows} == {1e-3, 3e-3}
    assert (sweep / "sweep_error.png").exists()
    assert json.loads((sweep / "0" / "summary.json").read_text())["status"] == "completed"
