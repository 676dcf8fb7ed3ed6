"""Histogram density of Euler–Maruyama paths: a reference that shares no code with the PDE solvers.

Its error is statistical (≈ √(p/(n h^d)) per bin) plus the O(Δt) weak error of the scheme, so
it checks the finite-volume reference and the mixture to a few 1e-3 in L1, not better.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from neuralpde_cli.references.fd_density import FDSolution


def histogram_density(sde: torch.nn.Module, mean: Tensor, cov: Tensor, times: Sequence[float],
                      box: np.ndarray, bins: int | Sequence[int], n_paths: int,
                      generator: torch.Generator | None = None, dt: float = 1e-3) -> FDSolution:
    """Density estimate at ``times`` on ``box`` ((d, 2)) from n_paths paths started at N(mean, cov).

    Normalized by the number of paths (mass that left the box is missing, not redistributed).
    Returned in the finite-volume reference's container, so the same L1 and interpolation apply.
    """
    box = np.asarray(box, dtype=float).reshape(-1, 2)
    d = box.shape[0]
    n = [int(bins)] * d if np.isscalar(bins) else [int(b) for b in bins]
    z = torch.randn(n_paths, d, generator=generator, dtype=mean.dtype).to(mean.device)
    x0 = mean + z @ torch.linalg.cholesky(cov).T
    t = torch.as_tensor(sorted(float(s) for s in times), dtype=mean.dtype, device=mean.device)
    with torch.no_grad():
        paths = sde.euler_maruyama(x0, t, n_paths, generator, dt).cpu().numpy()
    edges = [np.linspace(lo, hi, k + 1) for (lo, hi), k in zip(box, n)]
    vol = float(np.prod([(hi - lo) / k for (lo, hi), k in zip(box, n)]))
    dens = np.stack([np.histogramdd(p, bins=edges)[0] / (n_paths * vol) for p in paths])
    centers = [0.5 * (e[1:] + e[:-1]) for e in edges]
    return FDSolution(t.cpu().numpy(), centers, dens)
