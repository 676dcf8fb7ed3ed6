"""State-dependent noise σ·x^p: CIR (p = ½), GBM (p = 1), CEV (p = γ), and their march in
Box–Cox power coordinates."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from neuralpde_cli.sdes.base import SDE, _box_cox_inverse, _randn, standard_gamma


class StateDependentNoise(SDE):
    r"""Diagonal noise σᵢ(x) = noise·xᵢ^p with p = ½ (CIR) or 1 (geometric); CEV frees p.

    D = ½noise² diag(x^{2p}), so Σⱼ∂ⱼDᵢⱼ = p·noise²·xᵢ^{2p−1} and Σᵢ∂ᵢ²Dᵢᵢ = p(2p−1)noise²Σxᵢ^{2p−2}.
    CIR drift κ(level − x), geometric drift κx. The state is x > 0; Euler paths are truncated
    at 0. Exact transitions: CIR is a scaled non-central χ² (a Poisson mixture of Gammas), GBM
    log-normal, coordinate by coordinate.
    """

    constant_diffusion = False
    lower_bound = 0.0
    has_exact_transition = True

    def __init__(self, dim: int, power: float, noise: Tensor, rate: Tensor,
                 level: Tensor | None) -> None:
        super().__init__(dim)
        self._power = power
        self.register_buffer("noise", noise)
        self.register_buffer("rate", rate)
        self.register_buffer("level", level if level is not None else torch.zeros_like(rate))
        self.reverting = level is not None

    @property
    def power(self) -> float | Tensor:
        return self._power

    def drift(self, t: Tensor, x: Tensor) -> Tensor:
        return self.rate * (self.level - x) if self.reverting else self.rate * x

    def drift_divergence(self, t: Tensor, x: Tensor) -> Tensor:
        sign = -1.0 if self.reverting else 1.0
        return (sign * self.rate * self.dim).expand(x.shape[0])

    def diffusion_sqrt(self, t: Tensor, x: Tensor) -> Tensor:
        scale = self.noise / math.sqrt(2.0) * torch.clamp(x, min=0.0) ** self.power
        return torch.diag_embed(scale)

    def diffusion_divergences(self, t: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        p, s2 = self.power, self.noise ** 2
        inside = x > 0  # D = 0 below the bound: no divergence there
        safe = torch.where(inside, x, torch.ones_like(x))  # finite powers (no 0·∞) at and below 0
        zero = torch.zeros_like(x)
        div = torch.where(inside, p * s2 * safe ** (2 * p - 1), zero)
        # p = ½ (CIR): D is linear in x and the second term vanishes identically
        return div, torch.where(inside, p * (2 * p - 1) * s2 * safe ** (2 * p - 2), zero).sum(-1)

    def project(self, x: Tensor) -> Tensor:
        return torch.clamp(x, min=0.0)

    def march_coordinates(self) -> dict[int, float | Tensor]:
        """Lamperti's coordinate, where the noise is constant: y = (x^{1−p} − 1)/(1 − p) (CIR:
        2√x − 2; GBM: log x). The law there is near Gaussian with Gaussian tails, and the start
        grid and mixture stay inside the state space. CEV's power 1 − γ follows γ (a tensor)."""
        return {i: min(max(1.0 - float(self.power), 0.0), 0.5) for i in range(self.dim)}

    def in_march_coordinates(self, floor: Tensor | float = 0.0) -> "PowerNoiseInPowerCoordinates":
        return PowerNoiseInPowerCoordinates(self, self.march_coordinates()[0], floor)

    def sample_transition(self, x0: Tensor, t0: Tensor, dt: Tensor,
                          generator: torch.Generator | None = None,
                          substep: float = 1e-3) -> Tensor:
        moved = dt[:, None] > 0
        h = torch.where(moved, dt[:, None], torch.ones_like(dt[:, None]))  # Δ = 0 rows stay put
        if not self.reverting:  # GBM: log X moves by (κ − σ²/2)Δ + σ√Δ Z
            z = _randn(tuple(x0.shape), x0, generator)
            out = x0 * torch.exp((self.rate - 0.5 * self.noise ** 2) * h
                                 + self.noise * torch.sqrt(h) * z)
            return torch.where(moved, out, x0)
        # CIR: 2c·X(t+Δ) ~ χ²'(df = 4κμ/σ², nc = 2c·x0·e^{−κΔ}), c = 2κ/(σ²(1 − e^{−κΔ}));
        # χ²'(df, nc) = χ²(df + 2N), N ~ Poisson(nc/2), and χ²(k)/2 ~ Gamma(k/2, 1)
        decay = torch.exp(-self.rate * h)
        c = 2.0 * self.rate / (self.noise ** 2 * (1.0 - decay))
        df = 4.0 * self.rate * self.level / self.noise ** 2
        rate_n = c * torch.clamp(x0, min=0.0) * decay
        where = generator.device if generator is not None else x0.device
        n = torch.poisson(rate_n.to(where), generator=generator).to(x0.device)
        out = standard_gamma(df / 2.0 + n, generator) / c
        return torch.where(moved, out, x0)


class PowerNoiseInPowerCoordinates(SDE):
    r"""A :class:`StateDependentNoise` process in y = (xᵃ − 1)/a per coordinate (a = 0: log x),
    by Itô's lemma. With drift c₀ + c₁x (CIR: κθ − κx; GBM: κx) and noise s·xᵖ, each coordinate has

    μ_y = c₀x^{a−1} + c₁xᵃ + ½(a − 1)s²x^{a+2p−2},  S_y = s/√2·x^q (q = p + a − 1),
    ∂_yμ_y = (a − 1)c₀/x + a·c₁ + ½(a − 1)(a + 2p − 2)s²x^{2p−2},
    ∂_yD_y = q·s²·x^{2p+a−2},  ∂²_yD_y = q(2p + a − 2)s²x^{2p−2},

    x = (1 + a·y)^{1/a} (a = 0: eʸ). At a = 1 − p (Lamperti) the noise is constant. Points below
    x = ``floor`` (for a > 0: the state space ends at x = 0) read the coefficients at the floor,
    with derivatives 0."""

    constant_diffusion = False

    def __init__(self, base: StateDependentNoise, a: float | Tensor,
                 floor: Tensor | float = 0.0) -> None:
        super().__init__(base.dim)
        self.base, self.a = base, a
        self.bounded = torch.is_tensor(a) or a > 0
        if self.bounded and not float(floor) > 0:
            raise ValueError("a power coordinate (a > 0) needs a floor > 0")
        self.floor = floor
        # CIR (p = ½) at a = ½, GBM (p = 1) at a = 0; CEV's γ is a parameter, so never constant
        self.constant_diffusion = not torch.is_tensor(base.power) and not torch.is_tensor(a) \
            and base.power + a == 1.0

    def _x(self, y: Tensor) -> tuple[Tensor, Tensor | None]:
        """x at y, held at the floor below it, and where it is not held (None: nowhere held):
        one inverse per call of the coefficients, which the march calls at every stage."""
        x = _box_cox_inverse(y, self.a)
        if not self.bounded:
            return x, None
        return torch.clamp(x, min=self.floor), x > self.floor

    @staticmethod
    def _inside(free: Tensor | None, value: Tensor) -> Tensor:
        """A derivative, 0 where the coefficients are held (below the floor)."""
        return value if free is None else torch.where(free, value, torch.zeros_like(value))

    def _linear(self) -> tuple[Tensor, Tensor]:
        b = self.base
        return (b.rate * b.level, -b.rate) if b.reverting else (torch.zeros_like(b.rate), b.rate)

    def drift(self, t: Tensor, x: Tensor) -> Tensor:
        a, p, s2 = self.a, self.base.power, self.base.noise ** 2
        c0, c1 = self._linear()
        z, _ = self._x(x)
        return c0 * z ** (a - 1) + c1 * z ** a + 0.5 * (a - 1) * s2 * z ** (a + 2 * p - 2)

    def drift_divergence(self, t: Tensor, x: Tensor) -> Tensor:
        a, p, s2 = self.a, self.base.power, self.base.noise ** 2
        c0, c1 = self._linear()
        z, free = self._x(x)
        return self._inside(free, (a - 1) * c0 / z + a * c1
                            + 0.5 * (a - 1) * (a + 2 * p - 2) * s2 * z ** (2 * p - 2)).sum(-1)

    def diffusion_sqrt(self, t: Tensor, x: Tensor) -> Tensor:
        b = self.base
        if self.constant_diffusion:
            return torch.diag_embed((b.noise / math.sqrt(2.0)).expand(self.dim))
        z, _ = self._x(x)
        return torch.diag_embed(b.noise / math.sqrt(2.0) * z ** (b.power + self.a - 1.0))

    def diffusion_divergences(self, t: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        a, p, s2 = self.a, self.base.power, self.base.noise ** 2
        (z, free), q = self._x(x), p + a - 1.0
        return (self._inside(free, q * s2 * z ** (2 * p + a - 2)),
                self._inside(free, q * (2 * p + a - 2) * s2 * z ** (2 * p - 2)).sum(-1))


class CEV(StateDependentNoise):
    """dX = κ(level − X)dt + noise·X^γ dW: CIR's drift with a free elasticity γ (a buffer, so it
    can be calibrated); no closed-form law, so transitions are Euler–Maruyama sub-steps."""

    has_exact_transition = False

    def __init__(self, dim: int, gamma: Tensor, noise: Tensor, rate: Tensor, level: Tensor) -> None:
        super().__init__(dim, 0.5, noise, rate, level)
        self.register_buffer("gamma", gamma)

    @property
    def power(self) -> Tensor:
        return self.gamma

    def march_coordinates(self) -> dict[int, float | Tensor]:
        """Lamperti's power 1 − γ, following γ (so the noise stays constant whatever the fit
        does to γ), clipped to [0, ½]: log x where γ ≥ 1, 2√x − 2 below γ = ½."""
        return {i: torch.clamp(1.0 - self.gamma, 0.0, 0.5) for i in range(self.dim)}

    def sample_transition(self, x0: Tensor, t0: Tensor, dt: Tensor,
                          generator: torch.Generator | None = None,
                          substep: float = 1e-3) -> Tensor:
        return self.euler_steps(x0, t0, dt, generator, substep)


def cir(dim: int, p: dict[str, Tensor], dtype: torch.dtype,
        device: torch.device) -> StateDependentNoise:
    """dX = κ(μ − X) dt + σ√X dW."""
    return StateDependentNoise(dim, 0.5, p["noise"], p["rate"], p["level"])


def gbm(dim: int, p: dict[str, Tensor], dtype: torch.dtype,
        device: torch.device) -> StateDependentNoise:
    """dX = μX dt + σX dW."""
    return StateDependentNoise(dim, 1.0, p["noise"], p["rate"], None)


def cev(dim: int, p: dict[str, Tensor], dtype: torch.dtype, device: torch.device) -> CEV:
    """dX = κ(μ − X) dt + σXᵞ dW."""
    return CEV(dim, p["gamma"], p["noise"], p["rate"], p["level"])
