"""Learned dynamics (neuralpde_cli/models, likelihood/moments.py, `neuralpde fit`) against
exact facts: the reaction–diffusion solution stays exactly uniform along y, the project's
Neumann stencil is the showcase's reflected one, the moment density is the exact OU transition
density, the simulator has the exact mean of linear SDEs with and without jumps, and the true
drift scores the sampling floor of the mean-path loss. The CLI runs on tiny sizes; the accuracy
targets live in benchmarks/neural_dynamics.py."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from neuralpde_cli.data import Observations, write_observations
from neuralpde_cli.errors import UserError
from neuralpde_cli.likelihood.moments import moment_log_density
from neuralpde_cli.models.neural_sde import NeuralSDEConfig, SDEExperiment
from neuralpde_cli.models.reaction_diffusion import (NeuralRDConfig, ReactionDiffusion,
                                                     ReactionNet, RDExperiment)
from neuralpde_cli.models.spiral import (DiagonalNoiseSDE, Jumps, ScaleFirst, SpiralSDE,
                                         mean_path_loss, simulate)
from neuralpde_cli.sdes import LinearSDE
from neuralpde_cli.solvers.stabilized import Integrator, IntegratorConfig

F64 = torch.float64
CPU = torch.device("cpu")


# --- reaction–diffusion ------------------------------------------------------------------------
def test_project_stencil_is_the_reflected_neumann_laplacian() -> None:
    n = 7
    system = ReactionDiffusion(NeuralRDConfig(n=n), F64, CPU)
    m = np.diag(-2.0 * np.ones(n)) + np.diag(np.ones(n - 1), 1) + np.diag(np.ones(n - 1), -1)
    m[0, 1] = m[-1, -2] = 2.0  # reflection: the showcase's Mx[2,1] = Mx[end-1,end] = 2
    a = torch.rand(n, n, dtype=F64, generator=torch.Generator().manual_seed(1))
    expected = m @ a.numpy() + a.numpy() @ m.T
    assert np.abs(system.laplacian(a).numpy() - expected).max() < 1e-13
    assert system.spectral_radius_bound(system.initial_state()) == pytest.approx(8 * 100 + 2)


@pytest.mark.parametrize("neural", [False, True])
def test_rd_solution_stays_exactly_uniform_along_y(neural: bool) -> None:
    """Zero start and α₁ depending on x only: every y-row is the same computation."""
    torch.manual_seed(0)
    cfg = NeuralRDConfig(n=12, t_final=2.0)
    system = ReactionDiffusion(cfg, F64, CPU, ReactionNet(8).to(F64) if neural else None)
    sol = Integrator(IntegratorConfig(method="rkl2", step=0.25)).integrate(
        system, system.initial_state(), torch.linspace(0, 2.0, 3, dtype=F64),
        system.spectral_radius_bound(system.initial_state()))
    u = sol.states[-1].detach()
    assert float(u.abs().max()) > 0.1
    assert float((u - u[:, :, :1]).abs().max()) <= 1e-13 * float(u.abs().max())


def test_rkl2_matches_a_fine_rk4_reference_on_the_rd_system() -> None:
    cfg = NeuralRDConfig(n=10, t_final=1.0)
    system = ReactionDiffusion(cfg, F64, CPU)
    u0, times = system.initial_state(), torch.tensor([0.0, 1.0], dtype=F64)
    rho = system.spectral_radius_bound(u0)
    with torch.no_grad():
        ref = Integrator(IntegratorConfig(method="rk4", step=2e-3)).integrate(system, u0, times, rho)
        fast = Integrator(IntegratorConfig(method="rkl2", step=0.05)).integrate(system, u0, times, rho)
    err = float((fast.states[-1] - ref.states[-1]).norm() / ref.states[-1].norm())
    assert err < 1e-4 and fast.evals * 5 < ref.evals


@pytest.mark.parametrize("method", ["bosh3", "dopri5"])
def test_gradient_through_the_adaptive_baseline_is_exact_on_stiff_diffusion(method: str) -> None:
    """d/dD Σ_k w_k·1ᵀu(t_k) for u' = D·Lu (Dirichlet, ρ(DL) ≈ 800 as in the RD system) from a
    step, which excites every mode: exactly Σ_k w_k·1ᵀV diag(λt_k e^{Dλt_k}) Vᵀu₀. Over an
    output interval of 0.1 the stiffest mode decays like e^{−80}, so re-integrating u backward
    in time (torchdiffeq's adjoint) amplifies round-off by e^{80}: that did not finish here and
    gave NaN on the RD system."""
    n, d0 = 16, 0.7
    dx = 1.0 / (n + 1)
    lap = (torch.diag(torch.full((n,), -2.0, dtype=F64)) + torch.diag(torch.ones(n - 1, dtype=F64), 1)
           + torch.diag(torch.ones(n - 1, dtype=F64), -1)) / dx ** 2
    u0 = (torch.arange(1, n + 1, dtype=F64) * dx >= 0.6).to(F64)
    times, w = torch.tensor([0.0, 0.1, 0.2], dtype=F64), torch.tensor([1.0, 2.0], dtype=F64)
    lam, vec = torch.linalg.eigh(lap)
    exact = sum(float(wk * (vec.sum(0) * (vec.T @ u0) * lam * t * torch.exp(d0 * lam * t)).sum())
                for wk, t in zip(w, times[1:]))
    d = torch.tensor(d0, dtype=F64, requires_grad=True)
    sol = Integrator(IntegratorConfig(method=method, rtol=1e-6, atol=1e-8)).integrate(
        lambda y: d * (lap @ y), u0, times, rho=0.0, differentiable=True)
    (sol.states[1:].sum(-1) * w).sum().backward()
    assert abs(float(d.grad) - exact) < 1e-3 * abs(exact), (float(d.grad), exact)
    assert sol.counter.evals == 2 * sol.evals  # the backward recomputed each interval once


# --- the moment density ------------------------------------------------------------------------
def test_moment_density_is_the_exact_ou_transition_density() -> None:
    theta = torch.tensor([[1.0, 0.6], [-0.4, 0.8]], dtype=F64)
    mean = torch.tensor([1.0, -0.5], dtype=F64)
    sigma = torch.tensor([[0.8, 0.0], [0.4, 0.6]], dtype=F64)
    sde = LinearSDE(-theta, theta @ mean, sigma)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(20, 2, dtype=F64, generator=gen)
    dt = torch.full((20,), 0.3, dtype=F64)
    x1 = sde.sample_transition(x0, torch.zeros(20, dtype=F64), dt, gen)
    phi, shift, cov = sde.transition_moments(dt)
    m = (phi @ x0.unsqueeze(-1)).squeeze(-1) + shift
    exact = torch.distributions.MultivariateNormal(m, cov).log_prob(x1)
    errors = [float((moment_log_density(sde, x0, x1, torch.zeros(20, dtype=F64), dt, n).detach()
                     - exact).abs().max()) for n in (8, 16, 32)]
    assert errors[-1] < 1e-8  # linear drift: the moment equations are exact; RK4's error is all
    assert all(a / b > 14 for a, b in zip(errors, errors[1:])), errors  # fourth order


# --- the simulator -----------------------------------------------------------------------------
class _Geometric(DiagonalNoiseSDE):
    """du = a∘u dt + b∘u dW: E u(t) = u₀e^{at}, E u(t)² = u₀²e^{(2a + b²)t}."""

    def __init__(self) -> None:
        super().__init__(2)
        self.a = torch.tensor([-0.5, 0.3], dtype=F64)
        self.b = torch.tensor([0.4, 0.2], dtype=F64)

    def drift(self, t, x):
        return self.a * x

    def noise(self, t, x):
        return self.b * x


@pytest.mark.parametrize("jumpy", [False, True])
def test_simulator_has_the_exact_moments_of_a_linear_sde(jumpy: bool) -> None:
    """With jumps u₁ ↦ u₁/2 at rate λ the mean of u₁ gains the factor E[2^{−N}] = e^{−λT/2}."""
    sde, n, T, rate = _Geometric(), 20000, 1.0, 2.0
    gen = torch.Generator().manual_seed(3)
    x0 = torch.tensor([1.0, 1.0], dtype=F64)
    times = torch.linspace(0, T, 5, dtype=F64)
    jumps = Jumps.sample(rate, 0.0, T, n, gen, F64, CPU) if jumpy else None
    with torch.no_grad():
        u = simulate(sde, x0, times, n, 10, gen, jumps, ScaleFirst(0.5) if jumpy else None)[-1]
    mean = torch.exp(sde.a * T) * torch.tensor([math.exp(-rate * T / 2) if jumpy else 1.0, 1.0],
                                               dtype=F64)
    se = u.std(0) / math.sqrt(n)
    assert bool(((u.mean(0) - mean).abs() < 4 * se).all()), (u.mean(0), mean, se)
    if not jumpy:
        second = torch.exp((2 * sde.a + sde.b ** 2) * T)
        assert bool(((u.pow(2).mean(0) - second).abs() / second < 0.03).all())


def test_true_drift_scores_the_sampling_floor_of_the_mean_loss() -> None:
    """E[loss] of the true model = Σ_(t,i) Var u_i(t)·(1/n_data + 1/n_model) (plus the
    scheme's squared bias, small at 10 steps per interval); a wrong drift scores far above."""
    cfg = NeuralSDEConfig(paths=100, model_paths=100)
    truth = SDEExperiment(cfg, F64, CPU, 0).truth
    times = torch.linspace(0, 1, 30, dtype=F64)
    x0 = torch.tensor([2.0, 0.0], dtype=F64)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        big = simulate(truth, x0, times, 4000, 10, gen)
        floor = float(big.var(1).sum()) * (2.0 / 100)
        losses = []
        for _ in range(16):
            data = simulate(truth, x0, times, 100, 10, gen).mean(1)
            losses.append(float(mean_path_loss(simulate(truth, x0, times, 100, 10, gen), data)))
        wrong = SpiralSDE(truth.a * 0.8, 0.2)
        bad = float(mean_path_loss(simulate(wrong, x0, times, 100, 10, gen), data))
    mean, se = np.mean(losses), np.std(losses) / math.sqrt(len(losses))
    assert abs(mean - floor) < 3 * se + 0.05, (mean, se, floor)
    assert 0.2 < floor < 0.8  # the 0.43 ± 0.40
    assert bad > 10 * floor


# --- bad input, in-process ---------------------------------------------------------------------
@pytest.mark.parametrize("overrides, message", [
    ({"method": "bogus"}, r"model.method='bogus' is unknown; choose one of \['mean', 'likelihood'\]"),
    ({"noise": "general"}, r"model.noise='general' is unknown; choose one of \['fixed', 'diagonal', 'additive'\]"),
    ({"observations": 1}, "model.observations=1 must be ≥ 2"),
    ({"u0": [1.0, 2.0, 3.0]}, "the spiral is 2-D"),
])
def test_sde_config_errors(overrides: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        SDEExperiment(NeuralSDEConfig(**overrides), F64, CPU, 0)


def test_rd_config_errors() -> None:
    cfg = NeuralRDConfig(n=8)
    cfg.integrator.method = "rock4"
    with pytest.raises(UserError, match=r"model.integrator.method='rock4' is unknown; choose one of "
                                        r"\['rkl2', 'rkc2', 'rk4', 'dopri5', 'bosh3'\]"):
        RDExperiment(cfg, F64, CPU, 0)
    cfg = NeuralRDConfig(n=8)
    cfg.integrator.step, cfg.integrator.max_stages = 5.0, 20
    with pytest.raises(UserError, match="needs more than model.integrator.max_stages=20 stages"):
        RDExperiment(cfg, F64, CPU, 0)
    exp = RDExperiment(NeuralRDConfig(n=8), F64, CPU, 0)
    wrong = Observations(time=np.arange(3.0), state=np.zeros((3, 10)), path=np.zeros(3))
    with pytest.raises(UserError, match=r"has 10 state column\(s\); model=neural_rd with model.n=8 "
                                        r"needs 3·8² = 192"):
        exp.check_data(wrong)


# --- the command -------------------------------------------------------------------------------
TINY_SDE = ["model.steps=3", "model.paths=8", "model.model_paths=8", "model.observations=6",
            "model.hidden=8", "trainer.progress=false", "device=cpu"]


def _run_dir(out: str) -> Path:
    line = [s for s in out.splitlines() if s.startswith("done: ")][-1]
    return Path(line.split()[1])


def test_fit_neural_sde_mean_and_resume(cli, tmp_path: Path) -> None:
    r = cli("fit", *TINY_SDE, "hydra.run.dir=run")
    assert r.returncode == 0, r.stderr
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 3
    for key in ("mean_loss", "floor_mean_loss", "drift_error", "noise_free_loss"):
        assert math.isfinite(summary["metrics"][key])
    assert {"plots/losses.png", "plots/paths.png", "plots/fields.png"} <= set(summary["plots"])
    assert (run / "data.csv").read_text().splitlines()[0] == "time,u1,u2,path"
    again = cli("fit", f"resume={run}")  # a finished run resumes to the same end
    assert again.returncode == 0, again.stderr
    assert json.loads((run / "summary.json").read_text())["steps"] == 3


def test_fit_likelihood_jump_and_rd(cli, tmp_path: Path) -> None:
    r = cli("fit", *TINY_SDE, "model.method=likelihood", "model.noise=diagonal",
            "model.warmup_steps=2", "model.lbfgs_steps=1", "hydra.run.dir=lik")
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "lik" / "summary.json").read_text())["metrics"]
    assert math.isfinite(m["diffusion_error"]) and math.isfinite(m["loglik_truth"])
    r = cli("fit", "model=jump_diffusion", *TINY_SDE, "hydra.run.dir=jump")
    assert r.returncode == 0, r.stderr
    s = json.loads((tmp_path / "jump" / "summary.json").read_text())
    assert "plots/jump_map.png" in s["plots"] and math.isfinite(s["metrics"]["jump_map_error"])
    r = cli("fit", "model=neural_rd", "model.n=8", "model.t_final=1", "model.snapshots=2",
            "model.steps=2", "model.lbfgs_steps=1", "model.hidden=4", "trainer.progress=false",
            "device=cpu",
            "hydra.run.dir=rd")
    assert r.returncode == 0, r.stderr
    s = json.loads((tmp_path / "rd" / "summary.json").read_text())
    assert s["metrics"]["y_nonuniformity"] < 1e-12 and s["stages_at_start"] >= 2
    assert {"plots/snapshots.png", "plots/reaction.png"} <= set(s["plots"])


def test_fit_neural_rd_with_the_adaptive_baseline(cli, tmp_path: Path) -> None:
    """The README's adaptive baseline trains (it failed with NaN through torchdiffeq's adjoint)
    and leaves a complete run directory."""
    r = cli("fit", "model=neural_rd", "model.integrator.method=bosh3", "model.n=6",
            "model.t_final=0.5", "model.snapshots=2", "model.steps=2", "model.lbfgs_steps=0",
            "model.hidden=4", "trainer.progress=false", "device=cpu", "hydra.run.dir=rd")
    assert r.returncode == 0, r.stderr
    run = tmp_path / "rd"
    s = json.loads((run / "summary.json").read_text())
    assert s["status"] == "completed" and s["steps"] == 2 and s["integrator"] == "bosh3"
    m = s["metrics"]  # spectral_radius is null: an adaptive method does not use it
    for key in ("reaction_error", "reaction_error_with_start", "data_rel_error"):
        assert math.isfinite(m[key]) and m[key] > 0, (key, m)
    # no exact y-uniformity here: an explicit adaptive method rides its stability limit and lets
    # round-off in the stiff (y-checkerboard too) modes grow to its tolerance (≈ 4e-3 at 1e-3)
    assert math.isfinite(m["y_nonuniformity"]) and m["rhs_evals_per_solve"] > 50
    assert math.isfinite(s["final_loss"]) and s["final_loss"] > 0
    losses = [float(row["loss"]) for row in csv.DictReader((run / "metrics.csv").open())
              if row.get("loss")]
    assert losses and all(math.isfinite(v) for v in losses)
    for name in ("data.csv", "data.npz", "solution.npz", "checkpoints/last.pt", *s["plots"]):
        assert (run / name).is_file() and (run / name).stat().st_size > 0, name
    assert {"plots/losses.png", "plots/snapshots.png", "plots/reaction.png"} <= set(s["plots"])


def test_fit_bad_input_is_one_line_and_writes_nothing(cli, tmp_path: Path) -> None:
    """Through the CLI: a model that does not exist, a stage count over the cap, a data file of
    the wrong shape (the other classes are checked in-process above and below)."""
    three = Observations(time=np.tile([0.0, 0.5], 2), state=np.ones((4, 3)),
                         path=np.repeat([0, 1], 2))
    write_observations(three, tmp_path / "three")
    cases = [
        (["model=neural_ode"], "neural_ode"),
        (["model=neural_rd", "model.integrator.step=4", "model.integrator.max_stages=30"],
         "needs more than model.integrator.max_stages=30 stages"),
        ([f"data={tmp_path / 'three.csv'}"], "has 3 state column(s) ['x1', 'x2', 'x3']; "
                                              "model=neural_sde needs 2"),
    ]
    for args, message in cases:
        r = cli("fit", *args, "hydra.run.dir=refused")
        assert r.returncode == 2, (args, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("neuralpde: error:") and message in lines[0], \
            (args, r.stderr)
        assert not (tmp_path / "refused").exists()


def test_data_files_that_do_not_fit(tmp_path: Path) -> None:
    """A time grid that is not increasing is refused by the reader with the line; paths on
    different grids cannot be averaged (method=mean)."""
    from neuralpde_cli.data import read_observations
    bad = tmp_path / "bad.csv"
    bad.write_text("time,u1,u2\n0,2,0\n0.5,1,1\n0.25,1,1\n")
    with pytest.raises(UserError, match=r"bad.csv line 4, column time: 0.25 is not after 0.5"):
        read_observations(bad)
    ragged = Observations(time=np.array([0.0, 0.5, 0.0, 0.4]), state=np.ones((4, 2)),
                          path=np.array([0, 0, 1, 1]))
    exp = SDEExperiment(NeuralSDEConfig(), F64, CPU, 0)
    with pytest.raises(UserError, match="model.method=mean needs every path observed at the same times"):
        exp.check_data(ragged)
    SDEExperiment(NeuralSDEConfig(method="likelihood"), F64, CPU, 0).check_data(ragged)
