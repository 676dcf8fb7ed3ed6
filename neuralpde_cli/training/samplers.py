"""Collocation points (t, x) for space-time training of a density equation."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from neuralpde_cli.equations.base import DensityEquation
from neuralpde_cli.errors import UserError, check_choice

KINDS = ("gaussian", "uniform", "self", "mixture")


@dataclass
class SamplerConfig:
    #: gaussian: the equation's widening envelope; uniform: a box around it; self: draws from the
    #: current solution (importance sampling, needs a samplable ansatz); mixture: both.
    name: str = "gaussian"
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
        if self.cfg.name == "uniform":
            box = 2.0 * self._uniform(t.shape[0] * self.equation.dim).reshape(t.shape[0], -1) - 1.0
            return mean + self.cfg.spread * std * box
        lo = 1.0 / self.cfg.spread
        scale = lo + (self.cfg.spread - lo) * self._uniform(t.shape[0]).unsqueeze(-1)
        return mean + scale * std * self._normal(t.shape[0], self.equation.dim)

    def __call__(self, n: int | None = None) -> tuple[Tensor, Tensor]:
        n = n or self.cfg.batch_size
        t = self.times(n)
        if self.cfg.name in ("gaussian", "uniform"):
            return t, self.envelope_points(t)
        n_self = n if self.cfg.name == "self" else int(round(self.cfg.self_fraction * n))
        with torch.no_grad():
            x_self = self.ansatz.sample(t[:n_self], generator=self.generator)
        x_env = self.envelope_points(t[n_self:])
        return t, torch.cat([x_self, x_env]).detach()
