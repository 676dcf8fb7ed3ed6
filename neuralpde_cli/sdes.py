"""Itô SDEs dX = μ(t, X) dt + σ(t, X) dW whose Fokker–Planck equations the project solves.

An SDE is a ``torch.nn.Module``: its coefficients are buffers (a calibration can switch on
``requires_grad`` and differentiate the density through them). Every SDE gives its drift μ and
S with D = S Sᵀ = ½σσᵀ, closed-form divergences where they exist (``None`` lets the equation
fall back to autograd), exact Gaussian moments when it is linear, and Euler–Maruyama paths
for the Monte Carlo check.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor

from neuralpde_cli.errors import UserError, check_choice

KINDS = ("ou", "brownian", "double_well", "double_well_2d", "cir", "gbm", "custom")


@dataclass
class SDEConfig:
    #: ou: dX = θ(m − X)dt + σdW; brownian: dX = b dt + σdW; double_well: μ = x − x³ per
    #: coordinate, σ = noise·I; double_well_2d: μ = (x₁ − x₁³ + c x₂, −x₂ + c x₁), σ = noise·I;
    #: cir: dX = κ(level − X)dt + noise·√X dW; gbm: dX = κX dt + noise·X dW (κ = ``rate``);
    #: custom: μ and σ from the importable callables ``drift`` and ``diffusion``.
    kind: str = "ou"
    #: OU drift matrix θ (d × d); the default is non-symmetric (eigenvalues 0.9 ± 0.49i)
    theta: list[list[float]] = field(default_factory=lambda: [[1.0, 0.6], [-0.4, 0.8]])
    #: OU long-run mean m
    mean: list[float] = field(default_factory=lambda: [1.0, -0.5])
    #: noise matrix σ (d × d) of ou, brownian and custom without ``diffusion``; correlated default
    sigma: list[list[float]] = field(default_factory=lambda: [[0.8, 0.0], [0.4, 0.6]])
    #: brownian drift b (empty: zero)
    drift_vector: list[float] = field(default_factory=list)
    #: scalar noise of double_well, double_well_2d, cir, gbm
    noise: float = 0.5
    #: mean-reversion rate κ (cir) or growth rate (gbm)
    rate: float = 1.0
    #: cir long-run level
    level: float = 1.0
    #: double_well_2d coupling c
    coupling: float = 0.5
    #: custom: "package.module:function" with f(t (N,), x (N, d)) → μ (N, d)
    drift: Optional[str] = None
    #: custom: "package.module:function" with f(t, x) → σ, (d, r) constant or (N, d, r)
    diffusion: Optional[str] = None


class SDE(torch.nn.Module):
    """Base: the coefficient interface the Fokker–Planck equation delegates to."""

    #: D independent of x
    constant_diffusion: bool = True
    #: coefficients independent of t (the finite-volume reference factors its matrix once)
    autonomous: bool = True
    #: the process stays above this bound in every coordinate (CIR, GBM: 0), else None
    lower_bound: float | None = None

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

    def euler_maruyama(self, x0: Tensor, times: Tensor, n_paths: int,
                       generator: torch.Generator | None = None, dt: float = 1e-3) -> Tensor:
        """X at each of ``times`` (n_t, n_paths, d) from x0 ((d,) or (n_paths, d)) at t = 0.

        Steps of at most ``dt`` land exactly on every requested time; σ dW = √2 S dW.
        """
        x = x0.expand(n_paths, self.dim).clone()
        out, t = [], 0.0
        for target in times.tolist():
            n = max(1, math.ceil((target - t) / dt - 1e-9)) if target > t else 0
            h = (target - t) / n if n else 0.0
            for _ in range(n):
                tt = torch.full((n_paths,), t, dtype=x.dtype, device=x.device)
                s = self.diffusion_sqrt(tt, x)
                dw = torch.randn(n_paths, s.shape[-1], generator=generator,
                                 dtype=x.dtype).to(x.device) * math.sqrt(2.0 * h)
                noise = dw @ s.T if s.dim() == 2 else (s @ dw.unsqueeze(-1)).squeeze(-1)
                x = self.project(x + h * self.drift(tt, x) + noise)
                t += h
            t = target
            out.append(x.clone())
        return torch.stack(out)

    def project(self, x: Tensor) -> Tensor:
        """Keep a discretized path in the state space (identity unless bounded below)."""
        return x


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


class LinearSDE(SDE):
    r"""dX = (A X + c) dt + σ dW: OU (A = −θ, c = θm) and Brownian motion with drift (A = 0).

    Gaussian from a Gaussian. Mean and covariance from two matrix exponentials, exact and
    differentiable in A, c, σ: exp([[A, c], [0, 0]] t) gives e^{At} and ∫₀ᵗe^{As}ds c; Van Loan's
    exp([[−A, Q], [0, Aᵀ]] t) = [[·, G], [0, F]] gives ∫₀ᵗ e^{As} Q e^{Aᵀs} ds = Fᵀ G, Q = σσᵀ.
    """

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

    def exact_moments(self, t: Tensor, m0: Tensor, c0: Tensor) -> tuple[Tensor, Tensor]:
        d, n = self.dim, t.shape[0]
        zero = torch.zeros(n, 1, d + 1, dtype=t.dtype, device=t.device)
        top = torch.cat([self.a, self.c[:, None]], dim=1).expand(n, d, d + 1)
        em = torch.matrix_exp(torch.cat([top, zero], dim=1) * t[:, None, None])
        phi = em[:, :d, :d]
        mean = (phi @ m0.unsqueeze(-1)).squeeze(-1) + em[:, :d, d]
        q = self.sigma @ self.sigma.T
        z = torch.zeros(d, d, dtype=t.dtype, device=t.device)
        block = torch.cat([torch.cat([-self.a, q], 1), torch.cat([z, self.a.T], 1)], 0)
        ev = torch.matrix_exp(block * t[:, None, None])
        noise = ev[:, d:, d:].transpose(-1, -2) @ ev[:, :d, d:]
        cov = phi @ c0 @ phi.transpose(-1, -2) + noise
        return mean, 0.5 * (cov + cov.transpose(-1, -2))


class DoubleWell(SDE):
    """μᵢ = xᵢ − xᵢ³ (coordinate-wise; 1-D is the classic case), σ = noise·I."""

    def __init__(self, dim: int, noise: Tensor) -> None:
        super().__init__(dim)
        self.register_buffer("noise", noise)

    def drift(self, t: Tensor, x: Tensor) -> Tensor:
        return x - x ** 3

    def drift_divergence(self, t: Tensor, x: Tensor) -> Tensor:
        return (1.0 - 3.0 * x * x).sum(-1)

    def diffusion_sqrt(self, t: Tensor, x: Tensor) -> Tensor:
        eye = torch.eye(self.dim, dtype=self.noise.dtype, device=self.noise.device)
        return self.noise / math.sqrt(2.0) * eye


class CoupledDoubleWell(DoubleWell):
    """μ = (x₁ − x₁³ + c x₂, −x₂ + c x₁) in 2-D: a double well in x₁ pulled by an OU x₂."""

    def __init__(self, noise: Tensor, coupling: Tensor) -> None:
        super().__init__(2, noise)
        self.register_buffer("coupling", coupling)

    def drift(self, t: Tensor, x: Tensor) -> Tensor:
        x1, x2 = x[:, 0], x[:, 1]
        return torch.stack([x1 - x1 ** 3 + self.coupling * x2, -x2 + self.coupling * x1], -1)

    def drift_divergence(self, t: Tensor, x: Tensor) -> Tensor:
        return -3.0 * x[:, 0] ** 2


class StateDependentNoise(SDE):
    r"""Diagonal noise σᵢ(x) = noise·xᵢ^power with power ½ (CIR) or 1 (geometric).

    D = ½noise² diag(x^{2p}), so Σⱼ∂ⱼDᵢⱼ = p·noise²·xᵢ^{2p−1} and Σᵢ∂ᵢ²Dᵢᵢ = p(2p−1)noise²Σxᵢ^{2p−2}.
    CIR drift κ(level − x), geometric drift κx. The state is x > 0; paths are truncated at 0.
    """

    constant_diffusion = False
    lower_bound = 0.0

    def __init__(self, dim: int, power: float, noise: Tensor, rate: Tensor,
                 level: Tensor | None) -> None:
        super().__init__(dim)
        self.power = power
        self.register_buffer("noise", noise)
        self.register_buffer("rate", rate)
        self.register_buffer("level", level if level is not None else torch.zeros_like(rate))
        self.reverting = level is not None

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
        inside = (x > 0).to(x.dtype)  # D = 0 below the bound: no divergence there
        xp = torch.clamp(x, min=0.0)
        div = p * s2 * inside * xp ** (2 * p - 1)
        if p == 0.5:  # D linear in x: no second derivative (and x^{-1} would be 0·∞ at 0)
            return div, torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        return div, (p * (2 * p - 1) * s2 * inside * xp ** (2 * p - 2)).sum(-1)

    def project(self, x: Tensor) -> Tensor:
        return torch.clamp(x, min=0.0)


def load_callable(path: str, what: str) -> Callable[..., Tensor]:
    """The function named "package.module:function", or a UserError saying what is wrong."""
    if not isinstance(path, str) or path.count(":") != 1:
        raise UserError(f"equation.sde.{what}={path!r} must look like 'package.module:function'")
    module_name, attr = path.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UserError(f"equation.sde.{what}={path!r}: cannot import {module_name!r} ({exc})") from None
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
                 device: torch.device) -> None:
        super().__init__(dim)
        self._drift, self._diffusion = drift, diffusion
        self.register_buffer("sigma", sigma)
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

    @staticmethod
    def _call(fn: Callable[..., Tensor], name: str, t: Tensor, x: Tensor) -> Tensor:
        try:
            out = fn(t, x)
        except Exception as exc:  # the user's code: report, do not crash with a traceback
            raise UserError(f"equation.sde callable {name!r} failed on probe input t (N,), "
                            f"x (N, d): {type(exc).__name__}: {exc}") from None
        if not isinstance(out, Tensor):
            raise UserError(f"equation.sde callable {name!r} returned {type(out).__name__}; "
                            "it must return a torch.Tensor")
        return out

    def drift(self, t: Tensor, x: Tensor) -> Tensor:
        return self._drift(t, x)

    def diffusion_sqrt(self, t: Tensor, x: Tensor) -> Tensor:
        s = self.sigma if self._diffusion is None else self._diffusion(t, x)
        return s / math.sqrt(2.0)


def build_sde(cfg: SDEConfig, dim: int, dtype: torch.dtype, device: torch.device) -> SDE:
    """The SDE the config names, its shapes checked against ``dim``."""
    check_choice("equation.sde.kind", cfg.kind, KINDS)
    scalar = lambda v: torch.tensor(float(v), dtype=dtype, device=device)  # noqa: E731
    if cfg.kind in ("double_well", "double_well_2d", "cir", "gbm") and cfg.noise <= 0:
        raise UserError(f"equation.sde.noise={cfg.noise} must be > 0")
    if cfg.kind == "ou":
        theta = _matrix(cfg.theta, dim, "theta", dtype, device)
        mean = _vector(cfg.mean, dim, "mean", dtype, device)
        return LinearSDE(-theta, theta @ mean, _matrix(cfg.sigma, dim, "sigma", dtype, device))
    if cfg.kind == "brownian":
        b = _vector(cfg.drift_vector, dim, "drift_vector", dtype, device)
        zero = torch.zeros(dim, dim, dtype=dtype, device=device)
        return LinearSDE(zero, b, _matrix(cfg.sigma, dim, "sigma", dtype, device))
    if cfg.kind == "double_well":
        return DoubleWell(dim, scalar(cfg.noise))
    if cfg.kind == "double_well_2d":
        if dim != 2:
            raise UserError(f"equation.sde.kind=double_well_2d needs equation.dim=2 (got {dim})")
        return CoupledDoubleWell(scalar(cfg.noise), scalar(cfg.coupling))
    if cfg.kind in ("cir", "gbm"):
        if cfg.kind == "cir" and (cfg.rate <= 0 or cfg.level <= 0):
            raise UserError(f"equation.sde.rate={cfg.rate} and level={cfg.level} must be > 0 "
                            "for kind=cir")
        level = scalar(cfg.level) if cfg.kind == "cir" else None
        return StateDependentNoise(dim, 0.5 if cfg.kind == "cir" else 1.0, scalar(cfg.noise),
                                   scalar(cfg.rate), level)
    if not cfg.drift:
        raise UserError("equation.sde.kind=custom needs equation.sde.drift='package.module:function'")
    drift = load_callable(cfg.drift, "drift")
    diffusion = load_callable(cfg.diffusion, "diffusion") if cfg.diffusion else None
    sigma = None if diffusion is not None else _matrix(cfg.sigma, dim, "sigma", dtype, device)
    return CallableSDE(dim, drift, diffusion, sigma, (cfg.drift, cfg.diffusion or ""), dtype, device)
