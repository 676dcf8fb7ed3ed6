r"""A Gaussian transition density whose mean and covariance follow the SDE's moment equations.

From X(t₀) = x₀, the mean m and covariance P of X(t₀ + Δ) are integrated over Δ by RK4 sub-steps
of the linearized (assumed-Gaussian) moment equations

    m′ = μ(t, m),    P′ = J P + P Jᵀ + σσᵀ(t, m),    m(0) = x₀, P(0) = 0,

with J = ∂μ/∂x at m (autograd, kept in the graph). For a linear SDE (OU) these equations are
exact, so the density is the exact transition density (tests/test_neural_dynamics.py). For a
nonlinear drift it is the linear-noise approximation: unlike Euler's N(x₀ + μΔ, σσᵀΔ) it lets
the drift shape the covariance (the cubic spiral's Jacobian is ≈ 24 at |u| = 2, so over
Δ = 1/29 Euler's covariance is far off), and its remaining bias at the spiral's Δ is measured in
benchmarks/neural_dynamics.py against the project's Fokker–Planck density
(:mod:`neuralpde_cli.likelihood.pde`) and by a parametric fit on many paths.

Works for any :class:`~neuralpde_cli.sdes.SDE` whose coefficients are torch functions —
networks included — and is differentiable in their parameters.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from neuralpde_cli.sdes import SDE

LOG_2PI = math.log(2.0 * math.pi)


def _jacobian(sde: SDE, t: Tensor, m: Tensor) -> tuple[Tensor, Tensor]:
    """μ(t, m) (n, d) and J = ∂μ/∂x (n, d, d) at each row, both in the autograd graph."""
    with torch.enable_grad():
        x = m if m.requires_grad else m.detach().requires_grad_(True)
        mu = sde.drift(t, x)
        rows = [torch.autograd.grad(mu[:, i].sum(), x, create_graph=True)[0]
                for i in range(mu.shape[1])]
    return mu, torch.stack(rows, dim=1)


def _rates(sde: SDE, t: Tensor, m: Tensor, p: Tensor) -> tuple[Tensor, Tensor]:
    mu, jac = _jacobian(sde, t, m)
    s = sde.diffusion_sqrt(t, m)
    q = 2.0 * s @ s.transpose(-1, -2)
    jp = jac @ p
    return mu, jp + jp.transpose(-1, -2) + q


def moment_moments(sde: SDE, x0: Tensor, t0: Tensor, dt: Tensor, substeps: int) -> tuple[Tensor, Tensor]:
    """Mean (n, d) and covariance (n, d, d) of X(t₀ + Δ) given X(t₀) = x₀, per row."""
    n, d = x0.shape
    m = x0
    p = torch.zeros(n, d, d, dtype=x0.dtype, device=x0.device)
    h = dt / substeps
    hm, hp = h[:, None], h[:, None, None]
    t = t0
    for _ in range(substeps):
        k1m, k1p = _rates(sde, t, m, p)
        k2m, k2p = _rates(sde, t + 0.5 * h, m + 0.5 * hm * k1m, p + 0.5 * hp * k1p)
        k3m, k3p = _rates(sde, t + 0.5 * h, m + 0.5 * hm * k2m, p + 0.5 * hp * k2p)
        k4m, k4p = _rates(sde, t + h, m + hm * k3m, p + hp * k3p)
        m = m + hm / 6.0 * (k1m + 2.0 * k2m + 2.0 * k3m + k4m)
        p = p + hp / 6.0 * (k1p + 2.0 * k2p + 2.0 * k3p + k4p)
        t = t + h
    return m, 0.5 * (p + p.transpose(-1, -2))


def flow_mean(sde: SDE, x0: Tensor, t0: Tensor, dt: Tensor, substeps: int) -> Tensor:
    """m(t₀ + Δ) of the mean equation m′ = μ(t, m) alone (RK4): the noise-free one-step
    prediction, which trains a drift before any diffusion is fitted (no Jacobian needed)."""
    h = dt / substeps
    hm = h[:, None]
    m, t = x0, t0
    for _ in range(substeps):
        k1 = sde.drift(t, m)
        k2 = sde.drift(t + 0.5 * h, m + 0.5 * hm * k1)
        k3 = sde.drift(t + 0.5 * h, m + 0.5 * hm * k2)
        k4 = sde.drift(t + h, m + hm * k3)
        m = m + hm / 6.0 * (k1 + 2.0 * k2 + 2.0 * k3 + k4)
        t = t + h
    return m


def moment_log_density(sde: SDE, x0: Tensor, x1: Tensor, t0: Tensor, dt: Tensor,
                       substeps: int = 4) -> Tensor:
    """log N(x₁; m, P) per transition: x0, x1 (n, d), t0, dt (n,) → (n,).

    A covariance that is not positive definite (a diffusion that vanishes where the path goes)
    gives −inf for that transition rather than an exception, so a training step can roll back.
    """
    graph = torch.is_grad_enabled()  # the Jacobian needs autograd even under no_grad
    mean, cov = moment_moments(sde, x0, t0, dt, substeps)
    if not graph:
        mean, cov = mean.detach(), cov.detach()
    chol, info = torch.linalg.cholesky_ex(cov)
    bad = info != 0
    if bool(bad.any()):
        eye = torch.eye(x0.shape[1], dtype=cov.dtype, device=cov.device)
        chol = torch.where(bad[:, None, None], eye, chol)
    z = torch.linalg.solve_triangular(chol, (x1 - mean).unsqueeze(-1), upper=False).squeeze(-1)
    log_det = 2.0 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
    out = -0.5 * (z * z).sum(-1) - 0.5 * log_det - 0.5 * x0.shape[1] * LOG_2PI
    return torch.where(bad, torch.full_like(out, -math.inf), out)
