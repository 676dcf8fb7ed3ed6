r"""Transition densities p(x₁, t₀ + Δ | x₀, t₀; θ) from the Fokker–Planck equation, for
maximum likelihood.

One batched time-march of a Gaussian mixture (:class:`~neuralpde_cli.solvers.time_march.TimeMarcher`)
per θ covers every transition of a data set:

* **Amortized over start points.** In 1-D the march runs from ``grid`` start points spread over
  the observed x₀ (one node beyond each end) and each transition reads its mixture state from a
  natural cubic spline in x₀. The mixture's parameters are smooth in x₀ (exactly linear for
  OU, where the spline is exact), so the cost no longer grows with the number of transitions.
  In d > 1, or with ``grid=0``, every distinct start point is marched itself.
* **No stiff point-mass start.** A point mass has no density; a narrow Gaussian N(x₀, w²) adds
  w² to the transition's variance. The march instead starts at a short time ε after x₀ from
  the Euler–Maruyama law N(x₀ + μ(x₀)ε, σσᵀ(x₀)ε), whose error in mean and variance is O(ε²)
  (relative O(ε/Δ)), and reads the transition over Δ at time Δ − ε.
* **Smooth and differentiable in θ.** The march keeps its autograd graph, so the gradient of the
  log-likelihood is one backward pass. Adaptive step control would make the likelihood a
  piecewise function of θ (a step accepted at one θ, rejected at the next), so the step times
  are fixed per fit (:meth:`TransitionDensity.freeze_steps`, chosen adaptively at a θ) and
  replayed: the likelihood is then a smooth function of θ, and the fitter re-adapts the steps
  at the optimum to check that they did not matter.

The coefficients are SDE modules from :mod:`neuralpde_cli.sdes` built by a callable from
parameter tensors, so this module knows nothing of which SDE it is fitting.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from neuralpde_cli.ansatz.gmm import GaussianMixtureAnsatz, GMMConfig, MixtureLayout
from neuralpde_cli.equations.fokker_planck import FokkerPlanck, FokkerPlanckConfig
from neuralpde_cli.errors import UserError
from neuralpde_cli.sdes import SDE, SDEConfig
from neuralpde_cli.solvers.time_march import TimeMarchConfig, TimeMarcher


@dataclass
class TransitionSet:
    """Transitions as tensors: start x0 (n, d), end x1 (n, d), start time t0 (n,), length dt (n,)."""

    x0: Tensor
    x1: Tensor
    t0: Tensor
    dt: Tensor

    @classmethod
    def from_arrays(cls, x0: np.ndarray, x1: np.ndarray, t0: np.ndarray, dt: np.ndarray,
                    dtype: torch.dtype, device: torch.device) -> "TransitionSet":
        as_t = lambda a: torch.as_tensor(np.asarray(a, dtype=float), dtype=dtype, device=device)  # noqa: E731
        x0, x1 = as_t(x0), as_t(x1)
        return cls(x0.reshape(x0.shape[0], -1), x1.reshape(x1.shape[0], -1), as_t(t0), as_t(dt))

    @property
    def n(self) -> int:
        return int(self.x0.shape[0])

    @property
    def dim(self) -> int:
        return int(self.x0.shape[1])


def natural_spline(nodes: Tensor, values: Tensor) -> Tensor:
    """Second derivatives (M, ...) of the natural cubic spline through ``values`` (M, ...) at
    equally spaced ``nodes`` (M,): one small dense solve, differentiable in the values."""
    m = nodes.shape[0]
    h = float(nodes[1] - nodes[0])
    a = torch.zeros(m, m, dtype=values.dtype, device=values.device)
    a[0, 0] = a[-1, -1] = 1.0
    idx = torch.arange(1, m - 1, device=values.device)
    a[idx, idx - 1], a[idx, idx], a[idx, idx + 1] = 1.0, 4.0, 1.0
    flat = values.reshape(m, -1)
    rhs = torch.zeros_like(flat)
    rhs[1:-1] = 6.0 * (flat[2:] - 2.0 * flat[1:-1] + flat[:-2]) / (h * h)
    return torch.linalg.solve(a, rhs).reshape(values.shape)


def spline_eval(nodes: Tensor, values: Tensor, second: Tensor, x: Tensor, which: Tensor) -> Tensor:
    """The spline of column set ``which`` (n,) at x (n,): values/second are (U, M, c) → (n, c)."""
    h = nodes[1] - nodes[0]
    m = nodes.shape[0]
    i = torch.clamp(torch.floor((x.detach() - nodes[0]) / h).long(), 0, m - 2)
    b = ((x - nodes[i]) / h).unsqueeze(-1)
    a = 1.0 - b
    y0, y1 = values[which, i], values[which, i + 1]
    s0, s1 = second[which, i], second[which, i + 1]
    return a * y0 + b * y1 + ((a ** 3 - a) * s0 + (b ** 3 - b) * s1) * (h * h) / 6.0


@dataclass
class PDELikelihoodConfig:
    """How the transition density is computed (the ``calibrate.pde`` keys)."""

    #: start points marched in 1-D (spline in x₀); 0: march every distinct start point
    grid: int = 16
    #: ε = start_fraction · (shortest Δ): the march starts from the Euler law at time ε
    start_fraction: float = 1e-2


class TransitionDensity:
    """log p(x₁ | x₀; θ) for a fixed set of transitions, as a differentiable function of the
    SDE's parameter tensors."""

    def __init__(self, make_sde: Callable[[dict[str, Tensor]], SDE], transitions: TransitionSet,
                 mixture: GMMConfig, march: TimeMarchConfig, cfg: PDELikelihoodConfig) -> None:
        if cfg.grid != 0 and cfg.grid < 4:
            raise UserError(f"calibrate.pde.grid={cfg.grid} must be 0 (every start point) or ≥ 4")
        if not 0 < cfg.start_fraction < 0.5:
            raise UserError(f"calibrate.pde.start_fraction={cfg.start_fraction} must be in (0, 0.5)")
        if not bool((transitions.dt > 0).all()):
            raise UserError("every transition needs Δt > 0 (times must increase within a path)")
        self.make_sde, self.data, self.cfg = make_sde, transitions, cfg
        self.mixture = mixture
        self.march_cfg = march
        self.marcher = TimeMarcher(self.march_cfg)
        tr = transitions
        self.eps = cfg.start_fraction * float(tr.dt.min())
        # the distinct march horizons: Δ − ε for each distinct Δ (regular data: one)
        self.horizons, self.which = torch.unique(tr.dt - self.eps, return_inverse=True)
        self.t_final = float(self.horizons.max())
        self.use_grid = tr.dim == 1 and cfg.grid > 0
        if self.use_grid:
            lo, hi = float(tr.x0.min()), float(tr.x0.max())
            span = max(hi - lo, 1e-3 * max(1.0, abs(hi)))
            h = span / (cfg.grid - 3)
            self.starts = torch.linspace(lo - h, hi + h, cfg.grid, dtype=tr.x0.dtype,
                                         device=tr.x0.device).unsqueeze(-1)
        else:
            self.starts, self.start_of = torch.unique(tr.x0, dim=0, return_inverse=True)
        self.step_times: list[float] | None = None
        eye = np.eye(tr.dim).tolist()  # a placeholder SDE; each evaluation swaps in its own
        eq_cfg = FokkerPlanckConfig(dim=tr.dim, t_final=self.t_final, initial="gaussian",
                                    sde=SDEConfig(kind="brownian", sigma=eye),
                                    initial_mean=[0.0] * tr.dim, initial_std=1.0, eval_times=[])
        self.equation = FokkerPlanck(eq_cfg, tr.x0.dtype, tr.x0.device)
        self.ansatz = GaussianMixtureAnsatz.for_equation(mixture, self.equation)
        self.layout: MixtureLayout = self.ansatz.layout

    def _equation(self, values: dict[str, Tensor]) -> FokkerPlanck:
        sde = self.make_sde(values)
        self.equation.sde = sde
        self.equation.constant_diffusion = sde.constant_diffusion
        return self.equation

    def _start_law(self, sde: SDE) -> tuple[Tensor, Tensor]:
        """Mean and Cholesky factor (B, d), (B, d, d) of the Euler law at time ε after each start."""
        x0, eps = self.starts, self.eps
        t = torch.zeros(x0.shape[0], dtype=x0.dtype, device=x0.device)
        s = sde.diffusion_sqrt(t, x0)
        s = s.expand(x0.shape[0], *s.shape[-2:]) if s.dim() == 2 else s
        cov = 2.0 * eps * (s @ s.transpose(-1, -2))
        if self.data.dim == 1 and bool((cov <= 0).any()):
            raise UserError("the diffusion coefficient vanishes at a start point "
                            f"(x0 = {float(x0[cov.reshape(-1) <= 0][0]):g}); the transition "
                            "density from there is not a density")
        return x0 + eps * sde.drift(t, x0), torch.linalg.cholesky(cov)

    def _march(self, values: dict[str, Tensor], differentiable: bool):
        eq = self._equation(values)
        mean0, chol0 = self._start_law(eq.sde)
        return self.marcher.run(eq, self.ansatz, x0_batch=mean0, initial_chol=chol0,
                                step_times=self.step_times, differentiable=differentiable)

    def freeze_steps(self, values: dict[str, Tensor]) -> int:
        """Choose the step times adaptively at ``values`` and replay them from now on."""
        self.step_times = None
        with torch.no_grad():
            result = self._march({k: v.detach() for k, v in values.items()}, False)
        self.step_times = [h["t"] for h in result.history]
        return len(self.step_times)

    def states(self, values: dict[str, Tensor], differentiable: bool = True) -> Tensor:
        """The mixture state (n, size) of each transition's density at its own Δ."""
        marched = self._march(values, differentiable).ansatz
        n_h, n_s = self.horizons.shape[0], self.starts.shape[0]
        t = self.horizons.repeat_interleave(n_s)
        index = torch.arange(n_s, device=t.device).repeat(n_h)
        state = self._state_at(marched, t, index).reshape(n_h, n_s, -1)
        if self.use_grid:
            nodes = self.starts[:, 0]
            second = torch.stack([natural_spline(nodes, s) for s in state])
            return spline_eval(nodes, state, second, self.data.x0[:, 0], self.which)
        return state[self.which, self.start_of]

    @staticmethod
    def _state_at(marched, t: Tensor, member: Tensor) -> Tensor:
        """State of march member ``member`` (P,) at times t (P,), from the dense output."""
        times = marched.times
        t = t.clamp(0.0, marched.t_final)
        i = (torch.searchsorted(times, t.detach(), right=True) - 1).clamp(0, times.numel() - 2)
        h = (times[i + 1] - times[i]).unsqueeze(-1)
        theta = (t.unsqueeze(-1) - times[i].unsqueeze(-1)) / h
        c = marched.coeffs[member, i]
        powers = torch.arange(c.shape[1], dtype=t.dtype, device=t.device)
        return ((theta ** powers).unsqueeze(-1) * c).sum(1)

    def log_density(self, values: dict[str, Tensor], differentiable: bool = True) -> Tensor:
        """log p(x₁ | x₀) (n,) for every transition."""
        state = self.states(values, differentiable)
        return self.layout.evaluate(state, self.data.x1.unsqueeze(1)).log_p.reshape(-1)

    def cdf(self, state: Tensor, x: Tensor) -> Tensor:
        """F(x | ·) of the first coordinate's marginal, for states (n, size) and x (n,)."""
        logits, means, entries = self.layout.unpack(state)
        chol = self.layout.chol(entries)
        sd = torch.sqrt((chol[..., 0, :] ** 2).sum(-1))
        z = (x.unsqueeze(-1) - means[..., 0]) / sd
        return (torch.softmax(logits, -1) * torch.special.ndtr(z)).sum(-1)

    def predictive_density(self, values: dict[str, Tensor], x0: np.ndarray, dt: float,
                           x: np.ndarray) -> np.ndarray:
        """The density of x₁ over Δ = dt averaged over the starts x0 (m,) (1-D), on a grid x
        (G,): what a histogram of the x₁ of those starts should look like. One extra march."""
        ref = self.data.x0
        starts = torch.as_tensor(np.asarray(x0, float), dtype=ref.dtype, device=ref.device)
        probe = TransitionSet(starts.reshape(-1, 1), starts.reshape(-1, 1),
                              torch.zeros_like(starts), torch.full_like(starts, dt))
        other = TransitionDensity(self.make_sde, probe, self.mixture, self.march_cfg,
                                  replace(self.cfg, grid=0))
        grid = torch.as_tensor(np.asarray(x, float), dtype=ref.dtype, device=ref.device)
        with torch.no_grad():
            state = other.states({k: v.detach() for k, v in values.items()}, False)
            p = torch.exp(self.layout.evaluate(state, grid.reshape(1, -1, 1).expand(
                state.shape[0], -1, 1)).log_p)
        return p.mean(0).cpu().numpy()
