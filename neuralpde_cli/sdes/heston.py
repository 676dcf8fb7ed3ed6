"""Heston's stochastic volatility, state (log S, V), and its march in log V."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from neuralpde_cli.errors import UserError
from neuralpde_cli.sdes.base import SDE, _randn
from neuralpde_cli.sdes.square_root import StateDependentNoise


class Heston(SDE):
    r"""Heston in (log S, V): μ = (mu − V/2, κ(θ − V)), σ = √V·[[1, 0], [ξρ, ξ√(1 − ρ²)]].

    D = ½V[[1, ξρ], [ξρ, ξ²]] is linear in V, so Σⱼ∂ⱼDᵢⱼ = ½(ξρ, ξ²) where V > 0 and the second
    sum vanishes; ∇·μ = −κ. The coefficients do not depend on log S (``invariant_dims``), so a
    transition density marched from one log S serves every other by a shift. V ≤ 0 is outside
    the state space: there the noise is taken as zero.

    Transitions (``simulate``): V from its exact non-central χ² law on each sub-step, log S from
    Broadie and Kaya's conditional law given the V path, log S += (mu − V̄/2)h + ρ/ξ·(V₁ − V₀ −
    κ(θ − V̄)h) + √((1 − ρ²)V̄h)·Z with V̄ the trapezoidal mean of V over the sub-step: the only
    discretization is that trapezoid, O(h²) per sub-step.
    """

    constant_diffusion = False
    has_exact_transition = False
    transition_scheme = "exact variance, Broadie-Kaya log S"  # sub-stepped
    invariant_dims = (0,)
    #: coordinates that must stay > 0 in data (V)
    positive_dims = (1,)
    #: the Box–Cox power of V's march coordinate: 0, log V (:class:`HestonLogVariance`); ½,
    #: Lamperti's 2√V − 2 (:class:`HestonRootVariance`), which the latent filter uses
    variance_power = 0.0

    def __init__(self, mu: Tensor, rate: Tensor, level: Tensor, noise: Tensor, rho: Tensor) -> None:
        super().__init__(2)
        for name, value in (("mu", mu), ("rate", rate), ("level", level), ("noise", noise),
                            ("rho", rho)):
            self.register_buffer(name, value)

    def drift(self, t: Tensor, x: Tensor) -> Tensor:
        v = x[:, 1]
        return torch.stack([self.mu - 0.5 * v, self.rate * (self.level - v)], -1)

    def drift_divergence(self, t: Tensor, x: Tensor) -> Tensor:
        return (-self.rate).expand(x.shape[0])

    def diffusion_sqrt(self, t: Tensor, x: Tensor) -> Tensor:
        # √ has no derivative at 0: clamped above it, the gradient stays finite
        root = torch.sqrt(torch.clamp(x[:, 1], min=torch.finfo(x.dtype).tiny) / 2.0)
        zero = torch.zeros_like(self.rho)
        shape = torch.stack([torch.stack([torch.ones_like(self.rho), zero]),
                             torch.stack([self.noise * self.rho,
                                          self.noise * torch.sqrt(1.0 - self.rho ** 2)])])
        return root[:, None, None] * shape

    def diffusion_divergences(self, t: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        inside = (x[:, 1] > 0).to(x.dtype)
        div = torch.stack([0.5 * self.noise * self.rho * inside, 0.5 * self.noise ** 2 * inside], -1)
        return div, torch.zeros_like(inside)

    def project(self, x: Tensor) -> Tensor:
        return torch.stack([x[:, 0], torch.clamp(x[:, 1], min=0.0)], -1)

    def march_coordinates(self) -> dict[int, float]:
        """A transition density is marched in log V (:class:`HestonLogVariance`), or in
        2√V − 2 with ``variance_power`` ½ (:class:`HestonRootVariance`)."""
        return {1: self.variance_power}

    def in_march_coordinates(self, floor: float = 0.0) -> "SDE":
        """The same process in (log S, log V) (no boundary: ``floor`` is not needed), or in
        (log S, 2√V − 2), held at √floor below it."""
        if self.variance_power == 0.0:
            return HestonLogVariance(self)
        if self.variance_power != 0.5:
            raise UserError(f"Heston's variance is marched in log V or 2√V − 2 (power 0 or ½), "
                            f"not power {self.variance_power}")
        return HestonRootVariance(self, floor)

    def sample_transition(self, x0: Tensor, t0: Tensor, dt: Tensor,
                          generator: torch.Generator | None = None,
                          substep: float = 1e-3) -> Tensor:
        if substep <= 0:
            raise UserError(f"the sub-step must be > 0 (got {substep})")
        steps = torch.where(dt > 0, torch.clamp(torch.ceil(dt / substep - 1e-9), min=1.0),
                            torch.zeros_like(dt))
        h = dt / torch.clamp(steps, min=1.0)
        cir = StateDependentNoise(1, 0.5, self.noise, self.rate, self.level)
        log_s, v = x0[:, 0].clone(), x0[:, 1:2].clone()
        for k in range(int(steps.max().item()) if steps.numel() else 0):
            hk = torch.where(steps > k, h, torch.zeros_like(h))
            v_new = cir.sample_transition(v, t0, hk, generator)
            v_bar = 0.5 * (v + v_new)[:, 0]
            z = _randn((x0.shape[0],), x0, generator)
            log_s = log_s + (self.mu - 0.5 * v_bar) * hk + self.rho / self.noise * (
                v_new[:, 0] - v[:, 0] - self.rate * (self.level - v_bar) * hk) \
                + torch.sqrt((1.0 - self.rho ** 2) * v_bar * hk) * z
            v = v_new
        return torch.stack([log_s, v[:, 0]], -1)


class HestonLogVariance(SDE):
    r"""Heston in (log S, y = log V), by Itô's lemma: with v = eʸ,
    μ = (mu − v/2, (κθ − ξ²/2)/v − κ), σ = [[√v, 0], [ξρ/√v, ξ√(1 − ρ²)/√v]].

    Why: the transition law of log V over a week is close to Gaussian and has no boundary, where
    that of V ends at 0 with a √V noise that has no derivative there. A mixture marched in V
    near the boundary had replay errors that jumped 100-fold for a 0.5 % change of θ.
    D = ½[[v, ξρ], [ξρ, ξ²/v]]: Σⱼ∂ⱼDᵢⱼ = (0, −ξ²/(2v)), Σᵢⱼ∂ᵢ∂ⱼDᵢⱼ = ξ²/(2v), ∇·μ = −(κθ − ξ²/2)/v.
    A density in these coordinates is one in (log S, V) times v.
    """

    constant_diffusion = False
    invariant_dims = (0,)

    def __init__(self, heston: Heston) -> None:
        super().__init__(2)
        self.heston = heston

    def drift(self, t: Tensor, x: Tensor) -> Tensor:
        h, y = self.heston, x[:, 1]
        return torch.stack([h.mu - 0.5 * torch.exp(y),
                            (h.rate * h.level - 0.5 * h.noise ** 2) * torch.exp(-y) - h.rate], -1)

    def drift_divergence(self, t: Tensor, x: Tensor) -> Tensor:
        h = self.heston
        return -(h.rate * h.level - 0.5 * h.noise ** 2) * torch.exp(-x[:, 1])

    def diffusion_sqrt(self, t: Tensor, x: Tensor) -> Tensor:
        # S = σ/√2, row by row: √v/√2 (0), and ξ/(√2·√v) times (ρ, √(1 − ρ²))
        h, half_y = self.heston, 0.5 * x[:, 1:2]
        root, inv_root = torch.exp(half_y) / math.sqrt(2.0), torch.exp(-half_y) / math.sqrt(2.0)
        first = torch.stack([root, torch.zeros_like(root)], -1)
        second = torch.stack([h.noise * h.rho * inv_root,
                              h.noise * torch.sqrt(1.0 - h.rho ** 2) * inv_root], -1)
        return torch.cat([first, second], -2)

    def diffusion_divergences(self, t: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        half = 0.5 * self.heston.noise ** 2 * torch.exp(-x[:, 1])
        return torch.stack([torch.zeros_like(half), -half], -1), half


def heston(dim: int, p: dict[str, Tensor], dtype: torch.dtype, device: torch.device) -> Heston:
    if dim != 2:
        raise UserError(f"equation.sde.kind=heston has the state (log S, V): equation.dim=2 "
                        f"(got {dim})")
    return Heston(p["mu"], p["rate"], p["level"], p["noise"], p["rho"])


class HestonRootVariance(SDE):
    r"""Heston in (log S, y = 2√V − 2), Lamperti's coordinate for V, by Itô's lemma: with
    s = √V = 1 + y/2, μ = (mu − s²/2, (κθ − ξ²/4)/s − κs), σ = [[s, 0], [ξρ, ξ√(1 − ρ²)]]:
    the variance's noise is constant. D = ½[[s², ξρs], [ξρs, ξ²]]: Σⱼ∂ⱼDᵢⱼ = (ξρ/4, 0), the
    second sum vanishes, ∇·μ = −½((κθ − ξ²/4)/s² + κ). Why: from a small V a day's law is far
    from Gaussian in log V (its drift (κθ − ξ²/2)/V moves it by several units) but close to
    Gaussian in √V, whose drift is (κθ − ξ²/4)/(2√V): the latent filter's low nodes need that.

    Below s = √floor the V-drift, singular at s = 0, continues along its tangent at the floor,
    and D is the same polynomial in s (positive semi-definite for every s): every coefficient
    and divergence is continuous there. Held constant instead (derivatives 0 below), the
    divergences jumped where a quadrature point crossed the floor, and so did the march and the
    filtered log L (by 0.015 for a change of ρ by 5e-4 on the S&P 500, stalling its fit).
    """

    constant_diffusion = False
    invariant_dims = (0,)

    def __init__(self, heston: Heston, floor: float | Tensor) -> None:
        super().__init__(2)
        if not float(floor) > 0:
            raise ValueError("the variance's root coordinate needs a floor > 0")
        self.heston, self.floor = heston, math.sqrt(float(floor))

    def _s(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """s = 1 + y/2, and s held at the floor (where the V-drift is read)."""
        s = 1.0 + 0.5 * x[:, 1]
        return s, torch.clamp(s, min=self.floor)

    def _drift_slope(self, held: Tensor) -> Tensor:
        """∂μ_y/∂y at s = ``held`` (ds/dy = ½)."""
        h = self.heston
        return -0.5 * ((h.rate * h.level - 0.25 * h.noise ** 2) / (held * held) + h.rate)

    def drift(self, t: Tensor, x: Tensor) -> Tensor:
        h, (s, held) = self.heston, self._s(x)
        v = (h.rate * h.level - 0.25 * h.noise ** 2) / held - h.rate * held \
            + self._drift_slope(held) * 2.0 * (s - held)  # the tangent below the floor
        return torch.stack([h.mu - 0.5 * s * s, v], -1)

    def drift_divergence(self, t: Tensor, x: Tensor) -> Tensor:
        return self._drift_slope(self._s(x)[1])

    def diffusion_sqrt(self, t: Tensor, x: Tensor) -> Tensor:
        h, (s, _) = self.heston, self._s(x)
        root = s / math.sqrt(2.0)
        first = torch.stack([root, torch.zeros_like(root)], -1)
        second = torch.stack([(h.noise * h.rho / math.sqrt(2.0)).expand_as(root),
                              (h.noise * torch.sqrt(1.0 - h.rho ** 2) / math.sqrt(2.0)).expand_as(root)], -1)
        return torch.stack([first, second], -2)

    def diffusion_divergences(self, t: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.heston
        ones = torch.ones_like(x[:, 1])
        div = torch.stack([0.25 * h.noise * h.rho * ones, torch.zeros_like(ones)], -1)
        return div, torch.zeros_like(ones)
