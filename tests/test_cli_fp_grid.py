"""The real CLI on the Fokker–Planck and grid paths: default runs, chains, sweeps, bad input."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from conftest import read_summary

QUIET = ["trainer.progress=false"]


def test_fokker_planck_default_is_the_ou_benchmark(cli, tmp_path: Path) -> None:
    """2-D OU from a near point mass, GMM time-marched: checked against the exact density."""
    run_dir = tmp_path / "fp"
    out = cli("solve", *QUIET, "equation=fokker_planck", f"hydra.run.dir={run_dir}")
    assert out.returncode == 0, out.stderr[-2000:]
    summary = read_summary(run_dir)
    assert (summary["equation"], summary["ansatz"], summary["optimizer"]) == \
        ("fokker_planck", "gmm", "time_march")
    metrics = summary["metrics"]
    for t in (0.1, 0.5, 1, 2, 5):
        assert metrics[f"rel_l2_error_t{t:g}"] < 1e-3, metrics
    assert metrics["mass_error"] < 1e-6
    for name in ("plots/losses.png", "plots/solution.png", "plots/moments.png",
                 "plots/density.gif", "checkpoints/last.pt"):
        assert (run_dir / name).exists(), name
    with np.load(run_dir / "solution.npz") as data:
        assert data["u"].shape == data["u_exact"].shape == (5, data["x"].shape[0])
        assert data["u_frames"].shape == (data["moment_t"].shape[0], data["x"].shape[0])


def test_ou_space_time_by_levenberg_marquardt(cli, tmp_path: Path) -> None:
    """The same benchmark solved the other way (a network of t trained on the space-time
    residual): rel. L2 ≤ 1e-3 against the exact density at every eval time."""
    run_dir = tmp_path / "st"
    out = cli("solve", *QUIET, "experiment=ou_spacetime", f"hydra.run.dir={run_dir}")
    assert out.returncode == 0, out.stderr[-2000:]
    summary = read_summary(run_dir)
    assert summary["optimizer"] == "levenberg_marquardt"
    for t in (0.1, 0.5, 1, 2, 5):
        assert summary["metrics"][f"rel_l2_error_t{t:g}"] < 1e-3, summary["metrics"]
    with open(run_dir / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert {r["phase"] for r in rows} == {"lm"}
    assert float(rows[-1]["loss"]) < 1e-6 * float(rows[0]["loss"])


def test_heat_with_the_mixture(cli, tmp_path: Path) -> None:
    run_dir = tmp_path / "heat_gmm"
    out = cli("solve", *QUIET, "equation=heat", "ansatz=gmm", f"hydra.run.dir={run_dir}")
    assert out.returncode == 0, out.stderr[-2000:]
    assert read_summary(run_dir)["metrics"]["rel_l2_error"] < 1e-4


def test_mixture_in_3d_draws_exact_marginals(cli, tmp_path: Path) -> None:
    run_dir = tmp_path / "heat3d"
    out = cli("solve", *QUIET, "equation=heat", "ansatz=gmm", "equation.dim=3",
              "equation.initial_correlation=0.5", f"hydra.run.dir={run_dir}")
    assert out.returncode == 0, out.stderr[-2000:]
    assert read_summary(run_dir)["metrics"]["cov_rel_error"] < 1e-3
    assert (run_dir / "plots" / "marginals.png").exists()
    with np.load(run_dir / "solution.npz") as data:
        u, exact = data["u_marginal"], data["u_marginal_exact"]
    assert np.linalg.norm(u - exact) < 1e-3 * np.linalg.norm(exact)


def test_double_well_mixture_against_the_reference(cli, tmp_path: Path) -> None:
    run_dir = tmp_path / "dw"
    out = cli("solve", *QUIET, "equation=fokker_planck", "equation.dim=1",
              "equation.sde.kind=double_well", "equation.initial_mean=[0.2]",
              "equation.eval_times=[1.0,2.0,5.0]", "ansatz.components=8",
              f"hydra.run.dir={run_dir}")
    assert out.returncode == 0, out.stderr[-2000:]
    assert read_summary(run_dir)["metrics"]["l1_error"] < 3e-3


def test_grid_chain_writes_a_run_per_level(cli, tmp_path: Path) -> None:
    run_dir = tmp_path / "chain"
    out = cli("solve", *QUIET, "equation=diffusion", "multigrid.levels=3",
              "ansatz.resolution=65", f"hydra.run.dir={run_dir}")
    assert out.returncode == 0, out.stderr[-2000:]
    summary = read_summary(run_dir)
    assert [lv["resolution"] for lv in summary["levels"]] == [17, 33, 65]
    for k in range(3):
        level = run_dir / f"level_{k}"
        assert (level / "solution.npz").exists() and (level / "metrics.csv").exists()
        metrics = read_summary(level)["metrics"]
        assert metrics["rel_residual"] < 1e-9 and metrics["rel_l2_error"] < 1e-8, metrics
    assert (run_dir / "plots" / "levels.png").exists()
    with np.load(run_dir / "level_2" / "solution.npz") as data:
        assert data["T"].shape == data["kappa"].shape == data["source"].shape == (65, 65)


def test_resolution_sweep_warm_started_from_an_earlier_run(cli, tmp_path: Path) -> None:
    coarse = tmp_path / "coarse"
    assert cli("solve", *QUIET, "equation=diffusion", "ansatz.resolution=17",
               f"hydra.run.dir={coarse}").returncode == 0
    sweep = tmp_path / "sweep"
    out = cli("solve", "-m", *QUIET, "equation=diffusion", "ansatz.resolution=33,65",
              "optimizer.cycle=v", f"init.from_run={coarse}", f"hydra.sweep.dir={sweep}")
    assert out.returncode == 0, out.stderr[-2000:]
    with (sweep / "sweep_summary.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["status"] for r in rows] == ["completed", "completed"]
    assert all(float(r["rel_residual"]) < 1e-9 for r in rows)


def test_grid_trained_by_lbfgs_on_the_energy(cli, tmp_path: Path) -> None:
    run_dir = tmp_path / "lbfgs"
    out = cli("solve", *QUIET, "equation=diffusion", "optimizer=lbfgs", "ansatz.resolution=17",
              "optimizer.lbfgs_steps=20", f"hydra.run.dir={run_dir}")
    assert out.returncode == 0, out.stderr[-2000:]
    assert read_summary(run_dir)["metrics"]["rel_l2_error"] < 1e-6


FP = "equation=fokker_planck"
GRID = "equation=diffusion"


@pytest.mark.parametrize("args,expected", [
    ([FP, "ansatz.components=0"], "ansatz.components=0 must be an integer ≥ 1"),
    ([FP, "equation.sde.sigma=[[1.0,0.0,0.0]]"], "equation.sde.sigma"),
    ([FP, "equation.sde.kind=custom", "equation.sde.drift=nosuchmodule:mu"], "nosuchmodule"),
    ([GRID, "ansatz.resolution=2"], "ansatz.resolution=2 must be ≥ 3"),
    ([GRID, "equation.kappa.value=-1.0"], "kappa"),
    ([GRID, "equation.kappa.kind=file", "equation.kappa.path=missing.npy"], "missing.npy"),
    ([GRID, "ansatz=gmm"], "ansatz=gmm cannot solve equation=diffusion"),
    ([GRID, "multigrid.levels=6", "ansatz.resolution=33"], "multigrid.levels=6"),
    ([FP, "optimizer=levenberg_marquardt", "optimizer.damping=-1"], "optimizer.damping=-1"),
    (["equation=heat", "optimizer=levenberg_marquardt"],
     "optimizer=levenberg_marquardt cannot train ansatz=mlp"),
    (["experiment=ou_spacetime", "ansatz=mlp"], "cannot train ansatz=mlp on equation=fokker_planck"),
])
def test_bad_input_is_one_clear_line(cli, tmp_path: Path, args: list[str], expected: str) -> None:
    out = cli("solve", *QUIET, *args, f"hydra.run.dir={tmp_path / 'bad'}")
    assert out.returncode == 2, out.stderr
    assert expected in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "bad" / "metrics.csv").exists(), "no work may start on bad input"
