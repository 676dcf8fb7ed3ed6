r"""Jump diffusions: a diffusion plus compound-Poisson jumps of Gaussian size (Merton, Bates).

dX = μ(X)dt + σ(X)dW + J dN, N a Poisson process of rate λ, J ~ N(m_J, S_J) independent of
everything else. Where the coefficients μ, σ do not depend on the coordinates the jumps move
(Merton: constant coefficients; Bates: Heston's, which do not depend on log S), a jump shifts
the path without changing what happens next, so over Δ the law is the diffusion's law,
convolved with the n jumps that arrived:

    p(x₁ | x₀; Δ) = Σₙ Pois(n; λΔ) ∫ p_diff(x₁ − j | x₀; Δ) N(j; n m_J, n S_J) dj.

A Gaussian mixture convolved with a Gaussian is a Gaussian mixture (each component's mean moves
by n m_J, its covariance grows by n S_J), so the transition density stays in the ansatz's family
in closed form: the diffusion part is marched, the jumps are added when the law is read
(``likelihood.pde``). The sum is cut where the Poisson tail is below :data:`POISSON_TAIL`.
Why not a jump term in the march: a Galerkin march only moves the components it has, and the
mass that jumps lands where no component is, so it has nowhere to go.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from neuralpde_cli.errors import UserError
from neuralpde_cli.sdes.base import SDE, _randn
from neuralpde_cli.sdes.heston import heston
from neuralpde_cli.sdes.linear import brownian

#: the Poisson probability left out of a jump sum: far below any density's error
POISSON_TAIL = 1e-14
#: more jumps than this in one transition is not a jump diffusion's regime but a diffusion's
MAX_JUMPS = 200


def poisson_terms(mean_jumps: float) -> int:
    """The largest number of jumps n kept: P(N > n) < POISSON_TAIL for N ~ Pois(mean_jumps)."""
    if not math.isfinite(mean_jumps) or mean_jumps < 0:
        raise UserError(f"the expected number of jumps per transition is {mean_jumps:g}; the "
                        "jump rate must be finite and ≥ 0")
    pmf, cdf, n = math.exp(-mean_jumps), 0.0, 0
    while True:
        cdf += pmf
        if 1.0 - cdf < POISSON_TAIL or (pmf < POISSON_TAIL and n > mean_jumps):
            return n
        n += 1
        if n > MAX_JUMPS:
            raise UserError(f"jump_rate × Δt = {mean_jumps:.3g} jumps per transition: more than "
                            f"{MAX_JUMPS} are likely, which a jump diffusion does not describe "
                            "(lower equation.sde.jump_rate, or fit a diffusion)")
        pmf *= mean_jumps / n


def poisson_log_weights(mean_jumps: Tensor, terms: int) -> Tensor:
    """log Pois(n; mean_jumps) for n = 0 … terms: (…, terms + 1), differentiable in the mean."""
    n = torch.arange(terms + 1, dtype=mean_jumps.dtype, device=mean_jumps.device)
    lam = mean_jumps.unsqueeze(-1)
    safe = torch.clamp(lam, min=torch.finfo(lam.dtype).tiny)
    return torch.where(n == 0, -lam, n * torch.log(safe) - lam - torch.lgamma(n + 1.0))


class GaussianJumps(torch.nn.Module):
    """Jumps of rate λ (per unit time) and size J ~ N(mean, cov) in the state's coordinates
    (zero rows and columns for the coordinates that do not jump)."""

    def __init__(self, rate: Tensor, mean: Tensor, cov: Tensor) -> None:
        super().__init__()
        self.register_buffer("rate", rate)
        self.register_buffer("mean", mean)
        self.register_buffer("cov", cov)

    @property
    def dims(self) -> tuple[int, ...]:
        """The coordinates the jumps move."""
        moved = (self.cov.detach().abs().sum(0) > 0) | (self.mean.detach() != 0)
        return tuple(int(i) for i in torch.nonzero(moved).reshape(-1))

    def terms(self, dt: Tensor) -> int:
        """How many jumps a sum over these steps keeps (:func:`poisson_terms` of the longest)."""
        return poisson_terms(float((self.rate * dt.max()).detach()))

    def log_weights(self, dt: Tensor, terms: int) -> Tensor:
        """log P(n jumps in Δ) (…, terms + 1) for each Δ in ``dt``."""
        return poisson_log_weights(self.rate * dt, terms)

    def sample(self, dt: Tensor, dim: int, generator: torch.Generator | None) -> Tensor:
        """The sum of the jumps over Δ per row (n, d): exact (n ~ Pois(λΔ), then N(n·m, n·S))."""
        like = {"dtype": dt.dtype, "device": generator.device if generator is not None else dt.device}
        count = torch.poisson((self.rate * dt).detach().to(**like), generator=generator).to(dt.device)
        z = _randn((dt.shape[0], dim), dt, generator)
        vals, vecs = torch.linalg.eigh(self.cov)
        root = vecs * torch.sqrt(torch.clamp(vals, min=0.0))
        return count[:, None] * self.mean + torch.sqrt(count)[:, None] * (z @ root.T)


class JumpDiffusion(SDE):
    """A diffusion (any :class:`SDE` whose coefficients ignore the jumping coordinates) plus
    :class:`GaussianJumps`. Its drift and diffusion are the diffusion's: what the Fokker–Planck
    march and the Gaussian baselines see. ``jumps`` is read by whoever forms a transition law."""

    def __init__(self, diffusion: SDE, jumps: GaussianJumps) -> None:
        super().__init__(diffusion.dim)
        self.diffusion, self.jumps = diffusion, jumps
        invariant = set(getattr(diffusion, "invariant_dims", ()))
        moved = set(jumps.dims)
        if not moved <= invariant or moved & set(diffusion.march_coordinates()):
            raise UserError(f"jumps in coordinates {sorted(moved)} need coefficients that do not "
                            f"depend on them (here only {sorted(invariant)} qualify) and no change "
                            "of coordinates there")
        self.invariant_dims = tuple(sorted(invariant))
        self.positive_dims = tuple(getattr(diffusion, "positive_dims", ()))
        self.constant_diffusion = diffusion.constant_diffusion
        self.autonomous = diffusion.autonomous
        self.lower_bound = diffusion.lower_bound
        self.has_exact_transition = diffusion.has_exact_transition

    @property
    def transition_scheme(self) -> str:
        return f"{self.diffusion.transition_scheme} diffusion, exact compound-Poisson jumps"

    def drift(self, t: Tensor, x: Tensor) -> Tensor:
        return self.diffusion.drift(t, x)

    def diffusion_sqrt(self, t: Tensor, x: Tensor) -> Tensor:
        return self.diffusion.diffusion_sqrt(t, x)

    def drift_divergence(self, t: Tensor, x: Tensor) -> Tensor | None:
        return self.diffusion.drift_divergence(t, x)

    def diffusion_divergences(self, t: Tensor, x: Tensor) -> tuple[Tensor, Tensor] | None:
        return self.diffusion.diffusion_divergences(t, x)

    def project(self, x: Tensor) -> Tensor:
        return self.diffusion.project(x)

    def march_coordinates(self) -> dict[int, float | Tensor]:
        return self.diffusion.march_coordinates()

    def in_march_coordinates(self, floor: Tensor | float = 0.0) -> "JumpDiffusion":
        """The diffusion in its march coordinates with the same jumps (they move coordinates
        the change leaves alone)."""
        return JumpDiffusion(self.diffusion.in_march_coordinates(floor), self.jumps)

    def sample_transition(self, x0: Tensor, t0: Tensor, dt: Tensor,
                          generator: torch.Generator | None = None,
                          substep: float = 1e-3) -> Tensor:
        """The diffusion's transition, then the jumps' sum over Δ: exact in law, since the
        coefficients do not see the coordinates that jumped (no jump times are needed)."""
        x = self.diffusion.sample_transition(x0, t0, dt, generator, substep)
        return x + self.jumps.sample(dt, self.dim, generator)

    def euler_maruyama(self, x0: Tensor, times: Tensor, n_paths: int,
                       generator: torch.Generator | None = None, dt: float = 1e-3) -> Tensor:
        """Paths of the diffusion at ``times`` plus the jumps accumulated up to each time."""
        paths = self.diffusion.euler_maruyama(x0, times, n_paths, generator, dt)
        previous, total, out = 0.0, torch.zeros_like(paths[0]), []
        for k, target in enumerate(times.tolist()):
            step = paths.new_full((n_paths,), max(target - previous, 0.0))
            total = total + self.jumps.sample(step, self.dim, generator)
            previous = max(previous, target)
            out.append(paths[k] + total)
        return torch.stack(out)


def _jumps(dim: int, axis: int, p: dict[str, Tensor]) -> GaussianJumps:
    """Jumps of N(jump_mean, jump_std²) in coordinate ``axis`` at rate jump_rate."""
    unit = torch.zeros(dim, dtype=p["jump_mean"].dtype, device=p["jump_mean"].device)
    unit[axis] = 1.0
    mean = p["jump_mean"] * unit
    cov = p["jump_std"] ** 2 * torch.outer(unit, unit)
    return GaussianJumps(p["jump_rate"], mean, cov)


def merton(dim: int, p: dict[str, Tensor], dtype: torch.dtype, device: torch.device) -> JumpDiffusion:
    """Merton (1976): dX = mu dt + noise dW + J dN in 1-D (X = log S)."""
    if dim != 1:
        raise UserError(f"equation.sde.kind=merton is one-dimensional (X = log S): equation.dim=1 "
                        f"(got {dim})")
    sigma = p["noise"].reshape(1, 1)
    diffusion = brownian(1, {"drift_vector": p["mu"].reshape(1), "sigma": sigma}, dtype, device)
    return JumpDiffusion(diffusion, _jumps(1, 0, p))


def bates(dim: int, p: dict[str, Tensor], dtype: torch.dtype, device: torch.device) -> JumpDiffusion:
    """Bates (1996): Heston in (log S, V) plus jumps J dN in log S."""
    return JumpDiffusion(heston(dim, p, dtype, device), _jumps(dim, 0, p))
