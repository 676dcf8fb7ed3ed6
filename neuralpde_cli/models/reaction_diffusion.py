r"""The three-species reaction–diffusion system of the SciML GPU showcase, and its neural version.

On an N × N node grid (dx = 1, zero-flux sides):

    A_t = D∇²A + α₁(x) − β₁A − r₁AB + r₂C
    B_t = α₂ − β₂B − r₁AB + r₂C
    C_t = α₃ − β₃C + r₁AB − r₂C

with α₁(x) = 1 for x ≥ 4N/5 (x = 0, 1, …, N − 1 the node's first index) and 0 otherwise, from
the zero state. The neural version replaces the local term −r₁AB, in all three equations, by a
small network of (A, B, C) applied at every node. ∇² is the project's conservative 5-point
stencil (:class:`~neuralpde_cli.equations.diffusion.GridSystem`, all four sides Neumann,
divided by the control volumes): at a boundary node it equals the reflected stencil of the
showcase, so its spectral radius is exactly 8/dx² and D∇² contributes 8D/dx² to ρ.

The state is one tensor (3, N, N): A, B, C, first index x.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from neuralpde_cli.data import Observations
from neuralpde_cli.equations.diffusion import GridSystem, Stencil
from neuralpde_cli.errors import UserError
from neuralpde_cli.solvers.stabilized import (ADAPTIVE, RK4_BOUNDARY, Integrator, IntegratorConfig,
                                              Solution, power_iteration)
from neuralpde_cli.training.trainer import Phase

SPECIES = ("A", "B", "C")


@dataclass
class NeuralRDConfig:
    """``model=neural_rd``: data from the true system, the network trained end to end through
    the integrator."""

    name: str = "neural_rd"
    #: nodes per side (dx = 1)
    n: int = 32
    #: the data are the state at ``snapshots`` equally spaced times in (0, t_final]
    t_final: float = 10.0
    snapshots: int = 10
    diffusivity: float = 100.0
    #: α₁ where x ≥ 4N/5, and α₂ = α₃ = β₁ = β₂ = β₃ = r₁ = r₂ (all 1 in the showcase)
    alpha1: float = 1.0
    rates: float = 1.0
    #: the reaction network: 3 → hidden → hidden → 1, tanh
    hidden: int = 16
    integrator: IntegratorConfig = field(default_factory=lambda: IntegratorConfig(step=0.25))
    #: the data: classical RK4 with this step (a fine reference, independent of the integrator)
    data_step: float = 1e-3
    #: Adam: steps, learning rate (cosine schedule down to lr·final_lr_factor)
    steps: int = 60
    lr: float = 1e-2
    final_lr_factor: float = 0.01
    #: then L-BFGS (strong Wolfe): outer steps of 20 iterations each (the loss is deterministic)
    lbfgs_steps: int = 5


class ReactionNet(torch.nn.Module):
    """r(A, B, C) at every node: (3, …) → (…); a tanh MLP on the three values."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(3, hidden), torch.nn.Tanh(),
                                       torch.nn.Linear(hidden, hidden), torch.nn.Tanh(),
                                       torch.nn.Linear(hidden, 1))

    def forward(self, u: Tensor) -> Tensor:
        return self.net(u.movedim(0, -1)).squeeze(-1)


def true_reaction(u: Tensor, rate: float = 1.0) -> Tensor:
    """The term the network replaces: −r₁AB."""
    return -rate * u[0] * u[1]


def neumann_laplacian(n: int, dtype: torch.dtype, device: torch.device) -> tuple[Stencil, Tensor]:
    """The project's 5-point stencil on an n × n grid with dx = 1 and every side zero-flux, and
    the control volumes it is divided by: ∇²T = −stencil.apply(T) / volumes."""
    coords = torch.arange(n, dtype=dtype, device=device)
    system = GridSystem(kappa=torch.ones(n, n, dtype=dtype, device=device),
                        source=torch.zeros(n, n, dtype=dtype, device=device), x=coords, y=coords,
                        h=(1.0, 1.0), dirichlet_mask=torch.zeros(n, n, dtype=torch.bool, device=device),
                        dirichlet_values=torch.zeros(n, n, dtype=dtype, device=device),
                        neumann=(True, True, True, True))
    return system.stencil(), system.control_volumes()


class ReactionDiffusion(torch.nn.Module):
    """F(u) of the system; ``reaction`` None is the true −r₁AB, else the network in its place."""

    def __init__(self, cfg: NeuralRDConfig, dtype: torch.dtype, device: torch.device,
                 reaction: torch.nn.Module | None = None) -> None:
        super().__init__()
        if cfg.n < 3:
            raise UserError(f"model.n={cfg.n} must be ≥ 3 nodes per side")
        if not cfg.diffusivity > 0:
            raise UserError(f"model.diffusivity={cfg.diffusivity} must be > 0")
        self.n, self.d, self.rate = cfg.n, float(cfg.diffusivity), float(cfg.rates)
        self.reaction = reaction
        stencil, volumes = neumann_laplacian(cfg.n, dtype, device)
        self.register_buffer("coef", stencil.coef / volumes)
        self.offsets = stencil.offsets
        x = torch.arange(cfg.n, dtype=dtype, device=device)
        source = torch.where(x >= 4.0 * cfg.n / 5.0, cfg.alpha1, 0.0).to(dtype)
        self.register_buffer("alpha1", source[:, None].expand(cfg.n, cfg.n).clone())

    def laplacian(self, a: Tensor) -> Tensor:
        return -Stencil(self.offsets, self.coef).apply(a)

    def local(self, u: Tensor) -> Tensor:
        """The replaced term at every node: the network's value, or −r₁AB."""
        return true_reaction(u, self.rate) if self.reaction is None else self.reaction(u)

    def forward(self, u: Tensor) -> Tensor:
        a, b, c = u[0], u[1], u[2]
        k = self.rate
        r = self.local(u)
        exchange = r + k * c
        da = self.d * self.laplacian(a) + self.alpha1 - k * a + exchange
        db = k - k * b + exchange
        dc = k - k * c - exchange
        return torch.stack([da, db, dc])

    def initial_state(self) -> Tensor:
        return torch.zeros(3, self.n, self.n, dtype=self.coef.dtype, device=self.coef.device)

    def spectral_radius_bound(self, u: Tensor) -> float:
        """Gershgorin: D·max_p Σ_k |L_pk| (= 8D/dx² for this stencil) plus the largest row sum
        of |∂(reaction part)/∂(A, B, C)| over the nodes at state u (autograd through the
        network), the linear rates included."""
        diffusion = self.d * float(2.0 * self.coef[0].abs().max())
        x = u.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            r = self.local(x)
            (grad,) = torch.autograd.grad(r.sum(), x, allow_unused=True)
        g = torch.zeros_like(x) if grad is None else grad.abs()  # |∂r/∂(A, B, C)| per node
        # every row of the reaction Jacobian: ±∂r/∂(A, B, C), its own −β and ±r₂ on C
        return diffusion + float((g.sum(0) + 2.0 * abs(self.rate)).max())


def check_config(cfg: NeuralRDConfig) -> None:
    """Ranges of the model keys and the integrator's; one UserError naming the first bad one."""
    for key, low in (("n", 3), ("snapshots", 1), ("hidden", 1), ("steps", 1), ("lbfgs_steps", 0)):
        if int(getattr(cfg, key)) < low:
            raise UserError(f"model.{key}={getattr(cfg, key)} must be an integer ≥ {low}")
    for key in ("t_final", "diffusivity", "data_step", "lr"):
        if not float(getattr(cfg, key)) > 0:
            raise UserError(f"model.{key}={getattr(cfg, key)} must be > 0")
    if not 0 < cfg.final_lr_factor <= 1:
        raise UserError(f"model.final_lr_factor={cfg.final_lr_factor} must be in (0, 1]")
    cfg.integrator.validate()


def species_names(n: int) -> list[str]:
    """State columns of a data file: A[i;j], B[i;j], C[i;j] for every node (i along x)."""
    return [f"{s}[{i};{j}]" for s in SPECIES for i in range(n) for j in range(n)]


class RDObjective:
    """Relative mean square between the integrated snapshots and the data (the first snapshot
    is the start); the stage count is re-chosen each time from ρ at the data's states."""

    term_names = ["data"]

    def __init__(self, system: ReactionDiffusion, integrator: Integrator, times: Tensor,
                 data: Tensor) -> None:
        self.system, self.integrator, self.times, self.data = system, integrator, times, data
        self.scale = float((data[1:] ** 2).mean())
        self.last: Solution | None = None

    def rho(self) -> float:
        if self.integrator.cfg.spectral_radius == "power":
            return power_iteration(self.system, self.data[-1])
        return max(self.system.spectral_radius_bound(u) for u in self.data)

    def solve(self, differentiable: bool = True) -> Solution:
        rho = self.rho()
        self.integrator.plan(rho)  # refuses a stage count over the cap by name
        with torch.set_grad_enabled(differentiable):
            self.last = self.integrator.integrate(self.system, self.data[0], self.times, rho,
                                                  differentiable=differentiable)
        return self.last

    def loss_terms(self, phase: str) -> dict[str, Tensor]:
        states = self.solve().states
        return {"data": ((states[1:] - self.data[1:]) ** 2).mean() / self.scale}

    def freeze(self) -> None:
        """Deterministic: nothing to freeze."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Stateless."""


class RDExperiment:
    """Truth, data, the network in place of −r₁AB, and what a run reports (tasks/fit.py)."""

    def __init__(self, cfg: NeuralRDConfig, dtype: torch.dtype, device: torch.device,
                 seed: int) -> None:
        check_config(cfg)
        self.cfg, self.dtype, self.device, self.seed = cfg, dtype, device, seed
        self.truth = ReactionDiffusion(cfg, dtype, device)
        torch.manual_seed(seed)
        self.model = ReactionNet(cfg.hidden).to(dtype=dtype, device=device)
        self.system = ReactionDiffusion(cfg, dtype, device, reaction=self.model)
        self.integrator = Integrator(cfg.integrator)
        u0 = self.truth.initial_state()
        # checked before anything is written: the stage count this step needs, against the cap
        self.rho0 = self.integrator.spectral_radius(self.system, u0, self.system.spectral_radius_bound)
        self.stages0 = self.integrator.plan(self.rho0)
        self.error_key = "data_loss"

    def phases(self) -> list[Phase]:
        c = self.cfg
        plan = [Phase("adam", "adam", c.steps, c.lr, "cosine", c.final_lr_factor)]
        if c.lbfgs_steps > 0:
            plan.append(Phase("lbfgs", "lbfgs", c.lbfgs_steps, 1.0, lbfgs_iters=20, history=50))
        return plan

    @property
    def dim(self) -> int:
        return 3 * self.cfg.n ** 2

    def check_data(self, obs: Observations) -> None:
        n = self.cfg.n
        if obs.dim != self.dim:
            raise UserError(f"data file {obs.source} has {obs.dim} state column(s); model=neural_rd "
                            f"with model.n={n} needs 3·{n}² = {self.dim} (A, B, C at every node)")
        if obs.n_paths != 1:
            raise UserError(f"data file {obs.source} has {obs.n_paths} paths; model=neural_rd "
                            "reads one sequence of snapshots")
        if obs.time.shape[0] < 2:
            raise UserError(f"data file {obs.source} has one snapshot; the fit needs a start and "
                            "at least one later snapshot")

    def generate(self) -> Observations:
        """The true system by RK4 with step ``data_step`` at snapshots+1 times from t = 0."""
        c = self.cfg
        times = torch.linspace(0.0, float(c.t_final), int(c.snapshots) + 1, dtype=self.dtype,
                               device=self.device)
        reference = Integrator(IntegratorConfig(method="rk4", step=float(c.data_step)),
                               prefix="model")
        rho = self.truth.spectral_radius_bound(self.truth.initial_state())
        try:
            reference.plan(rho)
        except UserError:
            raise UserError(f"model.data_step={c.data_step:g} is too long for the RK4 reference: "
                            f"h·ρ must be ≤ {RK4_BOUNDARY / 1.1:.3g} (ρ = {rho:.4g}); use "
                            f"model.data_step ≤ {RK4_BOUNDARY / (1.1 * rho):.3g}") from None
        with torch.no_grad():
            sol = reference.integrate(self.truth, self.truth.initial_state(), times, rho)
        return Observations(time=times.cpu().numpy(),
                            state=sol.states.reshape(times.shape[0], -1).cpu().numpy(),
                            path=np.zeros(times.shape[0], dtype=np.int64),
                            state_names=species_names(c.n))

    def data_scheme(self) -> str:
        return f"classical RK4 with step {self.cfg.data_step:g} (the fine reference)"

    def setup(self, obs: Observations) -> None:
        n = self.cfg.n
        as_t = lambda a: torch.as_tensor(np.asarray(a, float), dtype=self.dtype, device=self.device)  # noqa: E731
        self.times = as_t(obs.time)
        self.data = as_t(obs.state).reshape(-1, 3, n, n)
        self.objective = RDObjective(self.system, self.integrator, self.times, self.data)

    def reaction_error(self, with_start: bool = False) -> float:
        """The learned term against −r₁AB, relative L2 over every node of the fitted snapshots
        (the start, an input the loss never compares, only ``with_start``)."""
        with torch.no_grad():
            u = (self.data if with_start else self.data[1:]).movedim(1, 0)
            return float(torch.linalg.vector_norm(self.system.local(u) - self.truth.local(u))
                         / torch.linalg.vector_norm(self.truth.local(u)))

    def evaluate(self) -> dict[str, float]:
        with torch.no_grad():
            loss = self.objective.loss_terms("eval")["data"]
        return {"data_loss": float(loss), "reaction_error": self.reaction_error()}

    def results(self) -> tuple[dict[str, float], dict[str, np.ndarray]]:
        with torch.no_grad():
            sol = self.objective.solve(differentiable=False)
            pred, data = sol.states, self.data
            u = data.movedim(1, 0).reshape(3, -1)
            metrics = {
                "reaction_error": self.reaction_error(),
                "reaction_error_with_start": self.reaction_error(with_start=True),
                "data_rel_error": float(torch.linalg.vector_norm(pred[1:] - data[1:])
                                        / torch.linalg.vector_norm(data[1:])),
                "y_nonuniformity": float(pred.std(-1).max()),
                "rhs_evals_per_solve": float(sol.evals), "stages": float(sol.stages),
                "spectral_radius": float(sol.rho)}
            pick = torch.linspace(0, u.shape[1] - 1, min(u.shape[1], 4000)).long()
            sample = u[:, pick]
            arrays = {"times": self.times.cpu().numpy(), "data": data.cpu().numpy(),
                      "fitted": pred.cpu().numpy(), "visited": sample.T.cpu().numpy(),
                      "true_term": self.truth.local(sample).cpu().numpy(),
                      "fitted_term": self.system.local(sample).cpu().numpy()}
            a = torch.linspace(float(u[0].min()), float(u[0].max()), 41, dtype=self.dtype)
            b = torch.linspace(float(u[1].min()), float(u[1].max()), 41, dtype=self.dtype)
            grid = torch.stack([*torch.meshgrid(a, b, indexing="ij"),
                                torch.full((41, 41), float(u[2].mean()), dtype=self.dtype)]).to(self.device)
            arrays.update({"grid_a": a.numpy(), "grid_b": b.numpy(), "grid_c": np.array(float(u[2].mean())),
                           "grid_true": self.truth.local(grid).cpu().numpy(),
                           "grid_fitted": self.system.local(grid).cpu().numpy()})
        return metrics, arrays

    def describe(self) -> dict[str, Any]:
        i = self.cfg.integrator
        return {"integrator": i.method, "step": i.step if i.method not in ADAPTIVE else None,
                "spectral_radius_source": i.spectral_radius, "spectral_radius_at_start": self.rho0,
                "stages_at_start": self.stages0, "max_stages": i.max_stages,
                "tolerances": [i.rtol, i.atol] if i.method in ADAPTIVE else None}
