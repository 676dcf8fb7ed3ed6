"""Itô SDEs dX = μ(t, X) dt + σ(t, X) dW: the one home of an SDE for solve, simulate, calibrate.

An SDE is a ``torch.nn.Module``: its coefficients are buffers (a calibration can switch on
``requires_grad`` and differentiate the density through them). Every SDE gives its drift μ and
S with D = S Sᵀ = ½σσᵀ, closed-form divergences where they exist (``None`` lets the equation
fall back to autograd), exact Gaussian moments when it is linear, and one transition sampler
(exact where the law is known, Euler–Maruyama sub-steps otherwise).

The calibratable parameters are named as in the config (``theta``, ``noise`` …; entries of
matrices and vectors as ``theta[0][1]``, ``mean[1]`` when dim > 1): :func:`parameter_names`,
:func:`parameter_values`, :func:`parameter_constraint`, and :func:`build_sde_with`, which builds
the SDE from given tensors so the likelihood is differentiable in them.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import torch
from torch import Tensor

from neuralpde_cli.errors import UserError, check_choice

KINDS = ("ou", "brownian", "double_well", "double_well_2d", "cir", "cev", "gbm", "heston",
         "custom")


@dataclass
class SDEConfig:
    #: ou: dX = θ(m − X)dt + σdW; brownian: dX = b dt + σdW; double_well: μ = linear·x − cubic·x³
    #: per coordinate, σ = noise·I; double_well_2d: μ = (linear·x₁ − cubic·x₁³ + c x₂, −x₂ + c x₁),
    #: σ = noise·I; cir: dX = κ(level − X)dt + noise·√X dW; cev: dX = κ(level − X)dt +
    #: noise·X^γ dW; gbm: dX = κX dt + noise·X dW (κ = ``rate``); custom: μ and σ from the
    #: callables ``drift`` and ``diffusion``.
    kind: str = "ou"
    #: OU drift matrix θ (d × d); the default is non-symmetric (eigenvalues 0.9 ± 0.49i)
    theta: list[list[float]] = field(default_factory=lambda: [[1.0, 0.6], [-0.4, 0.8]])
    #: OU long-run mean m
    mean: list[float] = field(default_factory=lambda: [1.0, -0.5])
    #: noise matrix σ (d × d) of ou, brownian and custom without ``diffusion``; correlated default
    sigma: list[list[float]] = field(default_factory=lambda: [[0.8, 0.0], [0.4, 0.6]])
    #: brownian drift b (empty: zero)
    drift_vector: list[float] = field(default_factory=list)
    #: scalar noise of double_well, double_well_2d, cir, cev, gbm
    noise: float = 0.5
    #: mean-reversion rate κ (cir, cev) or growth rate (gbm)
    rate: float = 1.0
    #: cir and cev long-run level
    level: float = 1.0
    #: cev elasticity γ of the noise noise·X^γ (γ = ½ is CIR)
    gamma: float = 0.5
    #: double_well drift linear·x − cubic·x³
    linear: float = 1.0
    cubic: float = 1.0
    #: double_well_2d coupling c
    coupling: float = 0.5
    #: heston: state (log S, V), d log S = (mu − V/2)dt + √V dW₁, dV = rate·(level − V)dt +
    #: noise·√V dW₂, corr(dW₁, dW₂) = rho (κ = rate, θ = level, ξ = noise, as for CIR)
    mu: float = 0.05
    rho: float = -0.7
    #: custom: "package.module:function" or "path/to/file.py:function" with
    #: f(t (N,), x (N, d)) → μ (N, d)
    drift: Optional[str] = None
    #: custom: as ``drift``, f(t, x) → σ, (d, r) constant or (N, d, r)
    diffusion: Optional[str] = None
    #: custom: named scalar parameters, passed as keyword arguments (0-d tensors) to whichever
    #: of the callables declares them, e.g. {a: 2.0, b: 5.0} for drift(t, x, a, b); calibrate
    #: can fit them
    params: dict[str, float] = field(default_factory=dict)
    #: custom: the parameters that must stay > 0 (fitted as logarithms)
    positive_params: list[str] = field(default_factory=list)


def _like(x: Tensor, generator: torch.Generator | None) -> dict:
    """Where to draw random numbers: on the generator's device (a generator is tied to one)."""
    return {"generator": generator, "dtype": x.dtype,
            "device": generator.device if generator is not None else x.device}


def _randn(shape: tuple[int, ...], x: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.randn(*shape, **_like(x, generator)).to(x.device)


def _rand(shape: tuple[int, ...], x: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.rand(*shape, **_like(x, generator)).to(x.device)


def standard_gamma(alpha: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Gamma(α, 1) draws, one per entry of α > 0, from ``generator`` (torch's own gamma sampler
    takes no generator, so a seeded simulation could not reproduce).

    Marsaglia and Tsang (2000): squeeze-free rejection from a transformed normal for α ≥ 1;
    α < 1 draws Gamma(α + 1)·U^{1/α}.
    """
    flat = alpha.reshape(-1)
    boost = flat < 1
    a = torch.where(boost, flat + 1.0, flat)
    d = a - 1.0 / 3.0
    c = 1.0 / torch.sqrt(9.0 * d)
    out = torch.empty_like(flat)
    pending = torch.arange(flat.shape[0], device=flat.device)
    while pending.numel():
        z = _randn((pending.numel(),), flat, generator)
        u = _rand((pending.numel(),), flat, generator)
        v = (1.0 + c[pending] * z) ** 3
        dp = d[pending]
        log_v = torch.log(torch.clamp(v, min=torch.finfo(v.dtype).tiny))
        ok = (v > 0) & (torch.log(u) < 0.5 * z * z + dp - dp * v + dp * log_v)
        out[pending[ok]] = (dp * v)[ok]
        pending = pending[~ok]
    u = _rand(tuple(flat.shape), flat, generator)
    out = torch.where(boost, out * u ** (1.0 / flat), out)
    return out.reshape(alpha.shape)


class SDE(torch.nn.Module):
    """Base: the coefficient interface the Fokker–Planck equation delegates to."""

    #: D independent of x
    constant_diffusion: bool = True
    #: coefficients independent of t (the finite-volume reference factors its matrix once)
    autonomous: bool = True
    #: the process stays above this bound in every coordinate (CIR, CEV, GBM: 0), else None
    lower_bound: float | None = None
    #: :meth:`sample_transition` draws from the exact law (else Euler–Maruyama sub-steps)
    has_exact_transition: bool = False

    @property
    def transition_scheme(self) -> str:
        """What :meth:`sample_transition` does, for summaries: "exact" or the sub-step scheme."""
        return "exact" if self.has_exact_transition else "euler"

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def drift(self, t: Tensor, x: Tensor) -> Tensor:
        """μ(t, x), (N, d)."""
        raise NotImplementedError

    def diffusion_sqrt(self, t: Tensor, x: Tensor) -> Tensor:
        """S = σ/√2: (d, r) when constant, else (N, d, r)."""
        raise NotImplementedError

    def drift_divergence(self, t: Tensor, x: Tensor) -> Tensor | None:
        """∇·μ (N,) in closed form, or None (the equation then uses autograd)."""
        return None

    def diffusion_divergences(self, t: Tensor, x: Tensor) -> tuple[Tensor, Tensor] | None:
        """(Σⱼ∂ⱼDᵢⱼ, Σᵢⱼ∂ᵢ∂ⱼDᵢⱼ) in closed form, or None."""
        return None

    def exact_moments(self, t: Tensor, m0: Tensor, c0: Tensor) -> tuple[Tensor, Tensor] | None:
        """Mean (n_t, d) and covariance (n_t, d, d) of X_t from N(m0, C0) when X is Gaussian."""
        return None

    def sample_transition(self, x0: Tensor, t0: Tensor, dt: Tensor,
                          generator: torch.Generator | None = None,
                          substep: float = 1e-3) -> Tensor:
        """One draw of X(t0 + dt) given X(t0) = x0 per row: x0 (n, d), t0 (n,), dt (n,) ≥ 0.

        Exact where :attr:`has_exact_transition` (subclasses override), else Euler–Maruyama with
        equal sub-steps of at most ``substep`` per row.
        """
        return self.euler_steps(x0, t0, dt, generator, substep)

    def euler_steps(self, x0: Tensor, t0: Tensor, dt: Tensor,
                    generator: torch.Generator | None, substep: float) -> Tensor:
        """Euler–Maruyama from (t0, x0) over dt per row, ⌈dt/substep⌉ equal steps each (rows
        that have arrived stop moving); σ dW = √2 S dW."""
        if substep <= 0:
            raise UserError(f"the Euler–Maruyama sub-step must be > 0 (got {substep})")
        steps = torch.where(dt > 0, torch.clamp(torch.ceil(dt / substep - 1e-9), min=1.0),
                            torch.zeros_like(dt))
        h = dt / torch.clamp(steps, min=1.0)
        x, t = x0.clone(), t0.clone()
        for k in range(int(steps.max().item()) if steps.numel() else 0):
            hk = torch.where(steps > k, h, torch.zeros_like(h))
            s = self.diffusion_sqrt(t, x)
            dw = _randn((x.shape[0], s.shape[-1]), x, generator) * torch.sqrt(2.0 * hk)[:, None]
            noise = dw @ s.T if s.dim() == 2 else (s @ dw.unsqueeze(-1)).squeeze(-1)
            x = self.project(x + hk[:, None] * self.drift(t, x) + noise)
            t = t + hk
        return x

    def euler_maruyama(self, x0: Tensor, times: Tensor, n_paths: int,
                       generator: torch.Generator | None = None, dt: float = 1e-3) -> Tensor:
        """X at each of ``times`` (n_t, n_paths, d) from x0 ((d,) or (n_paths, d)) at t = 0.

        Steps of at most ``dt`` land exactly on every requested time.
        """
        x = x0.expand(n_paths, self.dim).clone()
        out, t = [], 0.0
        for target in times.tolist():
            if target > t:
                x = self.euler_steps(x, x.new_full((n_paths,), t), x.new_full((n_paths,), target - t),
                                     generator, dt)
            t = max(t, target)
            out.append(x.clone())
        return torch.stack(out)

    def project(self, x: Tensor) -> Tensor:
        """Keep a discretized path in the state space (identity unless bounded below)."""
        return x

    def march_coordinates(self) -> dict[int, float | Tensor]:
        """The coordinates a transition density is marched in, each with its power a: the
        Box–Cox transform y = (xᵃ − 1)/a (a = 0: y = log x). Empty: the natural coordinates.
        A power that is a tensor follows the parameters (CEV's 1 − γ). See
        :meth:`in_march_coordinates`."""
        return {}

    def in_march_coordinates(self, floor: Tensor | float = 0.0) -> "SDE":
        """The same process in the coordinates :meth:`march_coordinates` names (Itô's lemma).
        ``floor``: where a power coordinate (a > 0) has a boundary (x = 0), the coefficients
        are held at their value at x = floor > 0 below it (finite, and consistent: no
        derivatives), so the far tail of a Gaussian component that reaches past the boundary
        reads finite coefficients."""
        return self


def _box_cox(x: Tensor, a: float | Tensor) -> Tensor:
    """(xᵃ − 1)/a, log x at a = 0 (continuous in a, so a power that follows θ is smooth)."""
    if not torch.is_tensor(a):
        return torch.log(x) if a == 0 else torch.expm1(a * torch.log(x)) / a
    small = a.abs() < 1e-8
    safe = torch.where(small, torch.ones_like(a), a)
    return torch.where(small, torch.log(x), torch.expm1(safe * torch.log(x)) / safe)


def _box_cox_inverse(y: Tensor, a: float | Tensor) -> Tensor:
    """x = (1 + a·y)^{1/a} (eʸ at a = 0); 1 + a·y ≤ 0 (past the boundary) gives 0."""
    if not torch.is_tensor(a):
        return torch.exp(y) if a == 0 else torch.clamp(1.0 + a * y, min=0.0) ** (1.0 / a)
    small = a.abs() < 1e-8
    safe = torch.where(small, torch.ones_like(a), a)
    root = torch.exp(torch.log(torch.clamp(1.0 + safe * y, min=1e-300)) / safe)
    return torch.where(small, torch.exp(y), torch.where(1.0 + safe * y > 0, root, torch.zeros_like(y)))


def to_march(x: Tensor, powers: dict[int, float | Tensor]) -> Tensor:
    """x with each coordinate i of ``powers`` replaced by y = (xᵃ − 1)/a (a = 0: log x)."""
    out = x.clone()
    for i, a in powers.items():
        out[..., i] = _box_cox(x[..., i], a)
    return out


def march_log_jacobian(x: Tensor, powers: dict[int, float | Tensor]) -> Tensor:
    """log |dy/dx| (...,) of :func:`to_march` at x: Σ (a − 1) log xᵢ. A density in y times
    this Jacobian is the density in x."""
    out = torch.zeros_like(x[..., 0])
    for i, a in powers.items():
        out = out + (a - 1.0) * torch.log(x[..., i])
    return out


def _matrix(values: list[list[float]], dim: int, name: str, dtype: torch.dtype,
            device: torch.device) -> Tensor:
    try:
        m = torch.tensor(values, dtype=dtype, device=device)
    except (ValueError, TypeError) as exc:
        raise UserError(f"equation.sde.{name}={values} is not a {dim}×{dim} matrix "
                        f"(ragged rows?): {exc}") from None
    if m.shape != (dim, dim):
        raise UserError(f"equation.sde.{name} has shape {tuple(m.shape)}; dim={dim} needs a "
                        f"{dim}×{dim} matrix (a list of {dim} rows of {dim} numbers)")
    return m


def _vector(values: list[float], dim: int, name: str, dtype: torch.dtype,
            device: torch.device) -> Tensor:
    if not values:
        return torch.zeros(dim, dtype=dtype, device=device)
    if len(values) != dim:
        raise UserError(f"equation.sde.{name} has {len(values)} entries; dim={dim} needs {dim}")
    return torch.tensor(values, dtype=dtype, device=device)


def _rowwise_gaussian(mean: Tensor, cov: Tensor, generator: torch.Generator | None) -> Tensor:
    """One N(mean_i, cov_i) draw per row; the symmetric square root tolerates a singular cov."""
    vals, vecs = torch.linalg.eigh(cov)
    root = vecs * torch.sqrt(torch.clamp(vals, min=0.0)).unsqueeze(-2)
    z = _randn(tuple(mean.shape), mean, generator)
    return mean + (root @ z.unsqueeze(-1)).squeeze(-1)


class LinearSDE(SDE):
    r"""dX = (A X + c) dt + σ dW: OU (A = −θ, c = θm) and Brownian motion with drift (A = 0).

    Gaussian from a Gaussian. Mean and covariance from two matrix exponentials, exact and
    differentiable in A, c, σ: exp([[A, c], [0, 0]] t) gives e^{At} and ∫₀ᵗe^{As}ds c; Van Loan's
    exp([[−A, Q], [0, Aᵀ]] t) = [[·, G], [0, F]] gives ∫₀ᵗ e^{As} Q e^{Aᵀs} ds = Fᵀ G, Q = σσᵀ.
    """

    has_exact_transition = True

    def __init__(self, a: Tensor, c: Tensor, sigma: Tensor) -> None:
        super().__init__(a.shape[0])
        self.register_buffer("a", a)
        self.register_buffer("c", c)
        self.register_buffer("sigma", sigma)

    def drift(self, t: Tensor, x: Tensor) -> Tensor:
        return x @ self.a.T + self.c

    def diffusion_sqrt(self, t: Tensor, x: Tensor) -> Tensor:
        return self.sigma / math.sqrt(2.0)

    def drift_divergence(self, t: Tensor, x: Tensor) -> Tensor:
        return torch.trace(self.a).expand(x.shape[0])

    def transition_moments(self, dt: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """X(t + Δ) = Φ X(t) + shift + N(0, cov) per entry of Δ (n,): Φ (n, d, d), shift (n, d),
        cov (n, d, d)."""
        d, n = self.dim, dt.shape[0]
        zero = torch.zeros(n, 1, d + 1, dtype=dt.dtype, device=dt.device)
        top = torch.cat([self.a, self.c[:, None]], dim=1).expand(n, d, d + 1)
        em = torch.matrix_exp(torch.cat([top, zero], dim=1) * dt[:, None, None])
        q = self.sigma @ self.sigma.T
        z = torch.zeros(d, d, dtype=dt.dtype, device=dt.device)
        block = torch.cat([torch.cat([-self.a, q], 1), torch.cat([z, self.a.T], 1)], 0)
        ev = torch.matrix_exp(block * dt[:, None, None])
        noise = ev[:, d:, d:].transpose(-1, -2) @ ev[:, :d, d:]
        return em[:, :d, :d], em[:, :d, d], 0.5 * (noise + noise.transpose(-1, -2))

    def exact_moments(self, t: Tensor, m0: Tensor, c0: Tensor) -> tuple[Tensor, Tensor]:
        phi, shift, noise = self.transition_moments(t)
        mean = (phi @ m0.unsqueeze(-1)).squeeze(-1) + shift
        cov = phi @ c0 @ phi.transpose(-1, -2) + noise
        return mean, 0.5 * (cov + cov.transpose(-1, -2))

    def sample_transition(self, x0: Tensor, t0: Tensor, dt: Tensor,
                          generator: torch.Generator | None = None,
                          substep: float = 1e-3) -> Tensor:
        """Exact: N(Φx0 + shift, cov), the moments computed once per distinct Δt."""
        steps, index = torch.unique(dt, return_inverse=True)
        phi, shift, cov = self.transition_moments(steps)
        mean = (phi[index] @ x0.unsqueeze(-1)).squeeze(-1) + shift[index]
        return _rowwise_gaussian(mean, cov[index], generator)


class DoubleWell(SDE):
    """μᵢ = linear·xᵢ − cubic·xᵢ³ (coordinate-wise; 1-D is the classic case), σ = noise·I."""

    def __init__(self, dim: int, noise: Tensor, linear: Tensor, cubic: Tensor) -> None:
        super().__init__(dim)
        self.register_buffer("noise", noise)
        self.register_buffer("linear", linear)
        self.register_buffer("cubic", cubic)

    def drift(self, t: Tensor, x: Tensor) -> Tensor:
        return self.linear * x - self.cubic * x ** 3

    def drift_divergence(self, t: Tensor, x: Tensor) -> Tensor:
        return (self.linear - 3.0 * self.cubic * x * x).sum(-1)

    def diffusion_sqrt(self, t: Tensor, x: Tensor) -> Tensor:
        eye = torch.eye(self.dim, dtype=self.noise.dtype, device=self.noise.device)
        return self.noise / math.sqrt(2.0) * eye


class CoupledDoubleWell(DoubleWell):
    """μ = (linear·x₁ − cubic·x₁³ + c x₂, −x₂ + c x₁) in 2-D: a double well in x₁ pulled by an
    OU x₂."""

    def __init__(self, noise: Tensor, coupling: Tensor, linear: Tensor, cubic: Tensor) -> None:
        super().__init__(2, noise, linear, cubic)
        self.register_buffer("coupling", coupling)

    def drift(self, t: Tensor, x: Tensor) -> Tensor:
        x1, x2 = x[:, 0], x[:, 1]
        return torch.stack([self.linear * x1 - self.cubic * x1 ** 3 + self.coupling * x2,
                            -x2 + self.coupling * x1], -1)

    def drift_divergence(self, t: Tensor, x: Tensor) -> Tensor:
        return self.linear - 1.0 - 3.0 * self.cubic * x[:, 0] ** 2


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
        """A transition density is marched in log V (:class:`HestonLogVariance`)."""
        return {1: 0.0}

    def in_march_coordinates(self, floor: float = 0.0) -> "HestonLogVariance":
        """The same process in (log S, log V) (no boundary: ``floor`` is not needed)."""
        return HestonLogVariance(self)

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


def _import_module(module_name: str, spec: str, what: str) -> object:
    """A module by file path ("./mydrift.py", "lib/f.py") or by dotted name, the current folder
    searched first for the latter (as ``python script.py`` would; the console script does not)."""
    try:
        if module_name.endswith(".py") or "/" in module_name or os.sep in module_name:
            file = Path(module_name).expanduser()
            if not file.is_file():
                raise UserError(f"equation.sde.{what}={spec!r}: no such file {file.resolve()}")
            loader = importlib.util.spec_from_file_location(f"neuralpde_user_{file.stem}", file)
            if loader is None or loader.loader is None:
                raise UserError(f"equation.sde.{what}={spec!r}: {file} is not a Python file")
            module = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(module)
            return module
        cwd = os.getcwd()
        added = cwd not in sys.path
        if added:
            sys.path.insert(0, cwd)
        try:
            return importlib.import_module(module_name)
        finally:
            if added:
                sys.path.remove(cwd)
    except UserError:
        raise
    except Exception as exc:  # the user's module: import errors, syntax errors, its own failures
        raise UserError(f"equation.sde.{what}={spec!r}: cannot import {module_name!r} "
                        f"({type(exc).__name__}: {exc})") from None


def load_callable(path: str, what: str) -> Callable[..., Tensor]:
    """The function named "package.module:function" or "path/to/file.py:function", or a
    UserError saying what is wrong."""
    if not isinstance(path, str) or ":" not in path or path.endswith(":") or path.startswith(":"):
        raise UserError(f"equation.sde.{what}={path!r} must look like 'package.module:function' "
                        "or 'path/to/file.py:function'")
    module_name, _, attr = path.rpartition(":")
    module = _import_module(module_name, path, what)
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise UserError(f"equation.sde.{what}={path!r}: module {module_name!r} has no callable "
                        f"{attr!r}")
    return fn


class CallableSDE(SDE):
    """μ and σ from user functions f(t (N,), x (N, d)); σ (d, r) constant or (N, d, r).

    Shapes are checked once at construction on probe points; divergences use autograd.
    """

    autonomous = False

    def __init__(self, dim: int, drift: Callable[..., Tensor], diffusion: Callable[..., Tensor] | None,
                 sigma: Tensor | None, names: tuple[str, str], dtype: torch.dtype,
                 device: torch.device, params: Mapping[str, Tensor] | None = None) -> None:
        super().__init__(dim)
        self._drift, self._diffusion = drift, diffusion
        self.register_buffer("sigma", sigma)
        self.param_names = list(params or {})
        for name, value in (params or {}).items():
            self.register_buffer(f"param_{name}", value)
        self._takes = {id(fn): _declared(fn, self.param_names) for fn in (drift, diffusion) if fn}
        unused = [n for n in self.param_names
                  if not any(n in taken for taken in self._takes.values())]
        if unused:
            raise UserError(f"equation.sde.params names {unused[0]!r}, which neither "
                            f"{names[0]!r} nor {names[1] or 'a diffusion callable'!r} takes as an "
                            "argument")
        probe_x = torch.linspace(-1.0, 1.0, 3 * dim, dtype=dtype, device=device).reshape(3, dim) + 1.5
        probe_t = torch.zeros(3, dtype=dtype, device=device)
        mu = self._call(self._drift, names[0], probe_t, probe_x)
        if mu.shape != (3, dim):
            raise UserError(f"equation.sde.drift={names[0]!r} returned shape {tuple(mu.shape)} for "
                            f"x of shape (3, {dim}); it must return (N, d) = (3, {dim})")
        if diffusion is not None:
            s = self._call(diffusion, names[1], probe_t, probe_x)
            if s.dim() == 2 and s.shape[0] == dim:
                self.constant_diffusion = True
            elif not (s.dim() == 3 and s.shape[:2] == (3, dim)):
                raise UserError(f"equation.sde.diffusion={names[1]!r} returned shape "
                                f"{tuple(s.shape)}; it must return σ of shape ({dim}, r) or "
                                f"(N, {dim}, r) = (3, {dim}, r)")
            else:
                self.constant_diffusion = False

    def _kwargs(self, fn: Callable[..., Tensor]) -> dict[str, Tensor]:
        return {n: getattr(self, f"param_{n}") for n in self._takes.get(id(fn), ())}

    def _call(self, fn: Callable[..., Tensor], name: str, t: Tensor, x: Tensor) -> Tensor:
        try:
            out = fn(t, x, **self._kwargs(fn))
        except Exception as exc:  # the user's code: report, do not crash with a traceback
            raise UserError(f"equation.sde callable {name!r} failed on probe input t (N,), "
                            f"x (N, d): {type(exc).__name__}: {exc}") from None
        if not isinstance(out, Tensor):
            raise UserError(f"equation.sde callable {name!r} returned {type(out).__name__}; "
                            "it must return a torch.Tensor")
        return out

    def drift(self, t: Tensor, x: Tensor) -> Tensor:
        return self._drift(t, x, **self._kwargs(self._drift))

    def diffusion_sqrt(self, t: Tensor, x: Tensor) -> Tensor:
        s = self.sigma if self._diffusion is None else \
            self._diffusion(t, x, **self._kwargs(self._diffusion))
        return s / math.sqrt(2.0)


def _declared(fn: Callable[..., Any], names: list[str]) -> tuple[str, ...]:
    """The parameter names ``fn`` accepts as keywords (all of them with ``**kwargs``)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return ()
    if any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values()):
        return tuple(names)
    return tuple(n for n in names if n in sig.parameters)


# --- calibratable parameters ------------------------------------------------------------------
#: the config keys each kind's law depends on, in the order calibration lists them
PARAMETER_KEYS: dict[str, tuple[str, ...]] = {
    "ou": ("theta", "mean", "sigma"),
    "brownian": ("drift_vector", "sigma"),
    "double_well": ("linear", "cubic", "noise"),
    "double_well_2d": ("linear", "cubic", "coupling", "noise"),
    "cir": ("rate", "level", "noise"),
    "cev": ("rate", "level", "noise", "gamma"),
    "gbm": ("rate", "noise"),
    "heston": ("mu", "rate", "level", "noise", "rho"),
    "custom": ("sigma",),  # only without a diffusion callable; the callables have no parameters
}
_MATRICES = ("theta", "sigma")
_VECTORS = ("mean", "drift_vector")
#: scalars that must be > 0 (rate is a growth rate of any sign for gbm)
_POSITIVE = ("noise", "level", "gamma", "cubic")
_NAME = re.compile(r"^([a-z_]+)((?:\[\d+\])*)$")


def _keys(kind: str, has_sigma: bool = True) -> tuple[str, ...]:
    check_choice("equation.sde.kind", kind, KINDS)
    keys = PARAMETER_KEYS[kind]
    return keys if has_sigma or kind != "custom" else ()


def _entries(key: str, dim: int) -> list[tuple[str, tuple[int, ...]]]:
    """(name, index) of each calibratable scalar of ``key``: σ is parametrized by its lower
    triangle (σσᵀ is all the law sees); 1-D matrices and vectors are plain scalars."""
    if key in _MATRICES:
        if dim == 1:
            return [(key, (0, 0))]
        pairs = [(i, j) for i in range(dim) for j in range(dim) if key == "theta" or j <= i]
        return [(f"{key}[{i}][{j}]", (i, j)) for i, j in pairs]
    if key in _VECTORS:
        return [(key, (0,))] if dim == 1 else [(f"{key}[{i}]", (i,)) for i in range(dim)]
    return [(key, ())]


def _names(kind: str, dim: int, has_sigma: bool = True) -> dict[str, tuple[str, tuple[int, ...]]]:
    return {name: (key, index) for key in _keys(kind, has_sigma)
            for name, index in _entries(key, dim)}


def _lookup(kind: str, name: str, dim: int, has_sigma: bool = True) -> tuple[str, tuple[int, ...]]:
    known = _names(kind, dim, has_sigma)
    if name not in known:
        raise UserError(f"{name!r} is not a parameter of equation.sde.kind={kind} (dim={dim}); "
                        f"its parameters are {list(known) or 'none'}")
    return known[name]


def parameter_names(cfg: SDEConfig, dim: int) -> list[str]:
    """The kind's calibratable scalars, flat: ``["theta", "mean", "sigma"]`` for 1-D OU,
    ``["theta[0][0]", …, "mean[1]", "sigma[1][1]"]`` (σ's lower triangle) for 2-D."""
    return list(_names(cfg.kind, dim, has_sigma=not cfg.diffusion)) + _custom_names(cfg)


def _custom_names(cfg: SDEConfig) -> list[str]:
    return list(cfg.params) if cfg.kind == "custom" else []


def parameter_constraint(kind: str, name: str, dim: int, cfg: SDEConfig | None = None) -> str:
    """"positive", "correlation" (in (−1, 1)) or "real": what each parameter must satisfy for
    the SDE to be the one named.

    Positive: noise, level, γ, cubic, the CIR/CEV rate, 1-D θ (mean reversion) and σ's
    diagonal (σ is the lower Cholesky factor of σσᵀ); everything else is real. Stability of a
    d-dimensional θ is a matrix condition, not an entry-wise one, and is left to the caller.
    """
    if cfg is not None and name in _custom_names(cfg):
        return "positive" if name in cfg.positive_params else "real"
    key, index = _lookup(kind, name, dim)
    if key == "rho":
        return "correlation"
    if key in _POSITIVE or (key == "rate" and kind != "gbm"):
        return "positive"
    if key == "sigma" and index[0] == index[1]:
        return "positive"
    if key == "theta" and dim == 1:
        return "positive"
    return "real"


def _cholesky_factor(sigma: Tensor) -> Tensor:
    """The lower-triangular L with positive diagonal and LLᵀ = σσᵀ (σ itself, columns' signs
    flipped, when it is already lower triangular, so a singular σ is kept)."""
    if not torch.any(torch.triu(sigma, diagonal=1) != 0):
        signs = torch.where(torch.diagonal(sigma) < 0, -1.0, 1.0).to(sigma.dtype)
        return sigma * signs
    factor, info = torch.linalg.cholesky_ex(sigma @ sigma.T)
    if int(info) != 0:
        raise UserError(f"equation.sde.sigma={sigma.tolist()} is singular and not lower "
                        "triangular; give it as a lower-triangular matrix to calibrate it")
    return factor


def _config_tensors(cfg: SDEConfig, dim: int, keys: tuple[str, ...], dtype: torch.dtype,
                    device: torch.device, as_factor: bool,
                    given: frozenset[str] = frozenset()) -> dict[str, Tensor]:
    """The kind's parameters from the config as tensors, shapes checked; σ as its Cholesky
    factor when ``as_factor`` (the form calibration names the entries of). Keys in ``given``
    (every entry supplied by the caller) are zeros of the right shape: the config's value,
    perhaps of another dimension, is not read."""
    out = {}
    for key in keys:
        value = getattr(cfg, key)
        if key in given:
            shape = (dim, dim) if key in _MATRICES else (dim,) if key in _VECTORS else ()
            out[key] = torch.zeros(shape, dtype=dtype, device=device)
        elif key in _MATRICES:
            out[key] = _matrix(value, dim, key, dtype, device)
            if key == "sigma" and as_factor:
                out[key] = _cholesky_factor(out[key])
        elif key in _VECTORS:
            out[key] = _vector(value, dim, key, dtype, device)
        else:
            out[key] = torch.tensor(float(value), dtype=dtype, device=device)
    return out


def parameter_values(cfg: SDEConfig, dim: int) -> dict[str, float]:
    """The config's value of every name in :func:`parameter_names` (σ entries of its lower
    Cholesky factor, which equals σ for a lower-triangular σ with positive diagonal)."""
    names = _names(cfg.kind, dim, has_sigma=not cfg.diffusion)
    keys = tuple(dict.fromkeys(key for key, _ in names.values()))
    tensors = _config_tensors(cfg, dim, keys, torch.float64, torch.device("cpu"), as_factor=True)
    return {**{name: float(tensors[key][index]) for name, (key, index) in names.items()},
            **{name: float(v) for name, v in cfg.params.items()}} if cfg.kind == "custom" else \
        {name: float(tensors[key][index]) for name, (key, index) in names.items()}


def _check_config_values(cfg: SDEConfig, replaced: set[str]) -> None:
    """The range checks on config values the caller does not replace."""
    if cfg.kind == "heston":
        for key in ("rate", "level"):
            if key not in replaced and getattr(cfg, key) <= 0:
                raise UserError(f"equation.sde.{key}={getattr(cfg, key)} must be > 0 for kind=heston")
        if "rho" not in replaced and not -1 < cfg.rho < 1:
            raise UserError(f"equation.sde.rho={cfg.rho} must be in (−1, 1) (|ρ| = 1 makes the "
                            "diffusion singular)")
    if cfg.kind in ("double_well", "double_well_2d", "cir", "cev", "gbm", "heston") and \
            "noise" not in replaced and cfg.noise <= 0:
        raise UserError(f"equation.sde.noise={cfg.noise} must be > 0")
    if cfg.kind in ("cir", "cev"):
        for key in ("rate", "level") + (("gamma",) if cfg.kind == "cev" else ()):
            if key not in replaced and getattr(cfg, key) <= 0:
                raise UserError(f"equation.sde.{key}={getattr(cfg, key)} must be > 0 for "
                                f"kind={cfg.kind}")


def build_sde_with(cfg: SDEConfig, dim: int, values: Mapping[str, Tensor | float],
                   dtype: torch.dtype, device: torch.device) -> SDE:
    """The SDE of ``cfg`` with the named entries (:func:`parameter_names`) replaced by the given
    0-d tensors, differentiable in them; the caller keeps them within :func:`parameter_constraint`.
    """
    names = _names(cfg.kind, dim, has_sigma=not cfg.diffusion)
    custom = {n: torch.as_tensor(float(v), dtype=dtype, device=device) for n, v in cfg.params.items()} \
        if cfg.kind == "custom" else {}
    bad = [n for n in cfg.positive_params if n not in cfg.params]
    if bad:
        raise UserError(f"equation.sde.positive_params names {bad[0]!r}, which is not in "
                        f"equation.sde.params {sorted(cfg.params)}")
    values = dict(values)
    for name in [n for n in values if n in custom]:
        custom[name] = torch.as_tensor(values.pop(name), dtype=dtype, device=device)
    for name in values:
        _lookup(cfg.kind, name, dim, has_sigma=not cfg.diffusion)
    replaced = {names[name][0] for name in values}
    _check_config_values(cfg, replaced)
    keys = _keys(cfg.kind, has_sigma=not cfg.diffusion)
    callables = _custom_callables(cfg) if cfg.kind == "custom" else None  # before σ's shape
    given = frozenset(key for key in replaced
                      if all(n in values for n, (k, _) in names.items() if k == key))
    tensors = _config_tensors(cfg, dim, keys, dtype, device, as_factor="sigma" in replaced,
                              given=given)
    cloned: set[str] = set()
    for name, value in values.items():
        key, index = names[name]
        v = torch.as_tensor(value, dtype=dtype, device=device)
        if v.dim() != 0:
            raise UserError(f"build_sde_with: {name!r} needs a 0-d tensor, got shape {tuple(v.shape)}")
        if not index:
            tensors[key] = v
            continue
        if key not in cloned:  # out of place: the config tensors stay untouched
            tensors[key] = tensors[key].clone()
            cloned.add(key)
        tensors[key][index] = v
    return _assemble(cfg, dim, tensors, dtype, device, callables, custom)


def _custom_callables(cfg: SDEConfig) -> tuple[Callable[..., Tensor], Callable[..., Tensor] | None]:
    if not cfg.drift:
        raise UserError("equation.sde.kind=custom needs equation.sde.drift='package.module:function'"
                        " (or 'path/to/file.py:function')")
    drift = load_callable(cfg.drift, "drift")
    return drift, load_callable(cfg.diffusion, "diffusion") if cfg.diffusion else None


def _assemble(cfg: SDEConfig, dim: int, p: dict[str, Tensor], dtype: torch.dtype,
              device: torch.device, callables: tuple | None,
              custom: Mapping[str, Tensor] | None = None) -> SDE:
    """The SDE object of ``cfg.kind`` from its parameter tensors."""
    if cfg.kind == "ou":
        return LinearSDE(-p["theta"], p["theta"] @ p["mean"], p["sigma"])
    if cfg.kind == "brownian":
        zero = torch.zeros(dim, dim, dtype=dtype, device=device)
        return LinearSDE(zero, p["drift_vector"], p["sigma"])
    if cfg.kind == "double_well":
        return DoubleWell(dim, p["noise"], p["linear"], p["cubic"])
    if cfg.kind == "double_well_2d":
        if dim != 2:
            raise UserError(f"equation.sde.kind=double_well_2d needs equation.dim=2 (got {dim})")
        return CoupledDoubleWell(p["noise"], p["coupling"], p["linear"], p["cubic"])
    if cfg.kind == "cir":
        return StateDependentNoise(dim, 0.5, p["noise"], p["rate"], p["level"])
    if cfg.kind == "gbm":
        return StateDependentNoise(dim, 1.0, p["noise"], p["rate"], None)
    if cfg.kind == "cev":
        return CEV(dim, p["gamma"], p["noise"], p["rate"], p["level"])
    if cfg.kind == "heston":
        if dim != 2:
            raise UserError(f"equation.sde.kind=heston has the state (log S, V): equation.dim=2 "
                            f"(got {dim})")
        return Heston(p["mu"], p["rate"], p["level"], p["noise"], p["rho"])
    drift, diffusion = callables
    return CallableSDE(dim, drift, diffusion, p.get("sigma"), (cfg.drift, cfg.diffusion or ""),
                       dtype, device, custom)


def build_sde(cfg: SDEConfig, dim: int, dtype: torch.dtype, device: torch.device) -> SDE:
    """The SDE the config names, its shapes checked against ``dim``."""
    return build_sde_with(cfg, dim, {}, dtype, device)
