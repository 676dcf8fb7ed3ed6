"""Case: learned dynamics (issue 14) — the stiff integrators on the reaction–diffusion system,
training the neural reaction term with each, and the spiral neural SDE / jump diffusion fits.

* **RD forward, N = 32, t ∈ [0, 10]**: RKL2 and RKC2 (neuralpde_cli/solvers/stabilized.py)
  against torchdiffeq's adaptive dopri5 and bosh3 at several tolerances: right-hand-side
  evaluations, relative error of the state at t = 10 (and the worst over the ten snapshots)
  against classical RK4 with h = 1e-3, and wall time (median of repeats).
* **RD forward, N = 100, t ∈ [0, 100]** (the showcase size): evaluations and wall time; errors
  against RKL2 with h = 0.1.
* **RD training, N = 32**: ``neuralpde fit model=neural_rd`` (a fresh process each): the
  default (RKL2, Adam then L-BFGS) for the learned term's error against −AB; then Adam alone
  with each integrator side by side. The adaptive baselines train for a few steps only (their
  per-step cost is the figure; the total is that times the step count, marked as projected).
* **Spiral**: ``neuralpde fit`` way (i) (mean of paths, diffusion fixed), way (i) with a learned
  diffusion, way (ii) (moment-equation likelihood) and Euler's likelihood as its baseline; the
  jump diffusion. Mean-path losses are means over 20 repetitions of 100 model paths against
  the 100-path data mean; the floor is the true model's.
* **Moment density against the Fokker–Planck density** at the true spiral: the project's
  time-marched Gaussian-mixture density (likelihood/pde.py) on a sample of the data's
  transitions, and the mean log-density difference.

``NEURAL_DYNAMICS_SECTIONS=forward,training,simulators,spiral,density`` (the default: all) picks
the parts to run.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import (Column, Row, Spec, attempt, row, run_neuralpde, selected_sections,
                               tier)
from neuralpde_cli.models.reaction_diffusion import NeuralRDConfig, ReactionDiffusion
from neuralpde_cli.solvers.stabilized import Integrator, IntegratorConfig

F64 = torch.float64
CPU = torch.device("cpu")
SETTINGS: dict[str, dict[str, Any]] = {
    "full": dict(repeats=3, big=True, tolerances=(1e-3, 1e-4, 1e-5), rd_steps=60,
                 adaptive_steps=3, sde_steps=400, lik_steps=700, lik_lbfgs=10, jump_steps=400, fp=40,
                 timeout_s=1800),
    "quick": dict(repeats=1, big=False, tolerances=(1e-3,), rd_steps=20, adaptive_steps=1,
                  sde_steps=150, lik_steps=300, lik_lbfgs=2, jump_steps=150, fp=10, timeout_s=900),
    "smoke": dict(repeats=1, big=False, tolerances=(1e-3,), rd_steps=2, adaptive_steps=1,
                  sde_steps=2, lik_steps=2, lik_lbfgs=1, jump_steps=2, fp=2, timeout_s=300),
}
SPEC = Spec(
    "neural_dynamics",
    "Learned dynamics: stiff integrators on the reaction–diffusion system (RHS evaluations, error "
    "against fine RK4, time) and the fits of `neuralpde fit` (errors against the truth, time)",
    (Column("rhs_evals", "RHS evals", "int"), Column("error", "error", "error"),
     Column("time_s", "time"), Column("metric", "fit figures", "text")),
    ratio_key="rhs_evals", plot="settings", plot_key="time_s",
)


#: the parts of the case, in order; ``NEURAL_DYNAMICS_SECTIONS=training`` runs a subset (the
#: JSON then holds only those rows)
SECTIONS = ("forward", "training", "simulators", "spiral", "density")


def run(quick: bool, device: str) -> list[Row]:
    s = SETTINGS[tier(quick)]
    smoke = tier(quick) == "smoke"
    sections = selected_sections("NEURAL_DYNAMICS_SECTIONS", SECTIONS)
    parts = [("forward", "RD forward", "RD N=32", lambda: _forward(32, 10.0, s, device, smoke)),
             ("forward", "RD forward", "RD N=100, t≤100",
              lambda: _forward(100, 100.0, s, device, False) if s["big"] else []),
             ("training", "RD training", "RD training N=32", lambda: _training(s, device, smoke)),
             ("simulators", "simulators", "spiral simulators", lambda: _simulators(s, smoke)),
             ("spiral", "spiral", "spiral SDE", lambda: _spiral(s, device, smoke)),
             ("density", "moment density", "density check", lambda: _density_check(s, smoke))]
    rows: list[Row] = []
    for section, method, setting, fn in parts:
        if section in sections:
            rows += attempt(method, setting, fn)
    return rows


# --- reaction–diffusion forward --------------------------------------------------------------
def _forward(n: int, t_final: float, s: dict, device: str, smoke: bool) -> list[Row]:
    dev = torch.device(device)
    n = 8 if smoke else n
    setting = f"RD N={n}" + (f", t≤{t_final:g}" if t_final != 10.0 else "")
    system = ReactionDiffusion(NeuralRDConfig(n=n), F64, dev)
    u0 = system.initial_state()
    times = torch.linspace(0.0, t_final, 11, dtype=F64, device=dev)
    rho = system.spectral_radius_bound(u0)
    if n <= 32:
        ref_cfg, ref_name = IntegratorConfig(method="rk4", step=1e-3), "RK4 h=1e-3 (reference)"
        methods = [("neuralpde RKL2 h=0.5", IntegratorConfig(method="rkl2", step=0.5)),
                   ("neuralpde RKL2 h=0.25", IntegratorConfig(method="rkl2", step=0.25)),
                   ("neuralpde RKC2 h=0.25", IntegratorConfig(method="rkc2", step=0.25)),
                   ("neuralpde RKC2 h=0.1", IntegratorConfig(method="rkc2", step=0.1))]
    else:
        ref_cfg, ref_name = IntegratorConfig(method="rkl2", step=0.1), "RKL2 h=0.1 (reference)"
        methods = [("neuralpde RKL2 h=1", IntegratorConfig(method="rkl2", step=1.0)),
                   ("neuralpde RKC2 h=1", IntegratorConfig(method="rkc2", step=1.0)),
                   ("neuralpde RKL2 h=2", IntegratorConfig(method="rkl2", step=2.0))]
    for tol in s["tolerances"] if n <= 32 else s["tolerances"][:1]:
        for m in ("bosh3", "dopri5"):
            methods.append((f"torchdiffeq {m} tol={tol:g}",
                            IntegratorConfig(method=m, rtol=tol, atol=tol)))
    start = time.perf_counter()
    with torch.no_grad():
        ref = Integrator(ref_cfg).integrate(system, u0, times, rho)
    rows = [row(ref_name, setting, rhs_evals=ref.evals, time_s=time.perf_counter() - start,
                note=f"ρ = {rho:.0f} (8D/dx² + reaction)")]
    norms = ref.states.flatten(1).norm(dim=1)
    for name, cfg in methods:
        def one(cfg: IntegratorConfig = cfg) -> Any:
            with torch.no_grad():
                return Integrator(cfg).integrate(system, u0, times, rho)
        repeats = s["repeats"] if cfg.method not in ("bosh3", "dopri5") or n <= 32 else 1
        times_s, sol = [], None
        for _ in range(max(1, repeats)):
            t0 = time.perf_counter()
            sol = one()
            times_s.append(time.perf_counter() - t0)
        err = (sol.states - ref.states).flatten(1).norm(dim=1)[1:] / norms[1:]
        rows.append(row(name, setting, rhs_evals=sol.evals, error=float(err[-1]),
                        worst_error=float(err.max()), time_s=statistics.median(times_s),
                        repeats=len(times_s), stages=sol.stages,
                        note=(f"s = {sol.stages}, " if sol.stages else "")
                        + f"worst over snapshots {float(err.max()):.1e}, {len(times_s)} run(s)"))
    return rows


# --- `neuralpde fit` in a fresh process --------------------------------------------------------
def neuralpde_fit(overrides: list[str], device: str, timeout_s: float) -> dict[str, Any]:
    """``neuralpde fit`` as a user runs it; its summary.json. Two threads, as stated."""
    with tempfile.TemporaryDirectory(prefix="neuralpde-bench-") as tmp:
        summary, _ = run_neuralpde("fit", ["trainer.progress=false", *overrides], Path(tmp) / "run",
                                   device, timeout_s, env={**os.environ, "OMP_NUM_THREADS": "2"})
    return summary


def _fmt_metrics(m: dict[str, float], keys: tuple[str, ...]) -> str:
    return ", ".join(f"{k} {m[k]:.3g}" for k in keys if k in m)


def _training(s: dict, device: str, smoke: bool) -> list[Row]:
    """The default fit (Adam, then L-BFGS) for the learned term's error; then the same Adam
    steps with each integrator side by side (the adaptive ones for a few steps: their time per
    step is the figure, the total is projected to the same step count)."""
    setting = "RD training N=32"
    size = ["model.n=8", "model.t_final=1", "model.snapshots=2"] if smoke else []
    adam = ["model.lbfgs_steps=0", f"model.steps={s['rd_steps']}"]
    few = ["model.lbfgs_steps=0", f"model.steps={s['adaptive_steps']}"]
    runs = [("neuralpde fit default: RKL2 h=0.25, Adam + L-BFGS",
             [] if not smoke else ["model.steps=2", "model.lbfgs_steps=1"]),
            ("neuralpde fit RKL2 h=0.25, Adam only", adam),
            ("neuralpde fit RKL2 h=0.5, Adam only", [*adam, "model.integrator.step=0.5"]),
            ("neuralpde fit RKC2 h=0.25, Adam only", [*adam, "model.integrator.method=rkc2"]),
            ("neuralpde fit bosh3 tol=1e-3 (backprop), Adam", [*few, "model.integrator.method=bosh3"]),
            ("neuralpde fit dopri5 tol=1e-3 (backprop), Adam", [*few, "model.integrator.method=dopri5"])]
    rows = []
    for name, extra in runs:
        def one(extra: list[str] = extra, name: str = name) -> Row:
            summary = neuralpde_fit(["model=neural_rd", *size, *extra], device, s["timeout_s"])
            m = summary["metrics"]
            per_step = summary["train_time_s"] / max(1, summary["steps"])
            adaptive = any(k in name for k in ("bosh3", "dopri5"))
            return row(name, setting, rhs_evals=int(m["rhs_evals_per_solve"]),
                       error=m["reaction_error"],
                       time_s=per_step * s["rd_steps"] if adaptive else summary["train_time_s"],
                       per_step_s=per_step, steps=summary["steps"], metrics=m,
                       metric=_fmt_metrics(m, ("reaction_error", "data_rel_error"))
                       + f", {per_step:.2f} s/step",
                       note=(f"{summary['steps']} steps in {summary['train_time_s']:.1f} s"
                             + (f"; time for {s['rd_steps']} steps projected" if adaptive else "")))
        rows += attempt(name, setting, one)
    return rows


def _spiral(s: dict, device: str, smoke: bool) -> list[Row]:
    setting = "spiral SDE"
    tiny = ["model.paths=8", "model.model_paths=8", "model.observations=6",
            "model.warmup_steps=2"] if smoke else []
    runs = [
        ("neuralpde fit way (i): mean of paths, diffusion fixed", [], s["sde_steps"]),
        ("neuralpde fit way (i) with a learned diffusion", ["model.noise=diagonal"], s["sde_steps"]),
        ("neuralpde fit way (ii): moment likelihood", [
            "model.method=likelihood", "model.noise=diagonal", "model.lr=0.01",
            f"model.lbfgs_steps={s['lik_lbfgs']}"], s["lik_steps"]),
        ("neuralpde fit way (ii) with Euler's density", [
            "model.method=likelihood", "model.noise=diagonal", "model.density=euler",
            "model.lr=0.01", f"model.lbfgs_steps={s['lik_lbfgs']}"], s["lik_steps"]),
        ("neuralpde fit jump diffusion", ["model=jump_diffusion"], s["jump_steps"]),
    ]
    keys = ("mean_loss", "mean_loss_std", "floor_mean_loss", "noise_free_loss", "drift_error",
            "diffusion_error", "jump_map_error")
    rows = []
    for name, extra, steps in runs:
        def one(extra: list[str] = extra, steps: int = steps, name: str = name) -> Row:
            summary = neuralpde_fit([*extra, f"model.steps={steps}", *tiny], device, s["timeout_s"])
            m = summary["metrics"]
            return row(name, setting, time_s=summary["train_time_s"], error=m.get("drift_error"),
                       metrics=m, steps=summary["steps"], metric=_fmt_metrics(m, keys),
                       note=f"{summary['steps']} steps, OMP_NUM_THREADS=2")
        rows += attempt(name, setting, one)
    return rows


# --- path simulators for training ------------------------------------------------------------
def _simulators(s: dict, smoke: bool) -> list[Row]:
    """Why training simulates with the built-in scheme, not torchsde: the mean at t = 1 from
    10,000 true paths at 10 steps per observation interval (reference ≈ (0.575, −1.005) from
    Euler–Maruyama at 1e-4), and the time of one training step (100 paths through the drift
    network, forward and backward) — median of repeats."""
    import torchsde

    from neuralpde_cli.models.spiral import (CubicDrift, DiagonalNoiseSDE, SpiralSDE,
                                             mean_path_loss, simulate)

    a = torch.tensor([[-0.1, 2.0], [-2.0, -0.1]], dtype=F64)
    truth = SpiralSDE(a, 0.2)
    times = torch.linspace(0.0, 1.0, 30, dtype=F64)
    x0 = torch.tensor([2.0, 0.0], dtype=F64)
    dt = 1.0 / 290
    many = 200 if smoke else 10000

    class Net(DiagonalNoiseSDE):
        sde_type, noise_type = "ito", "diagonal"

        def __init__(self) -> None:
            super().__init__(2)
            self.net = CubicDrift(50).to(F64)

        def drift(self, t: Any, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def noise(self, t: Any, x: torch.Tensor) -> torch.Tensor:
            return 0.2 * x

        def f(self, t: Any, y: torch.Tensor) -> torch.Tensor:  # torchsde's names
            return self.drift(t, y)

        def g(self, t: Any, y: torch.Tensor) -> torch.Tensor:
            return self.noise(t, y)

    class Wrapped(torch.nn.Module):
        sde_type, noise_type = "ito", "diagonal"

        def f(self, t: Any, y: torch.Tensor) -> torch.Tensor:
            return truth.drift(t, y)

        def g(self, t: Any, y: torch.Tensor) -> torch.Tensor:
            return truth.noise(t, y)

    def by_torchsde(sde: Any, n: int, method: str, seed: int) -> torch.Tensor:
        bm = torchsde.BrownianInterval(0.0, 1.0, (n, 2), dtype=F64, entropy=seed,
                                       levy_area_approximation="space-time" if method == "srk" else "none")
        return torchsde.sdeint(sde, x0.expand(n, 2).contiguous(), times, bm=bm, method=method, dt=dt)

    def builtin(sde: Any, n: int, seed: int) -> torch.Tensor:
        return simulate(sde, x0, times, n, 10, torch.Generator().manual_seed(seed))

    model, target = Net(), torch.zeros(30, 2, dtype=F64)
    rows = []
    for name, draw in (("neuralpde simulator (Heun drift, Itô noise)", lambda sde, n, k: builtin(sde, n, k)),
                       ("torchsde 0.2.6 euler", lambda sde, n, k: by_torchsde(sde, n, "euler", k)),
                       ("torchsde 0.2.6 srk", lambda sde, n, k: by_torchsde(sde, n, "srk", k))):
        with torch.no_grad():
            mean = draw(truth if name.startswith("neuralpde") else Wrapped(), many, 0)[-1].mean(0)
        spent = []
        for k in range(1 if smoke else s["repeats"] + 2):
            start = time.perf_counter()
            loss = mean_path_loss(draw(model, 100, k + 1), target)
            loss.backward()
            spent.append(time.perf_counter() - start)
        rows.append(row(name, "spiral simulators", time_s=statistics.median(spent),
                        error=float((mean - torch.tensor([0.575, -1.005], dtype=F64)).norm()),
                        metric=f"mean u(1) = ({float(mean[0]):.3f}, {float(mean[1]):.3f}) from "
                               f"{many} paths, h = 1/290",
                        note="time: one training step (100 paths, forward + backward); error: "
                             "|mean u(1) − (0.575, −1.005)|"))
    return rows


# --- the moment density against the Fokker–Planck density ----------------------------------------
def _density_check(s: dict, smoke: bool) -> list[Row]:
    """Both densities at the true spiral on a sample of transitions from its paths: the mean
    and largest |Δ log p|, and the two log-likelihood sums."""
    import numpy as np

    from neuralpde_cli.ansatz.gmm import GMMConfig
    from neuralpde_cli.likelihood.moments import moment_log_density
    from neuralpde_cli.likelihood.pde import PDELikelihoodConfig, TransitionDensity, TransitionSet
    from neuralpde_cli.models.neural_sde import NeuralSDEConfig, SDEExperiment
    from neuralpde_cli.solvers.time_march import TimeMarchConfig

    exp = SDEExperiment(NeuralSDEConfig(paths=max(2, int(s["fp"]) // 4 + 1)), F64, CPU, 0)
    obs = exp.generate()
    tr = obs.transitions()
    # not from u₀ = (2, 0): the truth's noise 0.2·u₂ vanishes there, and the Fokker–Planck
    # march starts from the Euler law, which needs a non-singular σσᵀ
    later = np.flatnonzero(tr.t0 > 0)
    pick = later[np.linspace(0, later.size - 1, int(s["fp"])).astype(int)]
    ts = TransitionSet.from_arrays(tr.x0[pick], tr.x1[pick], tr.t0[pick], tr.dt[pick], F64, CPU)
    start = time.perf_counter()
    with torch.no_grad():
        ours = moment_log_density(exp.truth, ts.x0, ts.x1, ts.t0, ts.dt, 4).detach()
    t_ours = time.perf_counter() - start
    start = time.perf_counter()
    fp = TransitionDensity(lambda values: exp.truth, ts, GMMConfig(components=3, split=0.3),
                           TimeMarchConfig(rtol=1e-5), PDELikelihoodConfig(grid=0))
    with torch.no_grad():
        ref = fp.log_density({}, differentiable=False)
    t_fp = time.perf_counter() - start
    diff = (ours - ref).abs()
    return [row("moment density vs Fokker–Planck (GMM K=3)", "density check",
                error=float(diff.mean()), time_s=t_ours,
                metric=f"mean |Δlog p| {float(diff.mean()):.3g}, max {float(diff.max()):.3g}, "
                       f"Σlog p {float(ours.sum()):.2f} vs {float(ref.sum()):.2f}",
                note=f"{len(pick)} transitions at the truth; the FP march took {t_fp:.1f} s")]
