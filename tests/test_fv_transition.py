"""The finite-volume transition density (references/fv_transition.py) against exact laws.

OU: the Gaussian transition (references.transitions.ou_log_density); CIR: the non-central χ²
(cir_log_density). The claim checked: with cells at most 1/20 of every transition's standard
deviation s, log p is within 2e-3 of the exact value for |z| < 2 and 2e-2 everywhere (the
error is O((h/s)²) = O(1/400), growing in the tails), it converges at second order, and the
maximum-likelihood estimate under it lands within 0.02 exact SEs of the exact MLE.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from neuralpde_cli.references import fv_transition as fv
from neuralpde_cli.references.transitions import cir_log_density, exact_mle, ou_log_density


def ou_path(n: int, dt: np.ndarray | float, theta: float, mean: float, sigma: float,
            seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    dts = np.broadcast_to(np.asarray(dt, float), (n,))
    x = np.empty(n + 1)
    x[0] = mean
    for i, h in enumerate(dts):
        a = math.exp(-theta * h)
        x[i + 1] = mean + (x[i] - mean) * a + sigma * math.sqrt((1 - a * a) / (2 * theta)) * \
            rng.standard_normal()
    return x


def cir_path(n: int, dt: float, rate: float, level: float, noise: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = noise ** 2 * -math.expm1(-rate * dt) / (4 * rate)
    x = np.empty(n + 1)
    x[0] = level
    for i in range(n):
        x[i + 1] = c * rng.noncentral_chisquare(4 * rate * level / noise ** 2,
                                                x[i] * math.exp(-rate * dt) / c)
    return x


def fv_log_density(kind: str, params: tuple, x: np.ndarray, dt, cells_per_sd: float = 20.0):
    model = fv.MODELS[kind]
    dts = np.broadcast_to(np.asarray(dt, float), (x.size - 1,))
    grid = fv.choose_grid(model.drift, model.variance, params, x[:-1], x[1:], dts,
                          cells_per_sd=cells_per_sd, lower=model.lower)
    assert grid.cells_per_sd >= cells_per_sd and grid.margin_sd >= 10.0
    faces = grid.faces
    return fv.log_transition_density(faces, model.drift(faces, *params),
                                     model.variance(faces, *params), x[:-1], x[1:], dts), grid


def test_generator_conserves_mass_and_never_makes_mass_negative():
    faces = np.linspace(0.05, 2.0, 81)
    a = fv.fv_generator(faces, 3.0 * (0.6 - faces), 0.04 * faces)
    dense = a.toarray()
    assert np.abs(dense.sum(0)).max() < 1e-9 * np.abs(dense).max()  # columns sum to 0
    off = dense - np.diag(np.diag(dense))
    assert off.min() >= 0.0
    p = fv.transition_matrix(a, 0.3)
    assert p.min() >= -1e-15 and np.abs(p.sum(0) - 1).max() < 1e-12


def test_spectral_form_is_the_same_matrix_exponential():
    x = ou_path(60, 0.5, 1.0, 0.0, 1.0, seed=4)
    model = fv.MODELS["cir"]
    faces = np.linspace(0.01, 1.2, 201)
    params = (2.0, 0.4, 0.5)
    x = 0.4 + 0.1 * x  # positive starts and ends
    dt = np.where(np.arange(60) % 2 == 0, 0.1, 0.4)
    args = (faces, model.drift(faces, *params), model.variance(faces, *params), x[:-1], x[1:], dt)
    spectral = fv.log_transition_density(*args, method="spectral")
    expm = fv.log_transition_density(*args, method="expm")
    assert np.abs(spectral - expm).max() < 1e-9


def test_ou_irregular_dt_matches_the_exact_density():
    rng = np.random.default_rng(0)
    dt = rng.choice([0.1, 0.5, 2.0], size=300)
    x = ou_path(300, dt, 1.0, 0.0, 1.0, seed=1)
    exact = ou_log_density(x[:-1], x[1:], dt, 1.0, 0.0, 1.0)
    z = np.abs(x[1:] - x[:-1] * np.exp(-dt)) / np.sqrt(-np.expm1(-2 * dt) / 2)
    lp, _ = fv_log_density("ou", (1.0, 0.0, 1.0), x, dt)
    err = np.abs(lp - exact)
    assert err[z < 2].max() < 2e-3 and err.max() < 2e-2


def test_error_falls_at_second_order_in_the_cell_width():
    x = ou_path(300, 0.5, 1.0, 0.0, 1.0, seed=1)
    exact = ou_log_density(x[:-1], x[1:], 0.5, 1.0, 0.0, 1.0)
    rms = {}
    for cells in (10.0, 20.0):
        lp, _ = fv_log_density("ou", (1.0, 0.0, 1.0), x, 0.5, cells)
        rms[cells] = float(np.sqrt(np.mean((lp - exact) ** 2)))
    order = math.log2(rms[10.0] / rms[20.0])
    assert 1.8 < order < 2.4, order


@pytest.mark.parametrize("dt,n", [(1 / 250, 1250), (1 / 12, 600)])
def test_cir_daily_and_monthly_match_the_noncentral_chi2(dt, n):
    params = (3.0, 0.3, 0.2)
    x = cir_path(n, dt, *params, seed=0)
    lp, grid = fv_log_density("cir", params, x, dt)
    exact = cir_log_density(x[:-1], x[1:], dt, *params)
    sd = 0.2 * np.sqrt(x[:-1] * dt)
    z = np.abs(x[1:] - x[:-1] - 3.0 * (0.3 - x[:-1]) * dt) / sd
    err = np.abs(lp - exact)
    assert err[z < 2].max() < 2e-3 and err.max() < 2e-2
    assert abs(float((lp - exact).sum())) < 0.05  # log-likelihood over all of them


def test_fv_mle_lands_on_the_exact_ou_mle():
    x = ou_path(300, 1.0, 1.0, 0.5, 0.7, seed=5)
    exact = exact_mle("ou", x[:-1], x[1:], np.ones(300), dict(theta=1.0, mean=0.0, sigma=1.0))
    res = fv.fv_mle("ou", x[:-1], x[1:], 1.0, dict(theta=0.8, mean=0.3, sigma=0.9))
    assert res["grid"]["cells_per_sd_at_estimate"] >= 20.0
    for name in ("theta", "mean", "sigma"):
        assert abs(res["estimates"][name] - exact["estimates"][name]) < 0.02 * exact["se"][name]
        assert abs(res["se"][name] / exact["se"][name] - 1) < 0.01
    assert abs(res["loglik"] - exact["loglik"]) < 0.05


@pytest.mark.slow
def test_fv_mle_lands_on_the_exact_cir_mle_daily():
    x = cir_path(1250, 1 / 250, 3.0, 0.3, 0.2, seed=0)
    dt = np.full(1250, 1 / 250)
    start = dict(rate=3.0, level=0.3, noise=0.2)
    exact = exact_mle("cir", x[:-1], x[1:], dt, start)
    res = fv.fv_mle("cir", x[:-1], x[1:], dt, start)
    for name in ("rate", "level", "noise"):
        assert abs(res["estimates"][name] - exact["estimates"][name]) < 0.02 * exact["se"][name]
        assert abs(res["se"][name] / exact["se"][name] - 1) < 0.01


def test_points_outside_the_grid_and_vanishing_noise_are_refused():
    faces = np.linspace(0.0, 1.0, 11)
    mu, var = np.zeros(11), np.ones(11)
    with pytest.raises(ValueError, match="x1 = 2 lies outside"):
        fv.log_transition_density(faces, mu, var, np.array([0.5]), np.array([2.0]), 0.1)
    var[5] = 0.0
    with pytest.raises(ValueError, match="σ² must be > 0"):
        fv.fv_generator(faces, mu, var)
