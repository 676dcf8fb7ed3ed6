r"""Gaussian approximations of the transition density: the Euler and Kessler baselines.

Both replace p(x₁, t₀ + Δ | x₀, t₀) by a normal density with approximate conditional moments,
computed from the SDE's own coefficients in torch, so they are differentiable in its parameter
tensors (an SDE from :func:`neuralpde_cli.sdes.build_sde_with`).

* **Euler** (the pseudo-likelihood of the Euler–Maruyama step): N(x₀ + μΔ, σσᵀΔ), any d. Its
  moments are first order in Δ: on OU it estimates (1 − e^{−θΔ})/Δ instead of θ.
* **Kessler (1997)**, second order, 1-D: with the generator L f = μf′ + ½v f″ (v = σ²),
  E ≈ x + μΔ + (μμ′ + ½vμ″)Δ²/2 and, centred (no cancellation between x² terms),
  Var ≈ vΔ + (2μ² + μv′ + 2vμ′ + ½vv″)Δ²/2 − (E − x)². The derivatives in x come from autograd
  with ``create_graph``, so the result stays differentiable in the parameters. The t-derivative
  of time-dependent coefficients is not included (the built-in kinds are autonomous). The
  expansion can give Var ≤ 0 at large Δ; |Var| is used there, as the published pymle
  implementation does, so a fit does not stop on it.

For a jump diffusion (:class:`~neuralpde_cli.sdes.jumps.JumpDiffusion`) both add the jumps as
the exact law does: the Poisson(λΔ) mixture over n jumps of the Gaussian shifted by n·m_J with
n·S_J more covariance (Press 1967). For Merton, whose diffusion part is Gaussian, Euler's
density is then the exact one.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from neuralpde_cli.errors import UserError
from neuralpde_cli.sdes import SDE

LOG_2PI = math.log(2.0 * math.pi)


def _noise_covariance(sde: SDE, t: Tensor, x: Tensor) -> Tensor:
    """σσᵀ = 2SSᵀ at each row, (n, d, d)."""
    s = sde.diffusion_sqrt(t, x)
    q = 2.0 * s @ s.transpose(-1, -2)
    return q.expand(x.shape[0], x.shape[1], x.shape[1]) if q.dim() == 2 else q


def _gaussian_log_density(x: Tensor, mean: Tensor, cov: Tensor, x0: Tensor) -> Tensor:
    chol, info = torch.linalg.cholesky_ex(cov)
    if bool((info != 0).any()):
        raise UserError("the Euler density needs a non-singular σσᵀ at every observed x0; "
                        f"it is singular at x0 = {x0[info != 0][0].tolist()}")
    z = torch.linalg.solve_triangular(chol, (x - mean).unsqueeze(-1), upper=False).squeeze(-1)
    log_det = 2.0 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
    return -0.5 * (z * z).sum(-1) - 0.5 * log_det - 0.5 * x.shape[-1] * LOG_2PI


def _normal_with_jumps(sde: SDE, x0: Tensor, x1: Tensor, dt: Tensor, mean: Tensor,
                       cov: Tensor) -> Tensor:
    """log N(x1; mean, cov) (n,), or for a jump diffusion the Poisson mixture over the number
    of jumps in Δ of N(mean + n·m_J, cov + n·S_J)."""
    jumps = getattr(sde, "jumps", None)
    if jumps is None:
        return _gaussian_log_density(x1, mean, cov, x0)
    terms = jumps.terms(dt)
    log_w = jumps.log_weights(dt, terms)  # (n, terms + 1)
    parts = [log_w[:, k] + _gaussian_log_density(x1, mean + k * jumps.mean, cov + k * jumps.cov, x0)
             for k in range(terms + 1)]
    return torch.logsumexp(torch.stack(parts, -1), -1)


def euler_log_density(sde: SDE, x0: Tensor, x1: Tensor, t0: Tensor, dt: Tensor) -> Tensor:
    """log N(x1; x0 + μ(t0, x0)Δ, σσᵀ(t0, x0)Δ) per transition (with the jumps of a jump
    diffusion mixed in): x0, x1 (n, d), t0, dt (n,) → (n,)."""
    mean = x0 + sde.drift(t0, x0) * dt[:, None]
    cov = _noise_covariance(sde, t0, x0) * dt[:, None, None]
    return _normal_with_jumps(sde, x0, x1, dt, mean, cov)


def _d_dx(y: Tensor, x: Tensor) -> Tensor:
    """dy/dx of a row-wise function (n,) of x (n, 1), kept in the graph; 0 where y ignores x."""
    if not y.requires_grad:
        return torch.zeros_like(y)
    (grad,) = torch.autograd.grad(y.sum(), x, create_graph=True, allow_unused=True)
    return torch.zeros_like(y) if grad is None else grad[:, 0]


def kessler_moments(sde: SDE, x0: Tensor, t0: Tensor, dt: Tensor) -> tuple[Tensor, Tensor]:
    """Kessler's second-order conditional mean and variance (each (n,)) of a 1-D SDE."""
    if x0.shape[1] != 1:
        raise UserError(f"Kessler's approximation is one-dimensional; the data have dim="
                        f"{x0.shape[1]} (use the Euler baseline there)")
    x = x0.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        mu = sde.drift(t0, x)[:, 0]
        v = _noise_covariance(sde, t0, x)[:, 0, 0]
        mu_x, v_x = _d_dx(mu, x), _d_dx(v, x)
        mu_xx, v_xx = _d_dx(mu_x, x), _d_dx(v_x, x)
    h = dt
    shift = mu * h + (mu * mu_x + 0.5 * v * mu_xx) * h * h / 2.0
    var = v * h + (2.0 * mu * mu + mu * v_x + 2.0 * v * mu_x + 0.5 * v * v_xx) * h * h / 2.0 - shift ** 2
    return x0[:, 0] + shift, var


def kessler_log_density(sde: SDE, x0: Tensor, x1: Tensor, t0: Tensor, dt: Tensor) -> Tensor:
    """log N(x1; E, |Var|) with Kessler's moments (with the jumps of a jump diffusion mixed
    in), 1-D: x0, x1 (n, 1), t0, dt (n,) → (n,)."""
    mean, var = kessler_moments(sde, x0, t0, dt)
    var = torch.clamp(var.abs(), min=torch.finfo(var.dtype).tiny)
    return _normal_with_jumps(sde, x0, x1, dt, mean.unsqueeze(-1), var[:, None, None])


#: kinds whose drift is κ(level − x) (OU: θ(mean − x)) and noise σ·x^p, with their names
AR1_KINDS = {"ou": ("theta", "mean", "sigma", 0.0), "cir": ("rate", "level", "noise", 0.5),
             "cev": ("rate", "level", "noise", 0.5)}


def ar1_start(kind: str, x0: "np.ndarray", x1: "np.ndarray", dt: "np.ndarray"
              ) -> dict[str, float] | None:
    """Starting values from the data's scale, for a 1-D mean-reverting kind: the least-squares
    AR(1) x₁ = a + b·x₀ + ε at the median Δ gives κ = −log b / Δ, level = a / (1 − b), and the
    noise from the residual variance, Var ε ≈ σ²·mean(x₀^{2p})·(1 − b²)/(2κ) (CEV starts at
    γ = ½). Why: a config's default (κ = 1, level = 1) can be orders of magnitude off real data
    (VIX near 15), and a Gaussian baseline started there walked to a rate of 3e-5 and stopped.
    None where the AR(1) is not mean-reverting (b outside (0, 1))."""
    import numpy as np

    if kind not in AR1_KINDS:
        return None
    x0, x1 = np.asarray(x0, float).reshape(-1), np.asarray(x1, float).reshape(-1)
    h = float(np.median(dt))
    design = np.stack([np.ones_like(x0), x0], 1)
    (a, b), *_ = np.linalg.lstsq(design, x1, rcond=None)
    if not 0.0 < b < 1.0:
        return None
    rate = -math.log(b) / h
    level = a / (1.0 - b)
    resid = x1 - a - b * x0
    rate_name, level_name, noise_name, power = AR1_KINDS[kind]
    scale = float(np.mean(np.abs(x0) ** (2 * power)))
    noise = math.sqrt(float(np.mean(resid ** 2)) * 2.0 * rate / ((1.0 - b * b) * scale))
    out = {rate_name: rate, level_name: level, noise_name: noise}
    if kind == "cev":
        out["gamma"] = 0.5
    return out if all(math.isfinite(v) and v != 0 for v in out.values()) else None


def var1_ou_start(x0: "np.ndarray", x1: "np.ndarray", dt: "np.ndarray"
                  ) -> dict[str, list] | None:
    """Starting values of a d-dimensional OU from the data: the least-squares VAR(1)
    x₁ = c + B·x₀ + ε at the median Δ is OU's exact discretization, B = exp(−θΔ), so θ =
    −log B / Δ, the mean (I − B)⁻¹c, and σσᵀ = θΣ∞ + Σ∞θᵀ with Σ∞ the stationary covariance
    from Σ∞ − BΣ∞Bᵀ = Cov ε (σ its lower Cholesky factor). Why: a user with two columns should
    not have to type 2×2 matrices to fit them. None where B has no real stable logarithm."""
    import numpy as np
    from scipy.linalg import cholesky, logm, solve_discrete_lyapunov

    x0, x1 = np.asarray(x0, float), np.asarray(x1, float)
    h = float(np.median(dt))
    design = np.concatenate([np.ones((x0.shape[0], 1)), x0], 1)
    coef, *_ = np.linalg.lstsq(design, x1, rcond=None)
    c, b = coef[0], coef[1:].T
    if not np.all(np.abs(np.linalg.eigvals(b)) < 1.0):
        return None
    try:
        theta = -logm(b) / h
        if np.iscomplexobj(theta):
            if np.abs(theta.imag).max() > 1e-8 * np.abs(theta).max():
                return None
            theta = theta.real
        resid = x1 - design @ coef
        stationary = solve_discrete_lyapunov(b, np.cov(resid.T, bias=True))
        sigma = cholesky(theta @ stationary + stationary @ theta.T, lower=True)
        mean = np.linalg.solve(np.eye(b.shape[0]) - b, c)
    except (np.linalg.LinAlgError, ValueError):
        return None
    out = {"theta": theta.tolist(), "mean": mean.tolist(), "sigma": sigma.tolist()}
    return out if all(np.all(np.isfinite(np.asarray(v))) for v in out.values()) else None


#: increments beyond this many robust standard deviations start a jump fit as jumps
JUMP_THRESHOLD = 4.0


def jump_start(x0: "np.ndarray", x1: "np.ndarray", dt: "np.ndarray") -> dict[str, float] | None:
    """Starting values of Merton's jump diffusion from the data's increments: the diffusion's
    noise from their median absolute deviation (robust to the jumps), the increments beyond
    :data:`JUMP_THRESHOLD` robust SDs taken as jumps (their rate per unit time, mean and SD),
    the drift from the rest. Why: the config's defaults (5 jumps a year of −3 % ± 5 %) are
    meant for daily log prices and can be orders of magnitude off other data. None where the
    increments show no outlier to start the jumps from."""
    import numpy as np

    step = (np.asarray(x1, float) - np.asarray(x0, float)).reshape(-1)
    dt = np.asarray(dt, float).reshape(-1)
    scaled = step / np.sqrt(dt)
    centre = np.median(scaled)
    noise = 1.4826 * float(np.median(np.abs(scaled - centre)))
    if not noise > 0:
        return None
    jumps = np.abs(scaled - centre) > JUMP_THRESHOLD * noise
    if jumps.sum() < 2 or (~jumps).sum() < 2:
        return None
    sizes = step[jumps]
    out = {"mu": float(step[~jumps].sum() / dt[~jumps].sum()), "noise": noise,
           "jump_rate": float(jumps.sum() / dt.sum()), "jump_mean": float(sizes.mean()),
           "jump_std": float(max(sizes.std(), 0.5 * np.abs(sizes).mean()))}
    return out if all(math.isfinite(v) for v in out.values()) else None


#: the realized-variance blocks of :func:`latent_variance_start`: about a month of observations
BLOCK_YEARS = 1.0 / 12.0


def latent_variance_start(x0: "np.ndarray", x1: "np.ndarray", dt: "np.ndarray",
                          path: "np.ndarray | None" = None) -> dict[str, float] | None:
    """Starting values of Heston from log prices alone: the realized variance of blocks of
    about a month (Σ Δy² / Σ Δ) stands in for V, and CIR's AR(1) start on it gives κ, θ, ξ
    (:func:`ar1_start`); mu is the mean return plus θ/2; ρ the correlation of a block's return
    with the next change of its realized variance. A proxy's measurement noise biases ξ up and
    κ up: a start, not an estimate. None with fewer than 8 blocks."""
    import numpy as np

    step = (np.asarray(x1, float) - np.asarray(x0, float)).reshape(-1)
    dt = np.asarray(dt, float).reshape(-1)
    size = max(5, int(round(BLOCK_YEARS / float(np.median(dt)))))
    ids = np.zeros(step.size, int) if path is None else np.unique(np.asarray(path), return_inverse=True)[1]
    rv, ret, length, block_of = [], [], [], []
    for p in np.unique(ids):
        rows = np.flatnonzero(ids == p)
        for b in range(rows.size // size):
            part = rows[b * size:(b + 1) * size]
            rv.append(float((step[part] ** 2).sum() / dt[part].sum()))
            ret.append(float(step[part].sum()))
            length.append(float(dt[part].sum()))
            block_of.append(p)
    if len(rv) < 8:
        return None
    rv, ret, length, block_of = map(np.asarray, (rv, ret, length, block_of))
    same = block_of[1:] == block_of[:-1]
    out = ar1_start("cir", rv[:-1][same], rv[1:][same], length[:-1][same])
    level = float(rv.mean())
    if out is None:  # no mean reversion visible in the proxy: a month's half-life
        out = {"rate": 12.0 * math.log(2.0), "level": level,
               "noise": float(np.std(np.diff(rv)) / np.sqrt(np.mean(rv) * np.median(length)))}
    out["mu"] = float(step.sum() / dt.sum()) + 0.5 * out["level"]
    rho = float(np.corrcoef(ret[:-1][same], np.diff(rv)[same])[0, 1]) if same.sum() > 2 else -0.5
    out["rho"] = float(np.clip(rho if math.isfinite(rho) else -0.5, -0.9, 0.9))
    return out if all(math.isfinite(v) for v in out.values()) else None
