"""The MLP on non-Gaussian laws (issue 28): the ensemble envelope's fields and normalization,
collocation from the SDE's paths, and the product reference of independent double wells,
checked against autograd, quadrature, exact Ornstein–Uhlenbeck moments and Monte Carlo."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import read_summary
from neuralpde_cli.ansatz.mlp import MLP, MLPConfig
from neuralpde_cli.equations.fokker_planck import FokkerPlanck, FokkerPlanckConfig
from neuralpde_cli.sdes import SDEConfig
from neuralpde_cli.training.samplers import CollocationSampler, SamplerConfig

DT = torch.float64
CPU = torch.device("cpu")


def _fp(dim: int, kind: str, **kw) -> FokkerPlanck:
    cfg = FokkerPlanckConfig(dim=dim, sde=SDEConfig(kind=kind), initial_mean=[0.0] * dim, **kw)
    return FokkerPlanck(cfg, DT, CPU)


def _scrambled(model: MLP, seed: int = 0) -> MLP:
    """The network and the tail narrowing moved at random (the envelope stays as fitted)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in list(model.layers.parameters()) + list(model.tail.parameters()):
            p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


@pytest.mark.parametrize("dim,kind", [(1, "double_well"), (2, "double_well_2d"), (3, "double_well")])
def test_ensemble_envelope_fields_match_autograd(dim: int, kind: str) -> None:
    """The Taylor-mode ∂ₜℓ, ∇ℓ and tr(D∇²ℓ) through the time-dependent whitening, the warped
    time, φ(t) and the tail narrowing β(t)|z|², against autograd on the plain log-density."""
    eq = _fp(dim, kind)
    model = _scrambled(MLP.for_equation(MLPConfig(), eq))
    assert model.whiten and not any(p.requires_grad for p in model.envelope.parameters())
    gen = torch.Generator().manual_seed(1)
    t = 5.0 * torch.rand(9, generator=gen, dtype=DT)
    x = torch.randn(9, dim, generator=gen, dtype=DT)
    s = eq.diffusion_sqrt(t, x)
    fields = model.log_density_fields(t, x, s)
    tr, xr = t.clone().requires_grad_(True), x.clone().requires_grad_(True)
    log_p = model.log_density(tr, xr) + model.log_mass(tr)  # the mass is set apart (normalize)
    dt, grad = torch.autograd.grad(log_p.sum(), (tr, xr), create_graph=True)
    d = s @ s.T
    trace = sum(torch.autograd.grad(grad[:, i].sum(), xr, retain_graph=True)[0] @ d[:, i]
                for i in range(dim))
    for got, want in ((fields.log_p, log_p), (fields.dt_log_p, dt), (fields.grad, grad),
                      (fields.trace_dh, trace)):
        assert torch.allclose(got, want.detach(), atol=1e-10, rtol=1e-10)


def test_ensemble_envelope_starts_at_the_initial_law_and_is_normalized() -> None:
    """p(0) = p₀ exactly (φ(0) = 0), and after ``normalize`` ∫p = 1 at every eval time on a
    fine grid, for an arbitrary network."""
    eq = _fp(1, "double_well")
    model = _scrambled(MLP.for_equation(MLPConfig(), eq), seed=3)
    x = torch.linspace(-8.0, 8.0, 16001, dtype=DT)[:, None]
    zero = torch.zeros(x.shape[0], dtype=DT)
    with torch.no_grad():
        assert torch.allclose(model.log_density(zero, x), eq.initial_log_density(x), atol=1e-12)
        masses_before = [float(torch.exp(model.log_density(torch.full_like(zero, t), x)).sum()
                               * (x[1, 0] - x[0, 0])) for t in eq.eval_times]
        model.normalize()
        masses = [float(torch.exp(model.log_density(torch.full_like(zero, t), x)).sum()
                        * (x[1, 0] - x[0, 0])) for t in eq.eval_times]
    assert max(abs(m - 1.0) for m in masses_before) > 1e-2  # the network moved the mass
    assert max(abs(m - 1.0) for m in masses) < 1e-6, masses


def test_paths_sampler_draws_where_the_law_is() -> None:
    """``sampler=paths`` on 1-D Ornstein–Uhlenbeck: the ensemble's mean and variance at its
    grid times against the exact moments (Monte Carlo error of 4,000 paths), and half of a
    batch is states of the paths themselves."""
    cfg = FokkerPlanckConfig(dim=1, sde=SDEConfig(kind="ou", theta=[[1.0]], mean=[1.0],
                                                  sigma=[[0.8]]), initial_mean=[0.0])
    eq = FokkerPlanck(cfg, DT, CPU)
    ensemble = eq.ensemble()
    mean, cov = ensemble.moments()
    exact_mean, exact_cov = eq.exact_moments(ensemble.times)
    sd = torch.sqrt(exact_cov[:, 0, 0])
    assert float(((mean[:, 0] - exact_mean[:, 0]) / sd).abs().max()) < 5.0 / math.sqrt(4000)
    assert float((cov[:, 0, 0] / exact_cov[:, 0, 0] - 1.0).abs()[1:].max()) < 0.1
    sampler = CollocationSampler(SamplerConfig(name="paths", batch_size=64), eq, None,
                                 torch.Generator().manual_seed(0))
    t, x = sampler()
    assert t.shape == (64,) and x.shape == (64, 1) and bool((t > 0).all())
    on_paths = (ensemble.paths[:, :, 0].unsqueeze(-1) == x[:, 0]).any(0).any(0)
    assert bool(on_paths[:32].all()) and not bool(on_paths[32:].any())


def test_product_reference_matches_monte_carlo_in_five_dimensions() -> None:
    """The product of 1-D finite-volume laws for 5 independent double wells: each coordinate's
    law at t = 2 against a histogram of the equation's own Euler–Maruyama ensemble, and the
    marginal estimator returns the exact law's marginals for the exact law."""
    eq = _fp(5, "double_well", eval_times=[2.0, 5.0])
    assert eq.product_factors() is not None and _fp(2, "double_well_2d").product_factors() is None
    ensemble = eq.ensemble()
    k = int(torch.argmin((ensemble.times - 2.0).abs()))
    assert abs(float(ensemble.times[k]) - 2.0) < 0.05
    edges = np.linspace(-2.0, 2.0, 21)
    fine = np.linspace(-2.0, 2.0, 2001)
    t = float(ensemble.times[k])
    # the five coordinates are alike: one histogram of 20,000 draws (its L1 noise ≈ 0.03)
    hist, _ = np.histogram(ensemble.paths[k].numpy().ravel(), edges, density=True)
    for i in range(5):
        dens = np.exp(eq._factor_log_density(i, t, fine))
        ref = np.array([dens[(fine >= a) & (fine < b)].mean() for a, b in zip(edges[:-1], edges[1:])])
        assert np.abs(hist - ref).sum() * (edges[1] - edges[0]) < 0.06
    later = np.exp(eq._factor_log_density(0, 5.0, fine))  # the law at another time is told apart
    ref5 = np.array([later[(fine >= a) & (fine < b)].mean() for a, b in zip(edges[:-1], edges[1:])])
    assert np.abs(hist - ref5).sum() * (edges[1] - edges[0]) > 0.1

    class Exact(torch.nn.Module):
        def log_density(self, t, x, cond=None):
            return eq._product_log_density(float(t[0]), x)

    errors = eq.product_errors(Exact(), n_points=512, n_inner=50, n_grid=41)
    assert errors["rel_l2_log_error"] < 1e-12 and errors["marginal_l1_error"] < 5e-3


def test_mlp_solves_the_double_well_from_a_point(cli, tmp_path: Path) -> None:
    """The issue's command on a small budget: the 1-D double well from a near point mass with
    the MLP's defaults (before: L1 1.9 at every eval time, 2 being the worst possible)."""
    out = tmp_path / "run"
    result = cli("solve", "equation=fokker_planck", "equation.dim=1",
                 "equation.sde.kind=double_well", "equation.initial_mean=[0.0]", "ansatz=mlp",
                 "optimizer.adam_steps=600", "optimizer.lbfgs_steps=10", "trainer.progress=false",
                 f"hydra.run.dir={out}")
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = read_summary(out)["metrics"]
    assert metrics["l1_error"] < 0.1, {k: v for k, v in metrics.items() if k.startswith("l1")}
    assert metrics["quadrature_mass_error"] < 1e-2
