r"""A bootstrap particle filter for Heston observed through log S alone: the reference the
grid filter (:mod:`neuralpde_cli.likelihood.filter`) is checked against.

Plain numpy on plain arrays, independent of the march: particles of V are propagated by the
exact CIR law (non-central χ²) on ``substeps`` sub-steps of each Δ, and weighted by the exact
conditional law of the log-price increment given the variance path (Broadie and Kaya 2006):

    Δy | V ~ N(μΔ − ½I + ρ/ξ (V₁ − V₀ − κθΔ + κI), (1 − ρ²) I),   I = ∫V dt,

with I by the trapezoid over the sub-steps (the only discretization, O(h²)). Multinomial
resampling at every step (systematic), the stationary Gamma law of V at the start. Returns
log p(y₁…yₙ) and its per-observation factors; the Monte Carlo error is estimated by
independent repetitions.
"""

from __future__ import annotations

import numpy as np


def heston_log_likelihood(increments: np.ndarray, dt: np.ndarray, mu: float, rate: float,
                          level: float, noise: float, rho: float, particles: int = 100_000,
                          substeps: int = 8, seed: int = 0) -> tuple[float, np.ndarray]:
    """log p(Δy₁ … Δyₙ) of Heston's log-price increments (n,) over steps dt (n,), V latent."""
    rng = np.random.default_rng(seed)
    inc = np.asarray(increments, float).reshape(-1)
    dt = np.broadcast_to(np.asarray(dt, float), inc.shape)
    shape, scale = 2.0 * rate * level / noise ** 2, noise ** 2 / (2.0 * rate)
    v = rng.gamma(shape, scale, particles)
    df = 4.0 * rate * level / noise ** 2
    factors = np.empty(inc.size)
    for k in range(inc.size):
        h = dt[k] / substeps
        decay = np.exp(-rate * h)
        c = noise ** 2 * (1.0 - decay) / (4.0 * rate)
        start, integral, current = v, 0.5 * v, v
        for j in range(substeps):
            current = c * rng.noncentral_chisquare(df, current * decay / c)
            integral = integral + (current if j < substeps - 1 else 0.5 * current)
        integral = integral * h
        mean = (mu * dt[k] - 0.5 * integral
                + rho / noise * (current - start - rate * level * dt[k] + rate * integral))
        var = (1.0 - rho ** 2) * integral
        log_w = -0.5 * ((inc[k] - mean) ** 2 / var + np.log(2.0 * np.pi * var))
        top = log_w.max()
        w = np.exp(log_w - top)
        factors[k] = top + np.log(w.mean())
        positions = (rng.random() + np.arange(particles)) / particles  # systematic resampling
        index = np.minimum(np.searchsorted(np.cumsum(w) / w.sum(), positions), particles - 1)
        v = current[index]
    return float(factors.sum()), factors
