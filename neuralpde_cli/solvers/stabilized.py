r"""Integrators for stiff method-of-lines systems y' = F(y) in torch: stabilized explicit
Runge–Kutta (RKC2, RKL2), classical RK4, and an adaptive explicit baseline (torchdiffeq).

Why stabilized: a diffusion stencil has eigenvalues spread along the negative real axis up to
ρ ≈ 8D/dx² (2-D, 5 points). Classical explicit RK is stable only for hρ ≲ 2.8, so an adaptive
one (dopri5, bosh3) is held at h ≈ 2.8/ρ whatever its tolerance. An s-stage stabilized method
keeps the stability polynomial bounded on [−β(s), 0] with β growing like s², so a step of
length h costs s ∝ √(hρ) evaluations instead of hρ/2.8.

* **RKC2** (Sommeijer, Shampine and Verwer 1997): damped Chebyshev, w₀ = 1 + ε/s², ε = 2/13,
  β(s) = (1 + w₀)/w₁ ≈ 0.653 s².
* **RKL2** (Meyer, Balsara and Aslam 2014): Legendre, β(s) = (s² + s − 2)/2.

Both are second order with closed-form recurrence coefficients and the same three-term stage
form (below), so the whole step is plain tensor arithmetic and differentiable end to end. The
stage count is the smallest s with β(s) ≥ safety·hρ, from a spectral-radius bound or power
iteration; a count above the cap is an error naming the cap, never a silent slow run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from neuralpde_cli.errors import UserError, check_choice

STABILIZED = ("rkl2", "rkc2")
ADAPTIVE = ("dopri5", "bosh3")
METHODS = STABILIZED + ("rk4",) + ADAPTIVE
#: stability boundary on the negative real axis of classical RK4
RK4_BOUNDARY = 2.785
#: RKC2's damping
RKC2_EPS = 2.0 / 13.0

RHS = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class Stages:
    """The recurrence of an s-stage method, index j = 1 … s (entry 0 unused):
    Y₁ = y + μ̃₁hF(y);  Yⱼ = (1 − μⱼ − νⱼ)y + μⱼYⱼ₋₁ + νⱼYⱼ₋₂ + μ̃ⱼhF(Yⱼ₋₁) + γ̃ⱼhF(y)."""

    s: int
    mu: tuple[float, ...]
    nu: tuple[float, ...]
    mu_t: tuple[float, ...]
    gamma_t: tuple[float, ...]
    #: real stability boundary: the method is stable for hλ ∈ [−beta, 0]
    beta: float


def _chebyshev(s: int, w: float) -> tuple[list[float], list[float], list[float]]:
    """T_j(w), T_j'(w), T_j''(w) for j = 0 … s by the three-term recurrence."""
    t, d1, d2 = [1.0, w], [0.0, 1.0], [0.0, 0.0]
    for j in range(2, s + 1):
        t.append(2.0 * w * t[j - 1] - t[j - 2])
        d1.append(2.0 * t[j - 1] + 2.0 * w * d1[j - 1] - d1[j - 2])
        d2.append(4.0 * d1[j - 1] + 2.0 * w * d2[j - 1] - d2[j - 2])
    return t, d1, d2


def rkc2_stages(s: int, eps: float = RKC2_EPS) -> Stages:
    """Damped second-order Chebyshev coefficients (Sommeijer et al. 1997, eqs. 2.6–2.8)."""
    if s < 2:
        raise ValueError(f"RKC2 needs s ≥ 2 stages (got {s})")
    w0 = 1.0 + eps / (s * s)
    t, d1, d2 = _chebyshev(s, w0)
    w1 = d1[s] / d2[s]
    b = [0.0] * (s + 1)
    for j in range(2, s + 1):
        b[j] = d2[j] / d1[j] ** 2
    b[0] = b[1] = b[2]
    mu, nu, mu_t, gamma_t = [0.0] * (s + 1), [0.0] * (s + 1), [0.0] * (s + 1), [0.0] * (s + 1)
    mu_t[1] = b[1] * w1
    for j in range(2, s + 1):
        mu[j] = 2.0 * b[j] * w0 / b[j - 1]
        nu[j] = -b[j] / b[j - 2]
        mu_t[j] = 2.0 * b[j] * w1 / b[j - 1]
        gamma_t[j] = -(1.0 - b[j - 1] * t[j - 1]) * mu_t[j]
    return Stages(s, tuple(mu), tuple(nu), tuple(mu_t), tuple(gamma_t), (1.0 + w0) / w1)


def rkl2_stages(s: int) -> Stages:
    """Second-order Runge–Kutta–Legendre coefficients (Meyer, Balsara and Aslam 2014, eq. 16)."""
    if s < 2:
        raise ValueError(f"RKL2 needs s ≥ 2 stages (got {s})")
    w1 = 4.0 / (s * s + s - 2.0)
    b = [1.0 / 3.0] * 3 + [(j * j + j - 2.0) / (2.0 * j * (j + 1.0)) for j in range(3, s + 1)]
    mu, nu, mu_t, gamma_t = [0.0] * (s + 1), [0.0] * (s + 1), [0.0] * (s + 1), [0.0] * (s + 1)
    mu_t[1] = w1 / 3.0
    for j in range(2, s + 1):
        mu[j] = (2.0 * j - 1.0) / j * b[j] / b[j - 1]
        nu[j] = -(j - 1.0) / j * b[j] / b[j - 2]
        mu_t[j] = mu[j] * w1
        gamma_t[j] = -(1.0 - b[j - 1]) * mu_t[j]
    return Stages(s, tuple(mu), tuple(nu), tuple(mu_t), tuple(gamma_t), (s * s + s - 2.0) / 2.0)


def stages(method: str, s: int) -> Stages:
    check_choice("integrator", method, STABILIZED)
    return rkl2_stages(s) if method == "rkl2" else rkc2_stages(s)


def stage_count(method: str, h_rho: float, cap: int, key: str = "max_stages") -> int:
    """The fewest stages s ≥ 2 whose stability interval [−β(s), 0] covers hρ.

    β is increasing in s, so a bisection on s finds it; more than ``cap`` stages is a UserError
    naming the cap (a smaller step or a larger cap are the two ways out)."""
    if not (math.isfinite(h_rho) and h_rho >= 0):
        raise UserError(f"the spectral-radius bound gives h·ρ = {h_rho}; it must be finite and ≥ 0")
    if stages(method, cap).beta < h_rho:
        raise UserError(f"{method} with h·ρ = {h_rho:.4g} needs more than {key}={cap} stages "
                        f"(β({cap}) = {stages(method, cap).beta:.4g}); lower the step or raise "
                        f"{key}")
    lo, hi = 2, cap
    while lo < hi:
        mid = (lo + hi) // 2
        if stages(method, mid).beta >= h_rho:
            hi = mid
        else:
            lo = mid + 1
    return lo


def stabilized_step(f: RHS, y: Tensor, h: float, st: Stages) -> Tensor:
    """One step of length h: s evaluations of F, out of place (differentiable)."""
    f0 = f(y)
    prev2, prev = y, y + (st.mu_t[1] * h) * f0
    for j in range(2, st.s + 1):
        new = (1.0 - st.mu[j] - st.nu[j]) * y + st.mu[j] * prev + st.nu[j] * prev2 \
            + (st.mu_t[j] * h) * f(prev) + (st.gamma_t[j] * h) * f0
        prev2, prev = prev, new
    return prev


def rk4_step(f: RHS, y: Tensor, h: float) -> Tensor:
    k1 = f(y)
    k2 = f(y + 0.5 * h * k1)
    k3 = f(y + 0.5 * h * k2)
    k4 = f(y + h * k3)
    return y + (h / 6.0) * (k1 + 2.0 * k2 + 2.0 * k3 + k4)


def power_iteration(f: RHS, y: Tensor, iterations: int = 30, seed: int = 0) -> float:
    """|λ|max of the Jacobian ∂F/∂y at y by power iteration on exact Jacobian–vector products
    (forward mode), from a random start (a symmetric start would miss asymmetric modes). It
    approaches ρ from below; callers multiply by a safety factor."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    v = torch.randn(y.shape, generator=gen, dtype=y.dtype).to(y.device)
    v = v / torch.linalg.vector_norm(v)
    y = y.detach()
    estimate = 0.0
    for _ in range(iterations):
        _, jv = torch.func.jvp(f, (y,), (v,))
        norm = float(torch.linalg.vector_norm(jv))
        if norm == 0.0:
            return 0.0
        estimate, v = norm, jv / norm
    return estimate


class CountedRHS:
    """F with a count of its evaluations (what the benchmarks compare)."""

    def __init__(self, f: RHS) -> None:
        self.f, self.evals = f, 0

    def __call__(self, y: Tensor) -> Tensor:
        self.evals += 1
        return self.f(y)


@dataclass
class IntegratorConfig:
    """How a stiff system is integrated (the ``model.integrator`` keys)."""

    #: rkl2 | rkc2 (stabilized, fixed step), rk4 (fixed step, needs h·ρ ≤ 2.785), dopri5 |
    #: bosh3 (adaptive, torchdiffeq)
    method: str = "rkl2"
    #: fixed-step methods: the largest step; each interval between output times is split into
    #: equal steps no longer than this
    step: float = 0.5
    #: stage cap of rkl2/rkc2: a step needing more stages is refused
    max_stages: int = 200
    #: the spectral radius ρ the stage count is chosen from: bound (the model's Gershgorin
    #: bound, 8D/dx² + reaction) or power (power iteration on the Jacobian at the start)
    spectral_radius: str = "bound"
    #: stages are chosen so that β(s) ≥ safety·h·ρ
    safety: float = 1.1
    #: adaptive methods' tolerances
    rtol: float = 1e-3
    atol: float = 1e-3

    def validate(self, prefix: str = "model.integrator") -> None:
        check_choice(f"{prefix}.method", self.method, METHODS)
        check_choice(f"{prefix}.spectral_radius", self.spectral_radius, ("bound", "power"))
        for key in ("step", "rtol", "atol"):
            if not getattr(self, key) > 0:
                raise UserError(f"{prefix}.{key}={getattr(self, key)} must be > 0")
        if self.max_stages < 2:
            raise UserError(f"{prefix}.max_stages={self.max_stages} must be an integer ≥ 2")
        if not self.safety >= 1.0:
            raise UserError(f"{prefix}.safety={self.safety} must be ≥ 1")


@dataclass
class Solution:
    """States at the output times (len(times), *y0.shape), and what it cost: ``counter`` keeps
    counting when a backward pass evaluates F again (the adaptive methods' recomputation)."""

    states: Tensor
    counter: CountedRHS
    stages: int = 0
    rho: float = float("nan")
    steps: int = 0
    #: F evaluations of the forward solve
    evals: int = 0


class _TimeFree(torch.nn.Module):
    """y' = F(y) in torchdiffeq's form f(t, y)."""

    def __init__(self, counted: CountedRHS) -> None:
        super().__init__()
        self.counted = counted

    def forward(self, t: Tensor, y: Tensor) -> Tensor:
        return self.counted(y)


class Integrator:
    """Integrates y' = F(y) from times[0] to each later output time, differentiably."""

    def __init__(self, cfg: IntegratorConfig, prefix: str = "model.integrator") -> None:
        cfg.validate(prefix)
        self.cfg, self.prefix = cfg, prefix

    def plan(self, rho: float) -> int:
        """The stage count for the configured step (0 for rk4 and adaptive methods); checks rk4's
        stability and the stage cap, so a bad setting is refused before any work."""
        c = self.cfg
        h_rho = c.safety * c.step * rho
        if c.method in STABILIZED:
            return stage_count(c.method, h_rho, c.max_stages, f"{self.prefix}.max_stages")
        if c.method == "rk4" and h_rho > RK4_BOUNDARY:
            raise UserError(f"{self.prefix}.method=rk4 with {self.prefix}.step={c.step:g} is "
                            f"unstable: h·ρ = {h_rho:.4g} > {RK4_BOUNDARY} (ρ = {rho:.4g}); use "
                            f"{self.prefix}.step ≤ {RK4_BOUNDARY / (c.safety * rho):.3g} or a "
                            "stabilized method (rkl2, rkc2)")
        return 0

    def spectral_radius(self, f: RHS, y0: Tensor, bound: Callable[[Tensor], float]) -> float:
        if self.cfg.spectral_radius == "power":
            return power_iteration(f, y0)
        return float(bound(y0))

    def integrate(self, f: RHS, y0: Tensor, times: Tensor, rho: float,
                  differentiable: bool = False) -> Solution:
        """States at ``times`` (increasing; times[0] is y0's time), differentiated by autograd
        through every step: the fixed-step methods through every stage, the adaptive ones one
        output interval at a time (see :meth:`_adaptive`)."""
        c = self.cfg
        counted = CountedRHS(f)
        t = [float(v) for v in times]
        if any(b <= a for a, b in zip(t, t[1:])):
            raise UserError(f"output times must increase strictly (got {t[:6]}…)")
        if c.method in ADAPTIVE:
            return self._adaptive(counted, y0, times, differentiable)
        s = self.plan(rho)
        st = stages(c.method, s) if s else None
        out, y, steps = [y0], y0, 0
        for a, b in zip(t, t[1:]):
            n = max(1, math.ceil((b - a) / c.step - 1e-9))
            h = (b - a) / n
            for _ in range(n):
                y = stabilized_step(counted, y, h, st) if st is not None else rk4_step(counted, y, h)
            steps += n
            out.append(y)
        return Solution(torch.stack(out), counted, s, rho, steps, counted.evals)

    def _adaptive(self, counted: CountedRHS, y0: Tensor, times: Tensor,
                  differentiable: bool) -> Solution:
        """torchdiffeq's solve; when ``differentiable``, backpropagation through its steps
        (discretize, then differentiate), each output interval under activation checkpointing.

        Not torchdiffeq's adjoint: ``odeint_adjoint`` re-integrates y *backward* in time next to
        the adjoint state, and backward in time a diffusion stencil is anti-diffusion, its
        stiffest mode growing like e^{ρΔt} (ρ = 8D/dx² = 800 here, so e^{800} over one
        snapshot interval): round-off became NaN (N = 32, t ≤ 10) or, on an 8 × 8 grid over
        [0, 1], a gradient 65% off that of a fine RK4 reference. Backpropagation through the
        forward steps is the exact gradient of the computed solution and is as stable as the
        forward solve. Memory: the forward keeps only the states at the output times; the
        backward recomputes one interval's steps with their graph, so the peak is one interval's,
        not the whole solve's."""
        import torchdiffeq
        from torch.utils.checkpoint import checkpoint

        func = _TimeFree(counted)
        kw = {"method": self.cfg.method, "rtol": self.cfg.rtol, "atol": self.cfg.atol}
        if not differentiable:
            with torch.no_grad():
                states = torchdiffeq.odeint(func, y0, times, **kw)
            return Solution(states, counted, steps=0, evals=counted.evals)

        def interval(y: Tensor, span: Tensor) -> Tensor:
            return torchdiffeq.odeint(func, y, span, **kw)[-1]

        out, y = [y0], y0
        for i in range(times.shape[0] - 1):
            y = checkpoint(interval, y, times[i:i + 2], use_reentrant=False)
            out.append(y)
        return Solution(torch.stack(out), counted, steps=0, evals=counted.evals)
