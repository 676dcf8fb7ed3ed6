"""Collocation points (t, x) for space-time training of a density equation."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from neuralpde_cli.equations.base import DensityEquation
from neuralpde_cli.errors import UserError, check_choice

KINDS = ("auto", "gaussian", "uniform", "self", "mixture", "paths")


@dataclass
class SamplerConfig:
    #: gaussian: the equation's widening envelope; uniform: a box around it; self: draws from the
    #: current solution (importance sampling, needs a samplable ansatz); mixture: both; paths:
    #: an Euler–Maruyama ensemble of the equation's SDE (the law itself, in any dimension), half
    #: of the points moved by ``spread`` ensemble stds into the tails; auto: paths where the law
    #: is not Gaussian (no exact moments), gaussian where it is.
    name: str = "auto"
    batch_size: int = 256
    #: envelope widths covered: each point's scale is uniform in [1/spread, spread] (gaussian),
    #: or the box half-width in envelope stds (uniform). In high d a Gaussian's mass sits on a
    #: thin shell, so a single inflated scale would miss it entirely; a range covers it.
    spread: float = 1.5
    #: t = T·u^time_power, u uniform: > 1 puts more points near t = 0 where p changes fastest
    time_power: float = 1.0
    #: fraction drawn from the solution itself with ``mixture``
    self_fraction: float = 0.5


class CollocationSampler:
    """Draws a batch of (t, x) each call from a seeded generator (part of the checkpoint)."""

    def __init__(self, cfg: SamplerConfig, equation: DensityEquation, ansatz: torch.nn.Module,
                 generator: torch.Generator) -> None:
        check_choice("sampler.name", cfg.name, KINDS)
        if cfg.batch_size <= 0:
            raise UserError(f"sampler.batch_size={cfg.batch_size} must be a positive integer")
        if cfg.spread <= 0 or cfg.time_power <= 0 or not 0.0 <= cfg.self_fraction <= 1.0:
            raise UserError("sampler.spread and sampler.time_power must be > 0 and "
                            f"sampler.self_fraction in [0, 1] (got {cfg.spread}, "
                            f"{cfg.time_power}, {cfg.self_fraction})")
        if cfg.name in ("self", "mixture") and not getattr(ansatz, "samplable", False):
            raise UserError(f"sampler={cfg.name} draws from the solution, which "
                            f"{type(ansatz).__name__} cannot do; use sampler=gaussian or uniform")
        self.cfg = cfg
        self.equation = equation
        self.ansatz = ansatz
        self.generator = generator
        self.kind = resolve_kind(cfg.name, equation)
        if self.kind == "paths":
            ensemble = equation.ensemble()
            self.times_grid, self.paths = ensemble.times, ensemble.paths
            self.path_mean, cov = ensemble.moments()
            eye = torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
            self.path_chol = torch.linalg.cholesky(cov + 1e-12 * eye)

    def _uniform(self, n: int) -> Tensor:
        ref = self.equation.initial_mean
        return torch.rand(n, generator=self.generator, dtype=ref.dtype).to(ref.device)

    def _normal(self, n: int, d: int) -> Tensor:
        ref = self.equation.initial_mean
        return torch.randn(n, d, generator=self.generator, dtype=ref.dtype).to(ref.device)

    def times(self, n: int) -> Tensor:
        return self.equation.t_final * self._uniform(n) ** self.cfg.time_power

    def envelope_points(self, t: Tensor) -> Tensor:
        mean, std = self.equation.envelope(t)
        if self.kind == "uniform":
            box = 2.0 * self._uniform(t.shape[0] * self.equation.dim).reshape(t.shape[0], -1) - 1.0
            return mean + self.cfg.spread * std * box
        lo = 1.0 / self.cfg.spread
        scale = lo + (self.cfg.spread - lo) * self._uniform(t.shape[0]).unsqueeze(-1)
        return mean + scale * std * self._normal(t.shape[0], self.equation.dim)

    def path_points(self, n: int) -> tuple[Tensor, Tensor]:
        """At random grid times (t > 0): half the points are states of random paths; a quarter
        are such states moved by N(0, spread²·C), C the ensemble's covariance at that time, into
        the tails (along the law's own axes: a law stretched along a diagonal is narrow across
        it); a quarter are drawn from N(m, spread²·C), m the ensemble's mean: the envelope's
        region, where a correction never trained would put spurious mass."""
        k = torch.randint(1, self.times_grid.shape[0], (n,), generator=self.generator)
        j = torch.randint(0, self.paths.shape[1], (n,), generator=self.generator)
        k, j = k.to(self.paths.device), j.to(self.paths.device)
        x = self.paths[k, j].clone()
        half, quarter = n // 2, n // 2 + (n - n // 2) // 2
        z = self.cfg.spread * (self.path_chol[k[half:]]
                               @ self._normal(n - half, x.shape[1]).unsqueeze(-1)).squeeze(-1)
        x[half:quarter] += z[:quarter - half]
        x[quarter:] = self.path_mean[k[quarter:]] + z[quarter - half:]
        return self.times_grid[k], x

    def __call__(self, n: int | None = None) -> tuple[Tensor, Tensor]:
        n = n or self.cfg.batch_size
        if self.kind == "paths":
            return self.path_points(n)
        t = self.times(n)
        if self.kind in ("gaussian", "uniform"):
            return t, self.envelope_points(t)
        n_self = n if self.kind == "self" else int(round(self.cfg.self_fraction * n))
        with torch.no_grad():
            x_self = self.ansatz.sample(t[:n_self], generator=self.generator)
        x_env = self.envelope_points(t[n_self:])
        return t, torch.cat([x_self, x_env]).detach()


def resolve_kind(name: str, equation: DensityEquation) -> str:
    """``auto`` → ``paths`` for a law without closed-form moments (a nonlinear drift, a
    state-dependent noise: where an envelope Gaussian misplaces the points), else ``gaussian``."""
    if name != "auto":
        return name
    return "gaussian" if equation.gaussian_law() else "paths"
