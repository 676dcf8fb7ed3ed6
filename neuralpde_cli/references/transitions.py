"""Exact transition log-densities of OU, CIR and Merton, and the exact maximum-likelihood
baseline.

Plain numpy/scipy on plain arrays (no SDE objects, no torch): the reference the calibration's
approximate likelihoods are judged against.

- OU dX = θ(m − X)dt + σ dW: X(t+Δ) | x0 ~ N(m + e^{−θΔ}(x0 − m), Σ(Δ)); 1-D Σ = σ²(1 − e^{−2θΔ})/(2θ),
  d-D Σ(Δ) = ∫₀^Δ e^{−θs}σσᵀe^{−θᵀs}ds from Van Loan's block matrix exponential.
- CIR dX = κ(μ − X)dt + σ√X dW: 2c·X(t+Δ) | x0 ~ χ²'(df = 4κμ/σ², nc = 2c·x0·e^{−κΔ}),
  c = 2κ/(σ²(1 − e^{−κΔ})) (Cox, Ingersoll and Ross 1985).
- Merton dX = μdt + σdW + J dN, J ~ N(m_J, s_J²), N Poisson of rate λ: X(t+Δ) − x0 is the
  Poisson(λΔ) mixture over n of N(μΔ + n m_J, σ²Δ + n s_J²) (Merton 1976), summed until the
  Poisson tail is below 1e-16.
"""

from __future__ import annotations

import warnings
from typing import Callable, Mapping

import numpy as np
import scipy.linalg
import scipy.optimize
import scipy.special
import scipy.stats

ArrayLike = np.ndarray | float


def ou_log_density(x0: ArrayLike, x1: ArrayLike, dt: ArrayLike, theta: ArrayLike,
                   mean: ArrayLike, sigma: ArrayLike) -> np.ndarray:
    """log p(x1, t + Δ | x0, t) of OU.

    1-D: x0, x1, dt broadcast together (scalars θ, m, σ) → the broadcast shape.
    d-D: x0, x1 (n, d), dt (n,) or scalar, θ and σ (d, d), m (d,) → (n,).
    """
    theta = np.asarray(theta, dtype=float)
    if theta.ndim == 2:
        return _ou_log_density_nd(np.atleast_2d(x0), np.atleast_2d(x1), dt, theta,
                                  np.asarray(mean, dtype=float), np.asarray(sigma, dtype=float))
    x0, x1, dt = (np.asarray(a, dtype=float) for a in (x0, x1, dt))
    decay = np.exp(-theta * dt)
    loc = mean + (x0 - mean) * decay
    var = sigma ** 2 * -np.expm1(-2.0 * theta * dt) / (2.0 * theta)
    return -0.5 * ((x1 - loc) ** 2 / var + np.log(2.0 * np.pi * var))


def _ou_log_density_nd(x0: np.ndarray, x1: np.ndarray, dt: ArrayLike, theta: np.ndarray,
                       mean: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    n, d = x0.shape
    steps, index = np.unique(np.broadcast_to(np.asarray(dt, dtype=float), (n,)), return_inverse=True)
    q = sigma @ sigma.T
    out = np.empty(n)
    for k, step in enumerate(steps):  # one pair of matrix exponentials per distinct Δ
        rows = index == k
        phi = scipy.linalg.expm(-theta * step)
        block = np.block([[theta, q], [np.zeros((d, d)), -theta.T]])
        ev = scipy.linalg.expm(block * step)
        cov = ev[d:, d:].T @ ev[:d, d:]
        cov = 0.5 * (cov + cov.T)
        loc = mean + (x0[rows] - mean) @ phi.T
        out[rows] = scipy.stats.multivariate_normal(np.zeros(d), cov).logpdf(x1[rows] - loc)
    return out


def cir_log_density(x0: ArrayLike, x1: ArrayLike, dt: ArrayLike, rate: float, level: float,
                    noise: float) -> np.ndarray:
    """log p(x1, t + Δ | x0, t) of CIR (1-D; arrays broadcast); −inf for x1 < 0."""
    x0, x1, dt = (np.asarray(a, dtype=float) for a in (x0, x1, dt))
    decay = np.exp(-rate * dt)
    c = 2.0 * rate / (noise ** 2 * -np.expm1(-rate * dt))
    df = 4.0 * rate * level / noise ** 2
    nc = 2.0 * c * x0 * decay
    y = 2.0 * c * x1
    with np.errstate(divide="ignore", invalid="ignore"):
        central = scipy.stats.chi2.logpdf(y, df)  # scipy's ncx2 is not defined at nc = 0
        shifted = scipy.stats.ncx2.logpdf(y, df, np.where(nc > 0, nc, 1.0))
        out = np.where(nc > 0, shifted, central) + np.log(2.0 * c)
    return np.where(x1 < 0, -np.inf, out)


def _merton_terms(mean_jumps: np.ndarray) -> np.ndarray:
    """n = 0 … N with P(Pois(max mean) > N) < 1e-16."""
    top = float(np.max(mean_jumps)) if np.size(mean_jumps) else 0.0
    return np.arange(int(scipy.stats.poisson.isf(1e-16, top)) + 2 if top > 0 else 1)


def merton_log_density(x0: ArrayLike, x1: ArrayLike, dt: ArrayLike, mu: float, noise: float,
                       jump_rate: float, jump_mean: float, jump_std: float) -> np.ndarray:
    """log p(x1, t + Δ | x0, t) of Merton's jump diffusion (1-D; arrays broadcast)."""
    x0, x1, dt = np.broadcast_arrays(*(np.asarray(a, dtype=float) for a in (x0, x1, dt)))
    n = _merton_terms(jump_rate * dt)
    shape = (-1,) + (1,) * x0.ndim
    nn = n.reshape(shape)
    var = noise ** 2 * dt + nn * jump_std ** 2
    loc = x0 + mu * dt + nn * jump_mean
    log_w = scipy.stats.poisson.logpmf(nn, jump_rate * dt)
    terms = log_w - 0.5 * ((x1 - loc) ** 2 / var + np.log(2.0 * np.pi * var))
    return scipy.special.logsumexp(terms, axis=0)


def merton_cdf(x0: ArrayLike, x1: ArrayLike, dt: ArrayLike, mu: float, noise: float,
               jump_rate: float, jump_mean: float, jump_std: float,
               upper: bool = False) -> np.ndarray:
    """F(x1 | x0) of Merton's law (or 1 − F with ``upper``, without cancellation)."""
    x0, x1, dt = np.broadcast_arrays(*(np.asarray(a, dtype=float) for a in (x0, x1, dt)))
    nn = _merton_terms(jump_rate * dt).reshape((-1,) + (1,) * x0.ndim)
    z = (x1 - x0 - mu * dt - nn * jump_mean) / np.sqrt(noise ** 2 * dt + nn * jump_std ** 2)
    w = scipy.stats.poisson.pmf(nn, jump_rate * dt)
    return np.sum(w * (scipy.stats.norm.sf(z) if upper else scipy.stats.norm.cdf(z)), axis=0)


def normal_scores(kind: str, x0: np.ndarray, x1: np.ndarray, dt: np.ndarray,
                  params: Mapping[str, float]) -> np.ndarray:
    """z = Φ⁻¹(F(x1 | x0)) under the exact law of 1-D ``kind`` (ou, cir, merton): how many standard
    deviations out each move lies, skew included (the upper tail from the survival function,
    so that z stays finite to about 38)."""
    x0, x1, dt = (np.asarray(a, dtype=float) for a in (x0, x1, dt))
    if kind == "ou":
        th, m, s = params["theta"], params["mean"], params["sigma"]
        loc = m + (x0 - m) * np.exp(-th * dt)
        return (x1 - loc) / (s * np.sqrt(-np.expm1(-2.0 * th * dt) / (2.0 * th)))
    if kind == "merton":
        args = [params[n] for n in EXACT["merton"][1]]
        lower = merton_cdf(x0, x1, dt, *args)
        upper = merton_cdf(x0, x1, dt, *args, upper=True)
        return np.where(lower < 0.5, scipy.stats.norm.ppf(lower), -scipy.stats.norm.ppf(upper))
    if kind != "cir":
        raise ValueError(f"no exact law for kind {kind!r}")
    k, m, s = params["rate"], params["level"], params["noise"]
    c = 2.0 * k / (s ** 2 * -np.expm1(-k * dt))
    df, nc, y = 4.0 * k * m / s ** 2, 2.0 * c * x0 * np.exp(-k * dt), 2.0 * c * x1
    lower = scipy.stats.ncx2.cdf(y, df, np.maximum(nc, 1e-300))
    upper = scipy.stats.ncx2.sf(y, df, np.maximum(nc, 1e-300))
    return np.where(lower < 0.5, scipy.stats.norm.ppf(lower), -scipy.stats.norm.ppf(upper))


#: |z| bands of :func:`error_by_band`: the bulk, the tails, the far tails and beyond
Z_BANDS = ((0.0, 3.0), (3.0, 5.0), (5.0, 8.0), (8.0, np.inf))


def error_by_band(error: np.ndarray, z: np.ndarray) -> list[dict]:
    """Per-transition log-density errors summarized in bands of |z| (:data:`Z_BANDS`): count,
    mean and largest |error|, and the sum (what the band adds to log L)."""
    out = []
    for lo, hi in Z_BANDS:
        inside = (np.abs(z) >= lo) & (np.abs(z) < hi)
        e = error[inside]
        out.append({"band": f"{lo:g}–{hi:g}" if np.isfinite(hi) else f"> {lo:g}",
                    "n": int(inside.sum()),
                    "mean_abs": float(np.abs(e).mean()) if e.size else None,
                    "max_abs": float(np.abs(e).max()) if e.size else None,
                    "sum": float(e.sum())})
    return out


#: the exact law of each kind: its log-density and its parameters in calibration's names
EXACT: dict[str, tuple[Callable[..., np.ndarray], tuple[str, ...], tuple[str, ...]]] = {
    # kind: (log-density, parameter names, the ones that must be > 0)
    "ou": (ou_log_density, ("theta", "mean", "sigma"), ("theta", "sigma")),
    "cir": (cir_log_density, ("rate", "level", "noise"), ("rate", "level", "noise")),
    "merton": (merton_log_density, ("mu", "noise", "jump_rate", "jump_mean", "jump_std"),
               ("noise", "jump_rate", "jump_std")),
}


def exact_mle(kind: str, x0: np.ndarray, x1: np.ndarray, dt: np.ndarray,
              start: Mapping[str, float]) -> dict:
    """The exact maximum-likelihood estimate of a 1-D OU, CIR or Merton model from transitions.

    Maximized in log-coordinates for the positive parameters (L-BFGS-B, then Nelder–Mead to
    polish), standard errors from the inverse observed information: the Hessian of −loglik in
    the natural parameters by central differences. Returns ``estimates``, ``se`` (dicts by
    name), ``loglik``, ``hessian`` (P × P) and ``names``.
    """
    if kind not in EXACT:
        raise ValueError(f"no exact law for kind={kind!r}; known: {sorted(EXACT)}")
    density, names, positive = EXACT[kind]
    x0, x1, dt = (np.asarray(a, dtype=float).reshape(-1) for a in (x0, x1, dt))
    is_pos = np.array([n in positive for n in names])

    def nll_natural(p: np.ndarray) -> float:
        if np.any(p[is_pos] <= 0):
            return np.inf
        value = -np.sum(density(x0, x1, dt, *p))
        return value if np.isfinite(value) else np.inf

    def to_natural(u: np.ndarray) -> np.ndarray:
        return np.where(is_pos, np.exp(u), u)

    p0 = np.array([float(start[n]) for n in names])
    u0 = np.where(is_pos, np.log(np.where(is_pos, p0, 1.0)), p0)
    with warnings.catch_warnings():  # +∞ at an infeasible trial point: inf − inf in scipy's
        warnings.simplefilter("ignore", RuntimeWarning)  # finite differences, an expected NaN
        first = scipy.optimize.minimize(lambda u: nll_natural(to_natural(u)), u0,
                                        method="L-BFGS-B")
    best = scipy.optimize.minimize(lambda u: nll_natural(to_natural(u)), first.x,
                                   method="Nelder-Mead",
                                   options={"xatol": 1e-10, "fatol": 1e-10, "maxiter": 20000})
    estimate = to_natural(best.x if best.fun <= first.fun else first.x)
    hessian = numerical_hessian(nll_natural, estimate)
    cov = np.linalg.inv(hessian)
    se = np.sqrt(np.clip(np.diag(cov), 0.0, None))
    return {"names": list(names), "estimates": dict(zip(names, estimate.tolist())),
            "se": dict(zip(names, se.tolist())), "loglik": -nll_natural(estimate),
            "hessian": hessian}


def numerical_hessian(f: Callable[[np.ndarray], float], p: np.ndarray,
                      rel_step: float = 1e-4) -> np.ndarray:
    """Central-difference Hessian of a scalar function at p (steps relative to |pᵢ|)."""
    p = np.asarray(p, dtype=float)
    h = rel_step * np.maximum(np.abs(p), 1e-3)
    n = p.size
    out = np.empty((n, n))
    for i in range(n):
        for j in range(i, n):
            ei, ej = np.eye(n)[i] * h[i], np.eye(n)[j] * h[j]
            out[i, j] = out[j, i] = (f(p + ei + ej) - f(p + ei - ej) - f(p - ei + ej)
                                     + f(p - ei - ej)) / (4.0 * h[i] * h[j])
    return out
