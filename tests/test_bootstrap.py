"""The parametric bootstrap's parts against exact laws: the replayed design draws the OU
transition exactly along every path, and the correction removes the known small-sample bias of
a mean-reversion rate (the rate is the estimator here, in closed form, so that many data sets
cost little; calibrate's use of it is checked through the CLI in test_calibrate)."""

from __future__ import annotations

import math

import numpy as np
import torch

from neuralpde_cli.likelihood.bootstrap import bias_correct, replay_design, stream_seed
from neuralpde_cli.sdes import SDEConfig, build_sde_with

F64, CPU = torch.float64, torch.device("cpu")


def ou(rate: float, sigma: float = 1.0):
    """dX = −rate·X dt + σ dW."""
    cfg = SDEConfig(kind="ou", theta=[[1.0]], mean=[0.0], sigma=[[1.0]])
    return build_sde_with(cfg, 1, {"theta": torch.tensor(rate, dtype=F64),
                                   "sigma": torch.tensor(sigma, dtype=F64)}, F64, CPU)


def design(lengths: list[int], dt: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Start times (n,) of consecutive steps dt (n,) along paths of the given lengths, ids."""
    path = np.repeat(np.arange(len(lengths)), lengths)
    t0 = np.concatenate([np.r_[0.0, np.cumsum(dt[path == p])[:-1]] for p in range(len(lengths))])
    return torch.tensor(t0, dtype=F64), torch.tensor(dt, dtype=F64), path


def test_replayed_design_chains_each_path_from_its_start_with_the_exact_ou_law():
    rng = np.random.default_rng(0)
    lengths = [1500, 500]
    dt = rng.uniform(0.05, 0.5, sum(lengths))
    t0, step, path = design(lengths, dt)
    x0 = torch.tensor(rng.normal(size=(sum(lengths), 1)) + 5.0, dtype=F64)  # observed starts
    gen = torch.Generator().manual_seed(1)
    start, end = replay_design(ou(1.3, 0.7), x0, t0, step, path, gen, 1e-3)
    first = np.r_[True, path[1:] != path[:-1]]
    assert torch.equal(start[first], x0[first])  # each path from its own first observation
    assert torch.equal(start[~first], end[np.flatnonzero(~first) - 1])  # then chained
    # every step from the exact OU law: standardized residuals are N(0, 1)
    a = np.exp(-1.3 * dt)
    z = (end[:, 0].numpy() - start[:, 0].numpy() * a) / (0.7 * np.sqrt((1 - a * a) / 2.6))
    n = z.size
    assert abs(z.mean()) < 4 / math.sqrt(n) and abs(z.var() - 1) < 4 * math.sqrt(2 / n)


def rate_mle(x: np.ndarray, dt: float) -> np.ndarray:
    """The exact MLE of the rate of a zero-mean OU per row of regular observations (B, n + 1):
    −log φ̂ / Δ with φ̂ = Σ xₖxₖ₊₁ / Σ xₖ², kept inside (0, 1) as a fit constrained to a positive
    rate is; biased upward over short spans."""
    phi = (x[:, :-1] * x[:, 1:]).sum(1) / (x[:, :-1] ** 2).sum(1)
    return -np.log(np.clip(phi, 1e-12, 1 - 1e-9)) / dt


def test_the_correction_removes_most_of_a_mean_reversion_rates_small_sample_bias():
    rate, dt, n, sets, boot = 1.0, 0.1, 100, 150, 20  # a span of 10 mean-reversion times
    gen = torch.Generator().manual_seed(3)
    step = np.full(n, dt)
    t0, dts, _ = design([n], step)

    def draw(r: float, copies: int) -> np.ndarray:
        """``copies`` paths of n steps from 0 (the design: copies paths of equal length)."""
        t, h, path = design([n] * copies, np.tile(step, copies))
        x0 = torch.zeros(n * copies, 1, dtype=F64)
        start, end = replay_design(ou(r), x0, t, h, path, gen, 1e-3)
        return np.concatenate([np.zeros((copies, 1)), end[:, 0].numpy().reshape(copies, n)], 1)

    plain, corrected = [], []
    for estimate in rate_mle(draw(rate, sets), dt):
        refits = rate_mle(draw(float(estimate), boot), dt)
        out = bias_correct(["theta"], np.array([estimate]), np.array([0.3]), ["positive"],
                           refits[:, None], 0)
        plain.append(estimate)
        corrected.append(out["estimates"]["theta"])
    plain, corrected = np.array(plain), np.array(corrected)
    mc = plain.std() / math.sqrt(sets)
    bias = plain.mean() - rate
    assert bias > 3 * mc  # the bias is there: about 2/T = 0.2, 20 % (first order, AR(1))
    assert abs(corrected.mean() - rate) < 0.3 * bias
    assert corrected.std() < 1.3 * plain.std()  # at a modest cost in spread


def test_each_data_set_gets_its_own_reproducible_stream():
    """Replications of a study fitted with one seed must not share their bootstrap draws."""
    a, b = np.arange(10.0), np.arange(10.0) + 1e-12
    assert stream_seed(0, a) == stream_seed(0, a.copy())
    assert len({stream_seed(0, a), stream_seed(0, b), stream_seed(1, a)}) == 3
    assert 0 <= stream_seed(0, a) < 2 ** 63
