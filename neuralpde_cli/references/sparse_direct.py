"""The diffusion system assembled as a scipy sparse matrix and solved directly.

This is the check on the torch stencil code, so it shares none of it: the matrix is built
edge by edge (A = Σ_edges c_e (e_p − e_q)(e_p − e_q)ᵀ) in numpy from the node values of κ,
the grid spacing and the boundary description of a :class:`GridSystem`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla

if TYPE_CHECKING:
    from neuralpde_cli.equations.diffusion import GridSystem


def _numpy(system: GridSystem) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    return tuple(t.detach().cpu().numpy() for t in (system.kappa, system.source,
                                                     system.dirichlet_mask, system.dirichlet_values))


def assemble_matrix(system: GridSystem) -> sp.csr_matrix:
    """A on all n² nodes (index i·n + j): unknown rows couple to every neighbour, Dirichlet rows
    are zero, so A @ T.ravel() is the torch ``system.apply(T)``."""
    kappa, _, dirichlet, _ = _numpy(system)
    n = kappa.shape[0]
    hx, hy = system.h
    idx = np.arange(n * n).reshape(n, n)
    half = np.ones(n)
    half[[0, -1]] = 0.5                      # edges on a boundary line bound half a volume
    harm = lambda a, b: 2.0 * a * b / (a + b)  # noqa: E731
    cx = harm(kappa[1:], kappa[:-1]) * (hy / hx) * half[None, :]
    cy = harm(kappa[:, 1:], kappa[:, :-1]) * (hx / hy) * half[:, None]
    p = np.concatenate([idx[:-1].ravel(), idx[:, :-1].ravel()])
    q = np.concatenate([idx[1:].ravel(), idx[:, 1:].ravel()])
    c = np.concatenate([cx.ravel(), cy.ravel()])
    rows = np.concatenate([p, q, p, q])
    cols = np.concatenate([p, q, q, p])
    vals = np.concatenate([c, c, -c, -c])
    a = sp.coo_matrix((vals, (rows, cols)), shape=(n * n, n * n)).tocsr()
    return (sp.diags((~dirichlet).ravel().astype(np.float64)) @ a).tocsr()


def control_volumes(n: int, h: tuple[float, float]) -> np.ndarray:
    half = np.ones(n)
    half[[0, -1]] = 0.5
    return h[0] * h[1] * np.outer(half, half)


def assemble_reduced(system: GridSystem) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray]:
    """(A_UU, b_U, indices of the unknowns): b_U = (w s)_U − A_UD g_D."""
    kappa, source, dirichlet, values = _numpy(system)
    n = kappa.shape[0]
    a = assemble_matrix(system)
    unknown = np.flatnonzero(~dirichlet.ravel())
    known = np.flatnonzero(dirichlet.ravel())
    a_u = a[unknown]
    b = (control_volumes(n, system.h) * source).ravel()[unknown] \
        - a_u[:, known] @ values.ravel()[known]
    return a_u[:, unknown].tocsc(), b, unknown


def direct_solve(system: GridSystem) -> np.ndarray:
    """The discrete solution (n, n), boundary values included, by a sparse LU solve."""
    _, _, dirichlet, values = _numpy(system)
    a_uu, b, unknown = assemble_reduced(system)
    # minimum degree on AᵀA+A suits this symmetric 5-point matrix far better than COLAMD
    t_u = spla.spsolve(a_uu, b, permc_spec="MMD_AT_PLUS_A")
    out = np.where(dirichlet, values, 0.0).ravel()
    out[unknown] = t_u
    return out.reshape(dirichlet.shape)
