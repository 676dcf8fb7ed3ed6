"""Linear SDEs dX = (A X + c) dt + σ dW: OU and Brownian motion with drift (Gaussian laws)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from neuralpde_cli.sdes.base import SDE, _rowwise_gaussian


class LinearSDE(SDE):
    r"""dX = (A X + c) dt + σ dW: OU (A = −θ, c = θm) and Brownian motion with drift (A = 0).

    Gaussian from a Gaussian. Mean and covariance from two matrix exponentials, exact and
    differentiable in A, c, σ: exp([[A, c], [0, 0]] t) gives e^{At} and ∫₀ᵗe^{As}ds c; Van Loan's
    exp([[−A, Q], [0, Aᵀ]] t) = [[·, G], [0, F]] gives ∫₀ᵗ e^{As} Q e^{Aᵀs} ds = Fᵀ G, Q = σσᵀ.
    """

    has_exact_transition = True

    def __init__(self, a: Tensor, c: Tensor, sigma: Tensor,
                 invariant_dims: tuple[int, ...] = ()) -> None:
        super().__init__(a.shape[0])
        #: coordinates the coefficients do not depend on (Brownian motion: all of them), so a
        #: transition density marched from one start serves every other by a shift
        self.invariant_dims = invariant_dims
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


def ou(dim: int, p: dict[str, Tensor], dtype: torch.dtype, device: torch.device) -> LinearSDE:
    """dX = θ(m − X) dt + σ dW."""
    return LinearSDE(-p["theta"], p["theta"] @ p["mean"], p["sigma"])


def brownian(dim: int, p: dict[str, Tensor], dtype: torch.dtype, device: torch.device) -> LinearSDE:
    """dX = b dt + σ dW."""
    return LinearSDE(torch.zeros(dim, dim, dtype=dtype, device=device), p["drift_vector"],
                     p["sigma"], invariant_dims=tuple(range(dim)))
