"""The interface an equation uses to ask an ansatz for a density and its derivatives."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from neuralpde_cli.equations.base import LogDensityFields


class DensityAnsatz(torch.nn.Module):
    """A model of a density p(t, x) (optionally conditioned), queried through log p.

    Subclasses with closed forms (the Gaussian mixture) override :meth:`log_density_fields`;
    the others get it from autograd and Taylor-mode passes. ``exact_initial_condition`` says the
    parametrization already equals p₀ at t = 0, so no initial-condition phase is needed.
    """

    exact_initial_condition: bool = False
    samplable: bool = False

    def log_density(self, t: Tensor, x: Tensor, cond: Tensor | None = None) -> Tensor:
        """log p(t, x), (N,), for t (N,) and x (N, d)."""
        raise NotImplementedError

    def log_density_fields(self, t: Tensor, x: Tensor, diffusion_sqrt: Tensor, probes: int = 0,
                           generator: torch.Generator | None = None,
                           cond: Tensor | None = None) -> LogDensityFields:
        """ℓ, ∂ₜℓ, ∇ℓ and tr(D∇²ℓ) with D = S Sᵀ; ``probes`` > 0 asks for a Hutchinson estimate."""
        raise NotImplementedError

    def log_density_fields_rowwise(
            self, t: Tensor, x: Tensor, diffusion_sqrt: Tensor,
            generator: torch.Generator | None = None
    ) -> tuple[LogDensityFields, tuple[Tensor, ...], Callable[[tuple[Tensor, ...]], Tensor] | None]:
        """The fields at (tᵢ, xᵢ), plus a shortcut for Gauss–Newton Jacobians where the ansatz
        has one: per-point tensors hᵢ through which alone point i depends on the parameters,
        and the map from weights wᵢ to Σⱼwᵢⱼ∂hᵢⱼ/∂θ (see ``levenberg_marquardt.Residual``).
        None by default."""
        return self.log_density_fields(t, x, diffusion_sqrt, generator=generator), (), None

    def moments(self, t: Tensor) -> tuple[Tensor, Tensor] | None:
        """Mean (n_t, d) and covariance (n_t, d, d) in closed form, if the ansatz has them."""
        return None

    def sample(self, t: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """One draw x ~ p(t_i, ·) per entry of t (reparameterized), (N, d)."""
        raise NotImplementedError(f"{type(self).__name__} cannot sample")


def hutchinson_directions(diffusion_sqrt: Tensor, n: int, probes: int,
                          generator: torch.Generator | None) -> Tensor:
    """Directions v with Σ_v vᵀHv = tr(DH): S's columns (exact) or S·ε/√m, ε Rademacher.

    Returns (m, d) when S is shared, (N, m, d) when S is per point.
    """
    s = diffusion_sqrt
    if probes <= 0:
        return s.transpose(-1, -2)
    r = s.shape[-1]
    shape = (n, probes, r) if s.dim() == 3 else (probes, r)
    eps = torch.randint(0, 2, shape, generator=generator, device="cpu").to(s) * 2 - 1
    return (eps @ s.transpose(-1, -2)) / probes ** 0.5
