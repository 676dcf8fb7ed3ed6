"""Steady diffusion on a grid: operator, multigrid, discretization order, adjoint, training."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from neuralpde_cli.ansatz.grid import GridAnsatz, GridConfig
from neuralpde_cli.equations.diffusion import (BoundaryConfig, DiffusionConfig, FieldConfig,
                                               SteadyDiffusion)
from neuralpde_cli.errors import UserError
from neuralpde_cli.references.sparse_direct import assemble_matrix, direct_solve
from neuralpde_cli.solvers.multigrid import MultigridConfig, MultigridSolver

F64, CPU = torch.float64, torch.device("cpu")
CHECKER = FieldConfig(kind="checkerboard", cells=4, contrast=100.0)
BUMP = FieldConfig(kind="gaussian_bump", value=1.0, amplitude=2.0, center=[0.4, 0.6], width=0.25)


def equation(kappa: FieldConfig = FieldConfig(), source: FieldConfig = FieldConfig(),
             bc: BoundaryConfig = BoundaryConfig(), domain=(0.0, 1.0, 0.0, 1.0)) -> SteadyDiffusion:
    cfg = DiffusionConfig(domain=list(domain), kappa=kappa, source=source, bc=bc)
    return SteadyDiffusion(cfg, F64, CPU)


def rel(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# --- (a) the torch stencil is the scipy matrix ---------------------------------------------------

@pytest.mark.parametrize("kappa", [CHECKER, BUMP], ids=["checkerboard", "bump"])
def test_operator_matches_scipy_matrix(kappa: FieldConfig) -> None:
    eq = equation(kappa, bc=BoundaryConfig(left="1.0", top="neumann", right="-2"),
                  domain=(0.0, 2.0, -1.0, 0.5))
    system = eq.discretize(23)
    T = torch.randn(23, 23, dtype=F64, generator=torch.Generator().manual_seed(0))
    expected = assemble_matrix(system) @ T.numpy().ravel()
    got = system.apply(T).numpy().ravel()
    assert np.linalg.norm(got - expected) <= 1e-12 * np.linalg.norm(expected)
    # the energy's gradient is minus the residual (what gradient training relies on)
    Tg = T.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(system.energy(Tg), Tg)
    assert torch.allclose(grad, -system.residual(system.with_boundary(T)), atol=1e-12, rtol=0)


# --- (b) multigrid reaches the direct solution ---------------------------------------------------

@pytest.mark.parametrize("n", [65, 129])
@pytest.mark.parametrize("kappa,bc,cycle", [
    (FieldConfig(), BoundaryConfig(), "fmg"),
    (CHECKER, BoundaryConfig(), "fmg"),
    (CHECKER, BoundaryConfig(), "pcg"),
    (BUMP, BoundaryConfig(left="1.0", bottom="neumann", top="neumann"), "fmg"),
], ids=["const", "checker-fmg", "checker-pcg", "bump-neumann"])
def test_multigrid_matches_direct(n: int, kappa: FieldConfig, bc: BoundaryConfig, cycle: str) -> None:
    system = equation(kappa, bc=bc).discretize(n)
    solver = MultigridSolver(MultigridConfig(cycle=cycle, tol=1e-11))
    T, history = solver.solve(system)
    assert history[-1]["rel_residual"] <= 1e-11
    assert [h["cycle"] for h in history] == list(range(1, len(history) + 1))
    assert rel(T.numpy(), direct_solve(system)) <= 1e-8
    assert system.rel_residual(T) <= 1e-10


def test_multigrid_variants_agree() -> None:
    """W-cycles, plain V-cycles, the conv stencil path and a warm start reach the same T."""
    eq = equation(BUMP, bc=BoundaryConfig(right="neumann", top="2.0"))
    system = eq.discretize(33)
    ref = direct_solve(system)
    for cfg in (MultigridConfig(cycle="w", tol=1e-11), MultigridConfig(cycle="v", tol=1e-11),
                MultigridConfig(stencil="conv", tol=1e-11), MultigridConfig(coarsest=3, tol=1e-11)):
        T, _ = MultigridSolver(cfg).solve(system)
        assert rel(T.numpy(), ref) <= 1e-8, cfg
    coarse, _ = MultigridSolver(MultigridConfig()).solve(eq.discretize(17))
    ansatz = GridAnsatz(GridConfig(resolution=33), system)
    ansatz.warm_start_from(coarse)
    T, history = MultigridSolver(MultigridConfig(tol=1e-11)).solve(system, ansatz.values().detach())
    assert rel(T.numpy(), ref) <= 1e-8
    # the warm start is a good guess: the first cycle already has a small residual
    assert history[0]["rel_residual"] < 1e-2


def test_fmg_reaches_discretization_accuracy_in_one_pass() -> None:
    system = equation(BUMP).discretize(257)
    T, history = MultigridSolver(MultigridConfig(max_cycles=1)).solve(system)
    assert len(history) == 1
    assert rel(T.numpy(), direct_solve(system)) <= 1e-5


# --- (c) second order in h -----------------------------------------------------------------------

def test_manufactured_solution_second_order() -> None:
    """T* = sin(πx/4) sin(πy) on [0, 2] × [0, 1], zero-flux right side, κ a Gaussian bump."""
    bump = FieldConfig(kind="gaussian_bump", value=1.0, amplitude=2.0, center=[0.7, 0.4], width=0.3)
    eq = equation(bump, bc=BoundaryConfig(right="neumann"), domain=(0.0, 2.0, 0.0, 1.0))

    def exact(x, y):
        return torch.sin(math.pi * x / 4) * torch.sin(math.pi * y)

    def kappa(x, y):
        return 1.0 + 2.0 * torch.exp(-((x - 0.7) ** 2 + (y - 0.4) ** 2) / (2 * 0.3 ** 2))

    errors = []
    ns = [17, 33, 65, 129]
    for n in ns:
        system = eq.discretize(n)
        X, Y = torch.meshgrid(system.x, system.y, indexing="ij")
        X, Y = X.clone().requires_grad_(True), Y.clone().requires_grad_(True)
        Tx, Ty = torch.autograd.grad(exact(X, Y).sum(), (X, Y), create_graph=True)
        k = kappa(X, Y)
        div = torch.autograd.grad((k * Tx).sum(), X, retain_graph=True)[0] \
            + torch.autograd.grad((k * Ty).sum(), Y)[0]
        system = system.with_fields(system.kappa, -div.detach())
        T = direct_solve(system)
        errors.append(np.abs(T - exact(X, Y).detach().numpy()).max())
    orders = np.log2(np.array(errors[:-1]) / np.array(errors[1:]))
    assert np.all((orders > 1.8) & (orders < 2.2)), (errors, orders)


# --- (d) adjoint gradients -----------------------------------------------------------------------

def test_adjoint_gradient_matches_finite_differences() -> None:
    eq = equation(CHECKER, BUMP, BoundaryConfig(left="1.0", top="neumann"))
    template = eq.discretize(17)
    solver = MultigridSolver(MultigridConfig(tol=1e-14, max_cycles=100))
    gen = torch.Generator().manual_seed(3)
    weights = torch.randn(17, 17, dtype=F64, generator=gen)

    def loss(kappa, source):
        T = solver.solve_differentiable(kappa, source, template)
        return (weights * T).sum() + 0.5 * (T ** 2).sum()

    kappa = template.kappa.clone().requires_grad_(True)
    source = template.source.clone().requires_grad_(True)
    grad_k, grad_s = torch.autograd.grad(loss(kappa, source), (kappa, source))
    T_plain, _ = solver.solve(template)
    assert torch.allclose(solver.solve_differentiable(template.kappa, template.source, template),
                          T_plain)
    for _ in range(3):
        vk = torch.randn(17, 17, dtype=F64, generator=gen) * template.kappa
        vs = torch.randn(17, 17, dtype=F64, generator=gen)
        eps = 1e-6
        with torch.no_grad():
            fd_k = (loss(template.kappa + eps * vk, template.source)
                    - loss(template.kappa - eps * vk, template.source)) / (2 * eps)
            fd_s = (loss(template.kappa, template.source + eps * vs)
                    - loss(template.kappa, template.source - eps * vs)) / (2 * eps)
        assert float(fd_k) == pytest.approx(float((grad_k * vk).sum()), rel=1e-5)
        assert float(fd_s) == pytest.approx(float((grad_s * vs).sum()), rel=1e-5)


# --- (e) gradient training of the grid ansatz ----------------------------------------------------

def test_lbfgs_on_energy_reaches_direct_solution() -> None:
    eq = equation(BUMP, bc=BoundaryConfig(left="1.0", top="neumann"))
    ansatz = GridAnsatz.for_equation(GridConfig(resolution=17, loss="energy"), eq)
    opt = torch.optim.LBFGS(ansatz.parameters(), lr=1.0, max_iter=200, history_size=50,
                            tolerance_grad=1e-14, tolerance_change=1e-16,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = ansatz.loss_terms()["pde"]
        loss.backward()
        return loss

    opt.step(closure)
    T = ansatz.values().detach()
    metrics = eq.evaluate(T, 17)
    assert metrics["rel_l2_error"] <= 1e-6
    assert metrics["rel_residual"] <= 1e-5
    # the residual loss vanishes at the same solution
    assert float(ansatz.loss_terms(loss="residual")["pde"].detach()) <= 1e-8
    arrays = eq.solution_arrays(T, 17)
    assert arrays["T"].shape == arrays["kappa"].shape == arrays["residual"].shape == (17, 17)
    assert arrays["x"].shape == (17,) and "T_reference" in arrays
    assert np.all(arrays["T"][0, 1:] == 1.0)  # the Dirichlet side holds exactly
    assert arrays["T"][0, 0] == 0.5           # a corner between two Dirichlet sides: their mean


def test_pinn_loss_vanishes_for_exact_solution() -> None:
    """T* = sin(πx) sin(πy), κ = 1, s = 2π² T* (given as a node field via a file)."""
    eq = equation()
    x, y = eq.coordinates(257)
    source = 2 * math.pi ** 2 * torch.outer(torch.sin(math.pi * x), torch.sin(math.pi * y))

    class Exact(torch.nn.Module):
        def forward(self, xy):
            return torch.sin(math.pi * xy[:, 0]) * torch.sin(math.pi * xy[:, 1])

    eq._pinn_nodes = (torch.ones_like(source), source)
    terms = eq.pinn_loss_terms(Exact(), 512, torch.Generator().manual_seed(0))
    assert set(terms) == {"pde", "bc"}
    assert float(terms["pde"].detach()) < 1e-5 * (2 * math.pi ** 2) ** 2
    assert float(terms["bc"].detach()) < 1e-28
    wrong = eq.pinn_loss_terms(lambda xy: xy[:, 0] * 0 + 1.0, 64, torch.Generator().manual_seed(0))
    assert float(wrong["bc"].detach()) == pytest.approx(1.0)


# --- (f) bad input -------------------------------------------------------------------------------

@pytest.mark.parametrize("make,match", [
    (lambda p: equation(FieldConfig(value=-1.0)), r"kappa.*not > 0"),
    (lambda p: equation(FieldConfig(kind="checkerboard", contrast=-5.0)), r"kappa.*not > 0"),
    (lambda p: equation(FieldConfig(kind="file", path=str(p / "missing.npy"))), "does not exist"),
    (lambda p: equation(FieldConfig(kind="file", path=_save(p / "cube.npy", np.ones((3, 3, 3))))),
     r"shape \(3, 3, 3\)"),
    (lambda p: equation(FieldConfig(kind="file", path=_save(p / "neg.npy", -np.ones((4, 5)))),
                        ), r"minimum value -1"),
    (lambda p: equation(FieldConfig(kind="wavy")), "choose one of"),
    (lambda p: equation(bc=BoundaryConfig(top="open")), r"bc.top='open'"),
    (lambda p: equation(bc=BoundaryConfig(*["neumann"] * 4)), "all four sides"),
    (lambda p: equation(domain=(0.0, -1.0, 0.0, 1.0)), "domain"),
    (lambda p: MultigridSolver(MultigridConfig()).solve(equation().discretize(100)),
     r"resolution 100 is not 2\^k\+1; allowed: 17, 33, 65"),
    (lambda p: equation().discretize(2), "resolution 2"),
    (lambda p: MultigridSolver(MultigridConfig(cycle="f")), "cycle"),
    (lambda p: GridAnsatz.for_equation(GridConfig(loss="l1"), equation()), "ansatz.loss"),
])
def test_bad_input_raises_user_error(tmp_path, make, match) -> None:
    with pytest.raises(UserError, match=match):
        make(tmp_path)


def _save(path, array) -> str:
    np.save(path, array)
    return str(path)


def test_file_fields_npy_and_image(tmp_path) -> None:
    """A .npy is resampled bilinearly; an image maps grey to range with its top row at the top."""
    arr = np.add.outer(np.arange(5.0), 10 * np.arange(3.0)) + 1.0     # linear: exact under bilinear
    eq = equation(FieldConfig(kind="file", path=_save(tmp_path / "k.npy", arr)))
    kappa = eq.discretize(9).kappa.numpy()
    xs = np.linspace(0, 4, 9)
    assert np.allclose(kappa, 1.0 + np.add.outer(xs, 10 * np.linspace(0, 2, 9)))
    import matplotlib.image as mpimg
    img = np.zeros((4, 6))
    img[0] = 1.0                                                          # white top row
    mpimg.imsave(tmp_path / "k.png", img, cmap="gray", vmin=0, vmax=1)
    eq = equation(FieldConfig(kind="file", path=str(tmp_path / "k.png"), range=[2.0, 50.0]))
    kappa = eq.discretize(7).kappa.numpy()
    assert np.allclose(kappa[:, -1], 50.0) and np.allclose(kappa[:, 0], 2.0)


def test_plots(tmp_path) -> None:
    from neuralpde_cli.run.plots_grid import plot_grid_run, plot_level_convergence
    eq = equation(CHECKER, bc=BoundaryConfig(top="neumann"))
    T, history = MultigridSolver(MultigridConfig()).solve(eq.discretize(33))
    eq.evaluate(T, 33)
    np.savez(tmp_path / "solution.npz", **eq.solution_arrays(T, 33))
    paths = plot_grid_run(tmp_path / "solution.npz", tmp_path / "plots")
    assert {p.name for p in paths} == {"solution.png", "error.png"}
    out = plot_level_convergence({"17": history, "33": history}, tmp_path / "plots" / "levels.png")
    assert all(p.exists() and p.stat().st_size > 0 for p in paths + out)
