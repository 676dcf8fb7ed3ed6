"""`neuralpde calibrate` through the real CLI, on data drawn here from the exact OU law."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import read_summary, run_cli

OU = dict(theta=1.0, mean=0.5, sigma=0.7)
FAST = ["fit.profile_points=3", "fit.density_bins=2"]


def write_ou_csv(path: Path, n: int = 600, dt: float = 0.5, paths: int = 2, seed: int = 0,
                 extra: str = "") -> Path:
    """Two paths of the exact OU transition, in the data schema: time, x, path."""
    rng = np.random.default_rng(seed)
    a = math.exp(-OU["theta"] * dt)
    sd = OU["sigma"] * math.sqrt((1 - a * a) / (2 * OU["theta"]))
    lines = [f"time,x,path{extra and ',' + extra}"]
    for p in range(paths):
        x = OU["mean"]
        for i in range(n // paths + 1):
            lines.append(f"{i * dt:.6g},{x:.17g},{p}{extra and ',1'}")
            x = OU["mean"] + (x - OU["mean"]) * a + sd * rng.standard_normal()
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> Path:
    """One uninterrupted calibrate run (shared by the tests that read it)."""
    root = tmp_path_factory.mktemp("calibrate")
    data = write_ou_csv(root / "ou.csv")
    result = run_cli(["calibrate", f"data={data}", *FAST, "fit.bootstrap_sets=3",
                      "hydra.run.dir=run"], root)
    assert result.returncode == 0, result.stderr
    assert "bias-corrected" in result.stdout  # the console table's row
    assert "…" not in result.stdout  # piped, the table is as wide as it needs
    return root / "run"


def test_fit_matches_the_exact_mle_in_standard_errors(fitted: Path):
    fit = json.loads((fitted / "fit.json").read_text())
    exact = fit["baselines"]["exact"]
    for name in ("theta", "mean", "sigma"):
        assert abs(fit["estimates"][name] - exact["estimates"][name]) < 0.05 * exact["se"][name]
        assert abs(fit["se"][name] / exact["se"][name] - 1) < 0.02
    # Euler at Δt = 0.5 estimates (1 − e^{−θΔ})/Δ, about 21% below θ: visibly off
    assert fit["baselines"]["euler"]["estimates"]["theta"] < 0.9 * exact["estimates"]["theta"]
    assert fit["n_transitions"] == 600 and fit["n_paths"] == 2
    # the default K = 3 is asked for; OU's law is Gaussian, and the first march says so
    assert fit["config"]["ansatz"]["components"] == 3 and fit["time_march"]["components"] == 1
    assert abs(fit["loglik"] - exact["loglik"]) < 0.05


def test_bootstrap_bias_correction_is_recorded_with_its_refits(fitted: Path):
    """θ̃ = 2θ̂ − mean(θ̂*) from refits of data drawn at θ̂, its SE widened by √(1 + 1/B); the
    refits scatter like the fit's own SEs say (the data's design is replayed, not one path)."""
    fit = json.loads((fitted / "fit.json").read_text())
    boot = fit["bias_correction"]
    assert boot["refits"] == 3 and boot["failed"] == 0
    log = (fitted / "calibrate.log").read_text()  # its progress in the file, not only a terminal
    assert all(f"bootstrap set {k} of 3: theta " in log for k in (1, 2, 3))
    reps = np.array(boot["replicates"])
    assert reps.shape == (3, 3) and len({tuple(r) for r in reps.tolist()}) == 3
    for i, name in enumerate(fit["names"]):
        est, se = fit["estimates"][name], fit["se"][name]
        assert boot["estimates"][name] == pytest.approx(2 * est - reps[:, i].mean(), rel=1e-12)
        assert boot["se"][name] == pytest.approx(se * math.sqrt(4 / 3), rel=1e-12)
        # 3 draws of a law with sd SE: each within 5 SE of θ̂, not all on top of it
        assert np.all(np.abs(reps[:, i] - est) < 5 * se), name
        assert np.abs(reps[:, i] - est).max() > 0.05 * se, name
    summary = read_summary(fitted)
    assert summary["metrics"]["theta_bias_corrected"] == boot["estimates"]["theta"]


def test_run_directory_is_complete_and_loads_safely(fitted: Path):
    summary = read_summary(fitted)
    assert summary["status"] == "completed" and summary["converged"]
    with np.load(fitted / "diagnostics.npz") as d:
        pit = d["pit"]
        assert pit.shape == (600,) and 0 < pit.min() and pit.max() < 1
        # the PIT of the exact law's fit is uniform: Kolmogorov–Smirnov distance small
        u = np.sort(pit)
        ks = np.max(np.abs(u - (np.arange(1, u.size + 1) - 0.5) / u.size))
        assert ks < 1.63 / math.sqrt(u.size)  # the 1% critical value
        assert d["profile_loglik"].shape == (3, 3)
        assert np.all(d["profile_loglik"] <= d["profile_loglik"][:, 1:2] + 1e-6)
    for plot in ("trace", "profiles", "transition", "pit", "estimates"):
        assert (fitted / "plots" / f"{plot}.png").stat().st_size > 10_000
    checkpoint = torch.load(fitted / "checkpoints" / "last.pt", weights_only=True)
    assert checkpoint["format"] == "neuralpde-calibrate-1"
    header = (fitted / "metrics.csv").read_text().splitlines()[0]
    assert header.startswith("iteration,loglik,grad_norm")


def test_interrupted_fit_resumes_to_the_same_estimates(fitted: Path, tmp_path: Path):
    data = write_ou_csv(tmp_path / "ou.csv")
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "neuralpde_cli.cli", "calibrate",
                             f"data={data}", *FAST, f"hydra.run.dir={run_dir}"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (run_dir / "checkpoints" / "last.pt").exists() and proc.poll() is None:
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the fit finished before the interrupt arrived")
    assert proc.returncode == 130, err
    assert "resume=" in err
    resumed = run_cli(["calibrate", f"resume={run_dir}"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    a = json.loads((run_dir / "fit.json").read_text())["estimates"]
    b = json.loads((fitted / "fit.json").read_text())["estimates"]
    for name in a:
        assert abs(a[name] - b[name]) < 1e-9 * max(1.0, abs(b[name])), name


@pytest.mark.parametrize("case,args,needle", [
    ("missing", ["data=nope.csv"], "nope.csv"),
    ("dim", ["data=ou.csv", "equation.dim=2"], "dim"),
    ("param", ["data=ou.csv", "fit.params=[kappa]"], "kappa"),
    ("start", ["data=ou.csv", "equation.sde.sigma=[[-0.0]]", "fit.start_from=config"], "sigma"),
    ("cir_negative", ["data=neg.csv", "equation.sde.kind=cir"], "neg.csv line"),
    ("baseline", ["data=ou.csv", "fit.baselines=[exact,milstein]"], "milstein"),
    ("bootstrap", ["data=ou.csv", "fit.bootstrap_sets=1"], "fit.bootstrap_sets=1"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path: Path, case, args, needle):
    write_ou_csv(tmp_path / "ou.csv", n=40)
    write_ou_csv(tmp_path / "neg.csv", n=40)  # OU around 0.5 with σ 0.7 goes below 0
    result = run_cli(["calibrate", *args, "hydra.run.dir=run"], tmp_path)
    assert result.returncode == 2, result.stderr
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("neuralpde: error:"), result.stderr
    assert needle in lines[0]
    assert not (tmp_path / "run").exists()


def test_a_collapsed_or_unidentified_baseline_is_no_start():
    """A baseline whose positive parameter sits on 0 in SE terms (Kessler's rate of 7e-16 on
    the T-bill rate, from the config's start), has no finite SE, or did not converge, is not
    used to start the PDE fit; a sound one is."""
    from types import SimpleNamespace

    from neuralpde_cli.tasks.calibrate import _unsound

    problem = SimpleNamespace(names=["rate", "level"], kinds=["positive", "real"])

    def entry(rate: float, se: float, converged: bool = True) -> dict:
        return {"estimates": {"rate": rate, "level": 4.0}, "se": {"rate": se, "level": 1.0},
                "converged": converged}

    assert _unsound(problem, entry(0.05, 0.05)) is None
    assert "collapsed" in _unsound(problem, entry(7e-16, 0.05))
    assert "no finite standard error" in _unsound(problem, entry(0.05, math.nan))
    assert _unsound(problem, entry(0.05, 0.05, converged=False)) == "did not converge"


def test_a_run_from_before_the_data_group_resumes(fitted: Path, tmp_path: Path):
    """Run directories written when the config held `data: PATH` (before data.path, data.time,
    …) still resume: the saved path becomes data.path."""
    import shutil

    import yaml

    old = tmp_path / "old"
    shutil.copytree(fitted, old)
    config = old / ".hydra" / "config.yaml"
    saved = yaml.safe_load(config.read_text())
    saved["data"] = saved["data"]["path"]
    config.write_text(yaml.safe_dump(saved))
    resumed = run_cli(["calibrate", f"resume={old}"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    a = json.loads((old / "fit.json").read_text())
    b = json.loads((fitted / "fit.json").read_text())
    assert a["data"]["path"] == b["data"]["path"]
    for name in b["estimates"]:
        assert abs(a["estimates"][name] - b["estimates"][name]) < 1e-9 * max(1.0, abs(b["estimates"][name]))


def test_a_profile_point_outside_the_domain_or_refused_by_the_march_is_a_gap():
    """The profile of μ drags ρ along its slope past −1 (a singular diffusion), and the march
    refuses one point inside: both are gaps (NaN), the rest of the profile is computed, and
    nothing raises (on the S&P 500 with Heston, a UserError from a profile point ended the run
    after the whole fit)."""
    from types import SimpleNamespace

    from neuralpde_cli.errors import UserError
    from neuralpde_cli.tasks.calibrate import _profiles

    calls = []

    def log_density(values, differentiable):
        mu, rho = float(values["mu"]), float(values["rho"])
        calls.append((mu, rho))
        assert -1 < rho < 1, "a point outside the domain was evaluated"
        if abs(mu - 0.05) < 1e-12:
            raise UserError("the diffusion matrix is singular at the start point")
        return torch.tensor([-(mu ** 2) - rho ** 2])

    problem = SimpleNamespace(
        cfg=SimpleNamespace(fit=SimpleNamespace(profile_points=5, profile_width=2.0)),
        names=["mu", "rho"], kinds=["real", "correlation"],
        tensors=lambda point, grad: {"mu": torch.tensor(point[0]), "rho": torch.tensor(point[1])})
    density = SimpleNamespace(step_times=[0.5, 1.0], log_density=log_density)
    hess = np.array([[-1.0, -0.9], [-0.9, -1.0]])  # ρ moves by −0.9 per unit of μ
    result = SimpleNamespace(estimates=np.array([0.0, -0.95]), hessian=hess,
                             se=np.array([0.05, 0.2]))
    out = _profiles(problem, density, result)
    mu_line = out["profile_loglik"][0]
    assert np.isnan(mu_line[-2]) and np.isnan(mu_line[-1])  # μ = 0.05: refused; 0.1: ρ = −1.04
    assert np.isfinite(mu_line[:3]).all()
    rho_grid = out["profile_grid"][1]
    assert (rho_grid > -1).all() and (rho_grid < 1).all()  # ρ's own profile stays inside
