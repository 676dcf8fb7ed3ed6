"""Loss terms for gradient training, one class per kind of problem."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor

from neuralpde_cli.equations.base import DensityEquation
from neuralpde_cli.training.levenberg_marquardt import Residual
from neuralpde_cli.training.samplers import CollocationSampler

log = logging.getLogger(__name__)

#: variance growth over [0, T] above which space-time training is warned about
SPREAD_WARNING = 100.0
#: L-BFGS's frozen collocation set with ``sampler=paths``, in batches: 4 batches overfit the
#: double well's late times (worst L1 0.22 against 0.02 with 16)
PATHS_FROZEN_FACTOR = 16


class DensityObjective:
    """Space-time residual of a density equation, in log space, plus the initial condition.

    The residual at time t is scaled by the envelope's variance ratio v(t)/v(0): ∂ₜℓ shrinks
    like 1/v(t) as the density spreads, and without the scaling late times are ignored.
    With collocation from the SDE's paths (``sampler=paths``, nonlinear drifts), the residual is
    divided by the local relaxation rate instead: tr D/v(t) (diffusion across the law's width,
    v the ensemble's mean variance) plus |∇·μ| (the drift's contraction). An error ε in ∂ₜℓ
    moves ℓ by about ε/rate before it relaxes away, so that is what the weight measures. Where
    a cubic drift is strong (the tails) the residual's terms grow like |μ|²/D; weighted by
    v/D alone those points outweigh the whole bulk (the 1-D double well's L1 at t = 5: 0.17
    against 0.02), and dropping them lets a spurious flux through the tails (0.36).
    With L-BFGS the collocation set is frozen (a line search needs a fixed function).
    """

    def __init__(self, equation: DensityEquation, ansatz: Any, sampler: CollocationSampler,
                 frozen_factor: int = 4) -> None:
        self.equation = equation
        self.ansatz = ansatz
        self.sampler = sampler
        self.frozen_factor = frozen_factor
        self.frozen: tuple[Tensor, Tensor, Tensor] | None = None
        self.term_names = ["pde"] if ansatz.exact_initial_condition else ["ic", "pde"]
        self.rate_weighted = sampler.kind == "paths"
        if self.rate_weighted:  # a frozen set that covers the paths' times and tails
            self.frozen_factor = max(frozen_factor, PATHS_FROZEN_FACTOR)
            ensemble = equation.ensemble()
            self.ensemble_times = ensemble.times
            self.ensemble_var = torch.diagonal(ensemble.moments()[1], dim1=-2, dim2=-1).mean(-1)
            return
        ref = equation.initial_mean
        _, std = equation.envelope(torch.tensor([0.0, equation.t_final], dtype=ref.dtype,
                                                device=ref.device))
        self.var0 = std[0, 0] ** 2
        growth = float((std[1] / std[0]).max() ** 2)
        if growth > SPREAD_WARNING:
            log.warning("the density's variance grows %.0f× over [0, T]: first-order space-time "
                        "training (Adam, L-BFGS) struggles from such a narrow start (the 1/σ² "
                        "terms at t ≈ 0 dominate); for a Gaussian mixture, optimizer=time_march "
                        "solves it directly, optimizer=levenberg_marquardt in space-time", growth)

    def freeze(self) -> None:
        n = self.sampler.cfg.batch_size * self.frozen_factor
        self.frozen = (*self.sampler(n), self._ic_points(n))

    def _ic_points(self, n: int) -> Tensor:
        chol = torch.linalg.cholesky(self.equation.initial_cov)
        z = self.sampler._normal(n, self.equation.dim)
        z[n // 2:] *= self.sampler.cfg.spread  # half inside p₀, half in its tails
        return self.equation.initial_mean + z @ chol.T

    def residual_terms(self, phase: str) -> dict[str, Residual]:
        """Residual rows per term (the loss terms are their mean squares): log p − log p₀ at
        t = 0 (unless built in), and the scaled log-space PDE residual."""
        terms: dict[str, Residual] = {}
        n = self.sampler.cfg.batch_size
        if "ic" in self.term_names:
            x0 = self._ic_points(n) if self.frozen is None else self.frozen[2]
            t0 = torch.zeros(x0.shape[0], dtype=x0.dtype, device=x0.device)
            terms["ic"] = Residual(self.ansatz.log_density(t0, x0)
                                   - self.equation.initial_log_density(x0))
        if phase == "ic":
            return terms
        t, x = self.sampler() if self.frozen is None else self.frozen[:2]
        fields, through, pullback = self.ansatz.log_density_fields_rowwise(
            t, x, self.equation.diffusion_sqrt(t, x), generator=self.sampler.generator)
        scale = self._scale(t, x)
        terms["pde"] = Residual(scale * self.equation.log_residual(t, x, fields), through, pullback)
        return terms

    def _scale(self, t: Tensor, x: Tensor) -> Tensor:
        """The residual's weight per point (see the class docstring)."""
        if not self.rate_weighted:
            _, std = self.equation.envelope(t)
            return std[:, 0] ** 2 / self.var0
        k = torch.clamp(torch.searchsorted(self.ensemble_times, t), 0, self.ensemble_var.shape[0] - 1)
        var = self.ensemble_var[k]
        s = self.equation.diffusion_sqrt(t, x).detach()
        trace_d = (s * s).sum((-1, -2))
        div = self.equation.drift_divergence(t, x).detach().abs()
        return 1.0 / (trace_d / var + div)

    def loss_terms(self, phase: str) -> dict[str, Tensor]:
        return {k: (r.values ** 2).mean() for k, r in self.residual_terms(phase).items()}

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.sampler.generator.get_state(),
                "frozen": list(self.frozen) if self.frozen is not None else []}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.generator.set_state(state["generator"])
        self.frozen = tuple(state["frozen"]) if state["frozen"] else None


class _Stateless:
    """Objectives whose only randomness is a generator (or none) share this state handling."""

    generator: torch.Generator | None = None

    def freeze(self) -> None:
        """Nothing to freeze: the loss is deterministic, or resampled by design."""

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state() if self.generator is not None else []}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.generator is not None:
            self.generator.set_state(state["generator"])


class GridObjective(_Stateless):
    """The classic grid approach: the grid values are the parameters; residual or energy loss."""

    def __init__(self, system: Any, ansatz: Any, loss: str) -> None:
        self.system, self.ansatz, self.loss = system, ansatz, loss
        self.term_names = ["pde"]

    def loss_terms(self, phase: str) -> dict[str, Tensor]:
        return self.ansatz.loss_terms(self.system, self.loss)


class SteadyPINNObjective(_Stateless):
    """A mesh-free network on a steady problem: interior residual and boundary terms."""

    def __init__(self, equation: Any, model: torch.nn.Module, n_points: int,
                 generator: torch.Generator) -> None:
        self.equation, self.model, self.n_points, self.generator = equation, model, n_points, generator
        self.term_names = ["pde", "bc"]

    def loss_terms(self, phase: str) -> dict[str, Tensor]:
        return self.equation.pinn_loss_terms(self.model, self.n_points, self.generator)
