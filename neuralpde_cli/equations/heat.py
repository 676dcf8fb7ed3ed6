"""The heat equation ∂u/∂t = κ∇²u in d dimensions from a Gaussian, with its exact solution."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from neuralpde_cli.equations.base import DensityEquation, initial_gaussian
from neuralpde_cli.errors import UserError


@dataclass
class HeatConfig:
    name: str = "heat"
    dim: int = 2
    diffusivity: float = 0.5
    t_final: float = 10.0
    #: empty: the origin
    initial_mean: list[float] = field(default_factory=list)
    initial_std: float = 1.0
    #: Σ₀ = std²((1 − ρ)I + ρ11ᵀ), unless ``initial_cov`` is given in full.
    initial_correlation: float = 0.0
    initial_cov: list[list[float]] = field(default_factory=list)
    eval_times: list[float] = field(default_factory=lambda: [0.0, 1.0, 2.5, 5.0, 10.0])


class HeatEquation(DensityEquation):
    r"""∂u/∂t = κ ∇²u on ℝᵈ × [0, T], u(0) = N(m₀, Σ₀).

    The Fokker–Planck equation of X = √(2κ) W: μ = 0, D = κI. Exact solution
    u(t) = N(m₀, Σ₀ + 2κt I), used for every error this equation reports.
    """

    def __init__(self, cfg: HeatConfig, dtype: torch.dtype, device: torch.device) -> None:
        if cfg.diffusivity <= 0:
            raise UserError(f"equation.diffusivity={cfg.diffusivity} must be > 0")
        if cfg.dim < 1:
            raise UserError(f"equation.dim={cfg.dim} must be an integer ≥ 1")
        if cfg.t_final <= 0:
            raise UserError(f"equation.t_final={cfg.t_final} must be > 0")
        mean, cov = initial_gaussian(cfg.dim, cfg.initial_mean, cfg.initial_std,
                                     cfg.initial_correlation, cfg.initial_cov, dtype, device)
        super().__init__(cfg.dim, cfg.t_final, mean, cov, cfg.eval_times)
        self.diffusivity = float(cfg.diffusivity)

    def drift(self, t: Tensor, x: Tensor) -> Tensor:
        return torch.zeros_like(x)

    def drift_divergence(self, t: Tensor, x: Tensor) -> Tensor:
        return torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)

    def diffusion_sqrt(self, t: Tensor, x: Tensor) -> Tensor:
        eye = torch.eye(self.dim, dtype=self.initial_cov.dtype, device=self.initial_cov.device)
        return self.diffusivity ** 0.5 * eye

    def exact_moments(self, t: Tensor) -> tuple[Tensor, Tensor]:
        eye = torch.eye(self.dim, dtype=t.dtype, device=t.device)
        cov = self.initial_cov + 2.0 * self.diffusivity * t[:, None, None] * eye
        return self.initial_mean.expand(t.shape[0], self.dim), cov
