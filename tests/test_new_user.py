"""An hour as a new user (issue 13), a CLI test per class of problem found: Hydra's own
composition errors as one line, experiment=smoke for every valid combination, files a user
points the tool at, chains as complete run directories, logs, file modes, resume times."""

from __future__ import annotations

import os
import shutil
import stat
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
import yaml

from conftest import read_summary, run_cli
from neuralpde_cli.cli import main
from neuralpde_cli.registry import VALID

QUIET = ["trainer.progress=false"]


# --- bad input: one line, exit 2, nothing written ---------------------------------------------
def test_a_hydra_composition_error_is_one_line_from_the_console_script(cli, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    out = cli("solve", "equation=heatt", f"hydra.run.dir={run_dir}")
    assert out.returncode == 2 and out.stdout == "", out
    assert out.stderr == ("neuralpde: error: equation=heatt is not an option of equation; did "
                          "you mean heat? choose one of ['diffusion', 'fokker_planck', 'heat']\n")
    assert not run_dir.exists()


def solve_in_process(*args: str) -> tuple[int, str, str]:
    """``neuralpde solve ARGS`` in this process (the same main as the console script): exit
    status, stdout, stderr. Cheap enough for one case per class of bad input."""
    import contextlib
    import io
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
            mock.patch.object(sys, "argv", list(sys.argv)), \
            mock.patch("hydra._internal.utils.is_under_debugger", return_value=False):
        try:
            code = main(["solve", *args])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("args, needles", [
    (["equaton=heat"], ["equaton=heat", "did you mean equation?"]),                # a group
    (["device=tpu"], ["device=tpu", "did you mean cpu?", "'cuda'"]),                 # an option
    (["trainer.progres=false"], ["trainer.progres", "did you mean trainer.progress?"]),  # a key
    (["optimizer.lr=abc"], ["optimizer.lr=abc", "takes a number"]),                 # a type
    (["equation=fokker_planck", "equation.sde.sigma=[1,2]"],                        # a shape
     ["equation.sde.sigma=[1,2]", "takes a matrix", "[[0.8,0.0],[0.4,0.6]]"]),
    (["equation.dim=[1,"], ["cannot parse", "[1,"]),                                 # syntax
    (["equation=heat", "multigrid.levels=3"], ["multigrid.levels=3", "equation=diffusion"]),
])
def test_bad_input_is_one_line_naming_key_value_and_what_is_allowed(tmp_path: Path, args,
                                                                    needles) -> None:
    run_dir = tmp_path / "run"
    code, out, err = solve_in_process(*args, f"hydra.run.dir={run_dir}")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and out == "", err
    assert lines[0].startswith("neuralpde: error: ")
    for needle in needles:
        assert needle in lines[0], needle
    assert not run_dir.exists()


def test_integers_are_accepted_where_floats_are_expected_nested_lists_included() -> None:
    code, out, err = solve_in_process("--cfg", "job", "equation=fokker_planck",
                                      "equation.sde.theta=[[1,0],[2,3]]",
                                      "equation.initial_mean=[1,2]")
    assert code == 0, err
    equation = yaml.safe_load(out)["equation"]
    for value, want in ((equation["sde"]["theta"], [[1.0, 0.0], [2.0, 3.0]]),
                        (equation["initial_mean"], [1.0, 2.0])):
        assert value == want and all(isinstance(v, float) for v in np.ravel(value))


# --- experiment=smoke: every valid equation × ansatz × optimizer -----------------------------
#: four sweeps whose jobs are exactly the valid combinations (registry.VALID)
SWEEPS = {
    "density_gradient": ["equation=heat,fokker_planck", "ansatz=mlp,gmm",
                         "optimizer=adam,lbfgs,adam_lbfgs"],
    "steady_gradient": ["equation=diffusion", "ansatz=grid,mlp", "optimizer=adam,lbfgs,adam_lbfgs"],
    "mixture_solvers": ["equation=heat,fokker_planck", "ansatz=gmm",
                        "optimizer=levenberg_marquardt,time_march"],
    "steady_multigrid": ["equation=diffusion", "ansatz=grid", "optimizer=multigrid"],
}


def _combinations(sweep: list[str]) -> set[tuple[str, ...]]:
    values = [item.split("=")[1].split(",") for item in sweep]
    return {(e, a, o) for e in values[0] for a in values[1] for o in values[2]}


def test_the_sweeps_cover_every_valid_combination_once() -> None:
    valid = {(e, a, o) for e, ansatzes in VALID.items() for a, opts in ansatzes.items()
             for o in opts}
    covered = [c for sweep in SWEEPS.values() for c in _combinations(sweep)]
    assert sorted(covered) == sorted(valid)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple]:
    """The four sweeps, two at a time on one thread each (the runs are small: a second core
    halves the wall time). Returns name → (the finished process, the sweep folder)."""
    root = tmp_path_factory.mktemp("smoke")
    commands = {name: ["solve", "-m", "experiment=smoke", *QUIET, *sweep,
                       f"hydra.sweep.dir={root / name}"] for name, sweep in SWEEPS.items()}
    with pytest.MonkeyPatch.context() as patch, ThreadPoolExecutor(2) as pool:
        patch.setenv("OMP_NUM_THREADS", "1")
        done = dict(zip(commands, pool.map(lambda args: run_cli(args, root), commands.values())))
    return {name: (done[name], root / name) for name in SWEEPS}


@pytest.mark.parametrize("name", list(SWEEPS))
def test_smoke_runs_every_combination_to_a_complete_run_directory(smoke, name: str) -> None:
    out, sweep_dir = smoke[name]
    assert out.returncode == 0, out.stderr[-3000:]
    jobs = sorted(p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit())
    assert len(jobs) == len(_combinations(SWEEPS[name]))
    mode = 0o666 & ~_umask()
    for job in jobs:
        summary = read_summary(job)
        assert summary["status"] == "completed", (job, summary.get("error"))
        grid = summary["equation"] == "diffusion"
        plots = ["losses.png", "solution.png"] + (["error.png"] if grid else
                                                  ["moments.png", "density.gif"])
        for path in ["metrics.csv", "solution.npz", "checkpoints/last.pt", ".hydra/config.yaml",
                     *(f"plots/{p}" for p in plots)]:
            assert (job / path).is_file(), (job, path)
        # every file of the run has the usual mode, those written atomically included
        for path in ("summary.json", "solution.npz", "checkpoints/last.pt", "metrics.csv"):
            assert stat.S_IMODE((job / path).stat().st_mode) == mode, (job, path)
        assert all(np.isfinite(v) for v in summary["metrics"].values() if v is not None)
        log = (job / "solve.log").read_text()
        done = next(line for line in out.stdout.splitlines() if line.startswith(f"done: {job} "))
        assert done in log and "Animation.save" not in log
        if summary["optimizer"] in ("time_march", "multigrid"):  # exact where it is cheap
            assert summary["metrics"]["rel_l2_error"] < (1e-6 if grid else 1e-3), summary
            assert "time-march done" in log or "multigrid:" in log
        else:
            last = {"adam": "adam", "lbfgs": "lbfgs", "adam_lbfgs": "lbfgs",
                    "levenberg_marquardt": "lm"}[summary["optimizer"]]
            assert f"phase {last} done" in log, log
        if summary["ansatz"] == "mlp" and grid and summary["metrics"]["rel_l2_error"] > 0.1:
            # a large error is named, with the setting that works (the PINN: the grid)
            assert "large error" in summary["advice"] and "ansatz=grid" in summary["advice"]
            assert f"({summary['advice']})" in done
    # no live progress bar when the output is not a terminal: one line per phase instead
    assert "━" not in out.stderr + out.stdout
    # sweep_error.png: a panel (4.6 in at 110 dpi) per override that varies, none for the
    # constant ones (experiment, trainer.progress)
    varying = sum(len(item.split(",")) > 1 for item in SWEEPS[name])
    if varying:
        from PIL import Image
        with Image.open(sweep_dir / "sweep_error.png") as image:
            assert image.size[0] == round(4.6 * min(varying, 3) * 110), image.size


def test_resumed_wall_time_covers_the_training_before_the_resume(smoke, tmp_path: Path) -> None:
    """wall_time_s ≥ train_time_s after a resume that follows 100 s of training."""
    _, sweep_dir = smoke["density_gradient"]
    run_dir = tmp_path / "run"
    shutil.copytree(sweep_dir / "0", run_dir)
    path = run_dir / "checkpoints" / "last.pt"
    state = torch.load(path, weights_only=True)
    state["elapsed"] = 100.0  # as if the first session had trained for 100 s
    torch.save(state, path)
    out = run_cli(["solve", f"resume={run_dir}"], tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    summary = read_summary(run_dir)
    assert summary["train_time_s"] >= 100.0
    assert summary["wall_time_s"] >= summary["train_time_s"]


# --- files: κ and s from files, chains as complete run directories -------------------------
def test_field_files_follow_one_stated_layout_and_chains_are_complete(cli, tmp_path: Path) -> None:
    """κ from a .npy indexed [x, y] (as solution.npz), s from an image as seen (top row at the
    top); a chain's levels are run directories later commands can use."""
    kappa = np.ones((10, 20))
    kappa[:3, :] = 50.0                     # a strip along the left side (small x)
    np.save(tmp_path / "kappa.npy", kappa)
    import matplotlib.image as mpimg
    image = np.zeros((16, 8))
    image[:4, :] = 1.0                      # white top rows: the top of the domain
    mpimg.imsave(tmp_path / "source.png", image, cmap="gray", vmin=0, vmax=1)
    fields = ["equation=diffusion", "equation.kappa.kind=file",
              f"equation.kappa.path={tmp_path / 'kappa.npy'}", "equation.source.kind=file",
              f"equation.source.path={tmp_path / 'source.png'}", "equation.source.range=[0,10]"]
    chain = tmp_path / "chain"
    out = cli("solve", *QUIET, *fields, "multigrid.levels=2", "ansatz.resolution=17",
              f"hydra.run.dir={chain}")
    assert out.returncode == 0, out.stderr[-2000:]
    with np.load(chain / "level_1" / "solution.npz") as data:
        k, s = data["kappa"], data["source"]
    assert k[0].mean() > 40 and k[-1].mean() < 2            # left strip, not a bottom one
    assert s[:, -1].mean() > 9 and s[:, 0].mean() < 1        # top rows, not a right strip
    log = (chain / "solve.log").read_text()
    assert "10 × 20 values (x × y)" in log and "resampled bilinearly" in log
    assert f"done: {chain}" in log
    for level in ("level_0", "level_1"):
        for name in (".hydra/config.yaml", ".hydra/overrides.yaml", "solve.log", "summary.json",
                     "solution.npz", "checkpoints/last.pt", "metrics.csv", "plots/solution.png"):
            assert (chain / level / name).is_file(), (level, name)
        assert "multigrid:" in (chain / level / "solve.log").read_text()
    # a later run starts from the chain (its finest level); a level resumes on its own
    warm = tmp_path / "warm"
    out = cli("solve", *QUIET, *fields, "ansatz.resolution=17", f"init.from_run={chain}",
              f"hydra.run.dir={warm}")
    assert out.returncode == 0, out.stderr[-2000:]
    assert read_summary(warm)["metrics"]["rel_l2_error"] < 1e-6
    out = cli("solve", f"resume={chain / 'level_1'}")
    assert out.returncode == 0, out.stderr[-2000:]
    assert read_summary(chain / "level_1")["metrics"]["rel_l2_error"] < 1e-6


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
