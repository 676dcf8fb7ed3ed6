"""Case 3: the 2-D Ornstein–Uhlenbeck Fokker–Planck equation (``equation=fokker_planck``).

neuralpde's default for it (the Gaussian mixture, time-marched), the same mixture trained in
space-time (``experiment=ou_spacetime``: Levenberg–Marquardt, and L-BFGS as the first-order
baseline) and its MLP (Adam + L-BFGS), each the real CLI in a fresh process: the relative L2
error against the exact OU density at the equation's evaluation times, and the time it took.

A second setting marches many (x₀, θ, σ) members at once (``TimeMarcher.run(x0_batch=…,
param_batch=…)``, the form calibration needs) against one march per member: time per member
and the worst error over the members against each one's exact density.
"""

from __future__ import annotations

from typing import Any

import torch

from benchmarks.common import (TRAINING, Column, Row, Spec, attempt, median_time, neuralpde_row,
                               row, tier)
from neuralpde_cli.ansatz.gmm import GaussianMixtureAnsatz, GMMConfig
from neuralpde_cli.equations.base import gaussian_log_density, relative_l2_from_logs
from neuralpde_cli.equations.fokker_planck import FokkerPlanck, FokkerPlanckConfig
from neuralpde_cli.sdes import SDEConfig
from neuralpde_cli.solvers.time_march import TimeMarchConfig, TimeMarcher

TARGET = 1e-2
SETTING = "2-D OU"
SETTINGS: dict[str, dict[str, Any]] = {
    "full": dict(budget_s=30.0, timeout_s=300, members=256, lm=[], lbfgs=[]),
    "quick": dict(budget_s=10.0, timeout_s=120, members=64, lm=[], lbfgs=[]),
    "smoke": dict(budget_s=1.0, timeout_s=120, members=4, lm=["optimizer.lm_steps=3"],
                  lbfgs=["optimizer.lbfgs_steps=1", "optimizer.lbfgs_iters=5"]),
}
BATCH_SETTING = "2-D OU, per (x0, θ, σ)"
SPEC = Spec(
    "fokker_planck",
    "2-D Ornstein–Uhlenbeck Fokker–Planck: relative L2 error against the exact density (worst "
    "over the equation's eval times), and time",
    (Column("time_s", "time"), Column("time_to_target_s", f"time to {TARGET:g}"),
     Column("error", "final error", "error"), Column("errors_by_t", "final error by t", "by_t")),
    ratio_key="time_s", plot="curves", target=TARGET,
)


def run(quick: bool, device: str) -> list[Row]:
    s = SETTINGS[tier(quick)]
    methods = {
        "neuralpde default (GMM)": ["equation=fokker_planck"],
        "neuralpde space-time GMM, Levenberg–Marquardt": [
            "experiment=ou_spacetime", "trainer.eval_every=10", *s["lm"]],
        "neuralpde space-time GMM, L-BFGS": [
            "experiment=ou_spacetime", "optimizer=lbfgs", "optimizer.lbfgs_steps=60",
            "trainer.eval_every=5", *s["lbfgs"]],
        "neuralpde MLP": ["equation=fokker_planck", "ansatz=mlp", "optimizer=adam_lbfgs",
                          *TRAINING[tier(quick)]],
    }
    rows: list[Row] = []
    for name, overrides in methods.items():
        rows += attempt(name, SETTING, lambda: neuralpde_row(
            name, SETTING, overrides, device, s["timeout_s"], TARGET, s["budget_s"]))
    members = int(s["members"])
    rows += attempt("neuralpde time-march, batched", BATCH_SETTING,
                    lambda: _batch_rows(members, device))
    return rows


def _members(n: int, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    """n random OU problems: start points, drift matrices (eigenvalues with real part > 0.3),
    lower-triangular noise."""
    gen = torch.Generator().manual_seed(11)
    u = lambda *shape: torch.rand(*shape, generator=gen, dtype=dtype)  # noqa: E731
    theta = torch.diag_embed(0.5 + u(n, 2)) + 0.3 * (2 * u(n, 2, 2) - 1)
    sigma = torch.tril(0.3 * (2 * u(n, 2, 2) - 1)) + torch.diag_embed(0.4 + 0.6 * u(n, 2))
    level = 2 * u(n, 2) - 1
    x0 = 2 * u(n, 2) - 1
    return {k: v.to(device) for k, v in dict(x0=x0, theta=theta, sigma=sigma, level=level).items()}


def _equation(dtype: torch.dtype, device: torch.device, x0: list[float] | None = None,
              theta: Any = None, sigma: Any = None, level: Any = None) -> FokkerPlanck:
    sde = SDEConfig() if theta is None else SDEConfig(theta=theta, sigma=sigma, mean=level)
    return FokkerPlanck(FokkerPlanckConfig(sde=sde, initial_mean=x0 or [], t_final=5.0), dtype, device)


def _batch_rows(n: int, device_name: str) -> list[Row]:
    """Time per member: one march per member against all n in one batch; worst rel. L2."""
    dtype, device = torch.float64, torch.device(device_name)
    m = _members(n, dtype, device)
    base = _equation(dtype, device)
    ansatz = GaussianMixtureAnsatz(GMMConfig(condition_on_x0=True), base, dtype, device)
    marcher = TimeMarcher(TimeMarchConfig())
    params = {"sde.a": -m["theta"], "sde.c": (m["theta"] @ m["level"].unsqueeze(-1)).squeeze(-1),
              "sde.sigma": m["sigma"]}
    batched = median_time(lambda: marcher.run(base, ansatz, x0_batch=m["x0"], param_batch=params),
                          3, device_name)
    singles = min(n, 8)  # one march each for a few members: the per-member cost of the loop

    def one_by_one() -> list[Any]:
        return [marcher.run(_equation(dtype, device, m["x0"][b].tolist(), m["theta"][b].tolist(),
                                      m["sigma"][b].tolist(), m["level"][b].tolist()), ansatz)
                for b in range(singles)]

    looped = median_time(one_by_one, 3, device_name)
    solution = batched.result.ansatz
    gen = torch.Generator().manual_seed(5)
    worst = 0.0
    for b in range(n):
        own = _equation(dtype, device, m["x0"][b].tolist(), m["theta"][b].tolist(),
                        m["sigma"][b].tolist(), m["level"][b].tolist())
        times = torch.tensor(own.eval_times, dtype=dtype, device=device)
        means, covs = own.exact_moments(times)
        for i, t in enumerate(own.eval_times):
            z = torch.randn(512, 2, generator=gen, dtype=dtype).to(device)
            x = means[i] + z @ torch.linalg.cholesky(covs[i]).T
            cond = solution.conditions[b].expand(512, -1)
            with torch.no_grad():
                log_pred = solution.log_density(torch.full((512,), t, dtype=dtype, device=device),
                                                x, cond=cond)
            worst = max(worst, relative_l2_from_logs(log_pred, gaussian_log_density(x, means[i], covs[i])))
    return [row(f"neuralpde time-march, {n} members in one batch", BATCH_SETTING,
                time_s=batched.median_s / n, error=worst,
                note=f"median of {batched.repeats}; total {batched.median_s:.3g} s"),
            row("neuralpde time-march, one march per member", BATCH_SETTING,
                time_s=looped.median_s / singles,
                note=f"{singles} members, median of {looped.repeats}")]
