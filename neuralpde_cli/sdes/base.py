"""The config and the base class every SDE family shares: its coefficients, the march's
Box–Cox coordinates, and the samplers' random draws."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

from neuralpde_cli.errors import UserError


@dataclass
class SDEConfig:
    #: ou: dX = θ(m − X)dt + σdW; brownian: dX = b dt + σdW; double_well: μ = linear·x − cubic·x³
    #: per coordinate, σ = noise·I; double_well_2d: μ = (linear·x₁ − cubic·x₁³ + c x₂, −x₂ + c x₁),
    #: σ = noise·I; cir: dX = κ(level − X)dt + noise·√X dW; cev: dX = κ(level − X)dt +
    #: noise·X^γ dW; gbm: dX = κX dt + noise·X dW (κ = ``rate``); heston (below); merton: dX =
    #: mu dt + noise dW + J dN (X = log S; J ~ N(jump_mean, jump_std²) at rate jump_rate);
    #: bates: heston plus those jumps in log S; custom: μ and σ from the callables ``drift`` and
    #: ``diffusion``.
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
    #: merton, bates: jumps J dN in X (log S), N Poisson of rate jump_rate per unit time,
    #: J ~ N(jump_mean, jump_std²)
    jump_rate: float = 5.0
    jump_mean: float = -0.03
    jump_std: float = 0.05
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
