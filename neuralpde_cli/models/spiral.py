r"""The cubic spiral SDE of the DiffEqFlux "neural SDE" post, its jump variant, their neural
versions, and a batched path simulator that handles both.

Spiral (Itô, diagonal noise): du = f(u)dt + diag(g(u))dW, f(u) = ((u³)ᵀA)ᵀ,
A = [[−0.1, 2], [−2, −0.1]], g(u) = 0.2·u, u₀ = (2, 0). Jump diffusion: the same plus jumps at
the events of a Poisson process of rate λ = 2, each mapping u ↦ (u₁/2, u₂).

The SDEs subclass :class:`neuralpde_cli.sdes.SDE` (drift μ and S = σ/√2, what the likelihoods
read) and add ``noise(t, x)``, the diagonal g itself, for the simulator.

Simulator (:func:`simulate`): each step of length h takes the drift by Heun's rule and the noise
at the left point (Itô),

    ũ = u + f(u)h + g(u)ΔW,   u ← u + ½(f(u) + f(ũ))h + g(u)ΔW,

so the deterministic part is second order; the cubic drift is what makes Euler–Maruyama need
h ≤ 1e-4 here (its mean at t = 1 is off by ≈ 0.07 at h = 1e-3), while this scheme's mean at
h = 1/290 agrees with Euler–Maruyama at 1e-4 within the sampling error (README § Learning
dynamics). Jump times are drawn per path beforehand (the rate is constant, so they do not
depend on any parameter); a step that contains an event is split at it, the jump map applied
there, so events sit at their exact times and gradients through the jump map are exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from neuralpde_cli.sdes import SDE

#: the post's drift matrix
SPIRAL_A = [[-0.1, 2.0], [-2.0, -0.1]]


# --- SDEs ------------------------------------------------------------------------------------
class DiagonalNoiseSDE(SDE):
    """dX = μ(X)dt + diag(g(X))dW in 2-D; S = diag(g)/√2 for the project's likelihoods."""

    constant_diffusion = False

    def noise(self, t: Tensor, x: Tensor) -> Tensor:
        """g(t, x), (N, d): the diagonal of σ."""
        raise NotImplementedError

    def diffusion_sqrt(self, t: Tensor, x: Tensor) -> Tensor:
        return torch.diag_embed(self.noise(t, x)) / math.sqrt(2.0)


class SpiralSDE(DiagonalNoiseSDE):
    """The true spiral: f(u) = ((u³)ᵀA)ᵀ, g(u) = noise·u."""

    def __init__(self, a: Tensor, noise: float) -> None:
        super().__init__(2)
        self.register_buffer("a", a)
        self.noise_scale = float(noise)

    def drift(self, t: Tensor, x: Tensor) -> Tensor:
        return (x ** 3) @ self.a

    def noise(self, t: Tensor, x: Tensor) -> Tensor:
        return self.noise_scale * x


class CubicDrift(torch.nn.Module):
    """The post's drift network: u ↦ W₂ tanh(W₁u³ + b₁) + b₂."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.inner = torch.nn.Linear(2, hidden)
        self.outer = torch.nn.Linear(hidden, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.outer(torch.tanh(self.inner(x ** 3)))


class DiagonalNoiseNet(torch.nn.Module):
    """g(u) ∈ R² by a tanh MLP. Only g² enters the law, so it may learn 0.2·u (smooth) rather
    than 0.2·|u| (a kink); the learned diffusion is reported as |g|."""

    def __init__(self, hidden: int, scale: float = 0.1) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(2, hidden), torch.nn.Tanh(),
                                       torch.nn.Linear(hidden, 2))
        with torch.no_grad():  # start near a small constant noise: paths neither explode nor freeze
            self.net[2].weight.mul_(0.1)
            self.net[2].bias.fill_(scale)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class AdditiveNoise(torch.nn.Module):
    """A learned constant g ∈ R²."""

    def __init__(self, scale: float = 0.1) -> None:
        super().__init__()
        self.g = torch.nn.Parameter(torch.full((2,), scale))

    def forward(self, x: Tensor) -> Tensor:
        return self.g.expand(x.shape[0], 2)


class NeuralSDE(DiagonalNoiseSDE):
    """Drift network, and a diffusion that is fixed at noise_scale·u (``noise=fixed``, the
    truth's) or learned (``diagonal``: a network g(u); ``additive``: a constant)."""

    def __init__(self, hidden: int, noise: str, noise_scale: float) -> None:
        super().__init__(2)
        self.drift_net = CubicDrift(hidden)
        self.noise_kind, self.noise_scale = noise, float(noise_scale)
        self.noise_net = DiagonalNoiseNet(hidden) if noise == "diagonal" else \
            AdditiveNoise() if noise == "additive" else None

    def drift(self, t: Tensor, x: Tensor) -> Tensor:
        return self.drift_net(x)

    def noise(self, t: Tensor, x: Tensor) -> Tensor:
        return self.noise_scale * x if self.noise_net is None else self.noise_net(x)


# --- jumps -----------------------------------------------------------------------------------
class ScaleFirst(torch.nn.Module):
    """The true jump map u ↦ (factor·u₁, u₂)."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = float(factor)

    def forward(self, x: Tensor) -> Tensor:
        return torch.stack([self.factor * x[:, 0], x[:, 1]], dim=-1)


class JumpMapNet(torch.nn.Module):
    """u ↦ u + MLP(u), starting at the identity (the last layer is zero)."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(2, hidden), torch.nn.Tanh(),
                                       torch.nn.Linear(hidden, 2))
        with torch.no_grad():
            self.net[2].weight.zero_()
            self.net[2].bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        return x + self.net(x)


@dataclass
class Jumps:
    """Jump events of each path: times (n_paths, K) sorted, +inf where a path has fewer."""

    times: Tensor
    rate: float

    @classmethod
    def sample(cls, rate: float, t0: float, t1: float, n_paths: int, generator: torch.Generator,
               dtype: torch.dtype, device: torch.device) -> "Jumps":
        """A Poisson process of ``rate`` on (t0, t1] per path: a Poisson count, then uniform
        times, sorted."""
        kw = {"generator": generator, "device": generator.device}
        mean = torch.full((n_paths,), rate * (t1 - t0), dtype=torch.float64, device=generator.device)
        counts = torch.poisson(mean, generator=generator).long()
        k = int(counts.max()) if n_paths else 0
        u = torch.rand(n_paths, max(k, 1), dtype=torch.float64, **kw)
        times = t0 + (t1 - t0) * u
        keep = torch.arange(max(k, 1), device=generator.device)[None, :] < counts[:, None]
        times = torch.where(keep, times, torch.full_like(times, math.inf)).sort(dim=1).values
        return cls(times.to(dtype=dtype, device=device), rate)


def brownian(shape: tuple[int, ...], h: Tensor, generator: torch.Generator, like: Tensor) -> Tensor:
    """ΔW over steps h (n,) ≥ 0: N(0, h) per entry."""
    z = torch.randn(*shape, generator=generator, dtype=like.dtype, device=generator.device)
    return z.to(like.device) * torch.sqrt(h)[:, None]


def heun_step(sde: DiagonalNoiseSDE, t: Tensor, x: Tensor, h: Tensor, dw: Tensor) -> Tensor:
    """One step per row with its own length h (n,): Heun for the drift, Itô (left-point) noise."""
    f0 = sde.drift(t, x)
    noise = sde.noise(t, x) * dw
    guess = x + f0 * h[:, None] + noise
    return x + 0.5 * (f0 + sde.drift(t + h, guess)) * h[:, None] + noise


def simulate(sde: DiagonalNoiseSDE, x0: Tensor, times: Tensor, n_paths: int, substeps: int,
             generator: torch.Generator, jumps: Jumps | None = None,
             jump_map: torch.nn.Module | None = None) -> Tensor:
    """Paths at ``times`` (n_t, n_paths, d) from x0 (d,) at times[0]; ``substeps`` equal steps
    per interval, each split at the jump events inside it. Differentiable in the SDE's and the
    jump map's parameters (the noise and the event times are drawn, not computed)."""
    x = x0.expand(n_paths, x0.shape[-1]).clone()
    out = [x]
    events = jumps.times if jumps is not None and jumps.times.shape[1] else None
    k = torch.zeros(n_paths, dtype=torch.long, device=x.device)  # next event of each path
    for a, b in zip(times[:-1].tolist(), times[1:].tolist()):
        h = (b - a) / substeps
        for j in range(substeps):
            t_start, t_end = a + j * h, (a + (j + 1) * h if j < substeps - 1 else b)
            now = x.new_full((n_paths,), t_start)
            if events is None:
                step = x.new_full((n_paths,), t_end - t_start)
                x = heun_step(sde, now, x, step, brownian(tuple(x.shape), step, generator, x))
                continue
            while True:  # to the next event or the step's end, whichever comes first
                nxt = events.gather(1, k.clamp(max=events.shape[1] - 1)[:, None])[:, 0]
                hit = (k < events.shape[1]) & (nxt <= t_end)
                target = torch.where(hit, nxt, torch.full_like(nxt, t_end))
                step = (target - now).clamp(min=0.0)
                if bool((step > 0).any()):
                    x = heun_step(sde, now, x, step, brownian(tuple(x.shape), step, generator, x))
                now = target
                if not bool(hit.any()):
                    break
                x = torch.where(hit[:, None], jump_map(x), x)
                k = k + hit.long()
        out.append(x)
    return torch.stack(out)


def mean_path_loss(model_paths: Tensor, data_mean: Tensor) -> Tensor:
    """Σ over times and coordinates of (mean of the model paths − data mean)²: the post's loss
    with n model paths instead of one."""
    return ((model_paths.mean(1) - data_mean) ** 2).sum()


def torchsde_paths(sde: DiagonalNoiseSDE, x0: Tensor, times: Tensor, n_paths: int, dt: float,
                   seed: int) -> Tensor:
    """Paths (n_t, n_paths, d) by torchsde's srk (strong order 1.5, space-time Lévy area) with
    fixed step ``dt``: the data generator, independent of :func:`simulate`."""
    import torchsde

    class _Wrapped(torch.nn.Module):
        sde_type, noise_type = "ito", "diagonal"

        def f(self, t: Tensor, y: Tensor) -> Tensor:
            return sde.drift(t, y)

        def g(self, t: Tensor, y: Tensor) -> Tensor:
            return sde.noise(t, y)

    t = times.to(device=x0.device)
    bm = torchsde.BrownianInterval(float(t[0]), float(t[-1]), (n_paths, x0.shape[-1]),
                                   dtype=x0.dtype, device=x0.device,
                                   levy_area_approximation="space-time", entropy=seed)
    with torch.no_grad():
        return torchsde.sdeint(_Wrapped(), x0.expand(n_paths, -1).contiguous(), t, bm=bm,
                               method="srk", dt=dt)
