"""Case 2b: heat in d = 10, 50, 100 with the Gaussian mixture, correlated initial covariance.

Two figures per d:

* the time of one space-time training step of the mixture (log-density fields at a batch, the
  heat residual, backward, Adam), with the mixture's closed-form ∇ℓ and tr(D∇²ℓ) against the
  same fields by autograd (∇ℓ by one backward pass, then one more per dimension for ∂²ℓ/∂xᵢ²);
* the relative error of the predicted covariance at every evaluation time and the time it took,
  from ``neuralpde solve equation=heat ansatz=gmm`` (time-marching) in a fresh process.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from benchmarks.common import Column, Row, Spec, attempt, neuralpde_solve, row, tier
from benchmarks.heat_step_cost import looped_diagonal, step_cost_rows

CORRELATION = 0.5
SETTINGS: dict[str, dict[str, Any]] = {
    "full": dict(dims=(10, 50, 100), batch=256, repeats=7, budget_s=5.0, timeout_s=600),
    "quick": dict(dims=(10, 50), batch=256, repeats=3, budget_s=1.5, timeout_s=300),
    "smoke": dict(dims=(3,), batch=16, repeats=2, budget_s=0.2, timeout_s=120),
}
SPEC = Spec(
    "heat_gmm",
    "Heat with the Gaussian mixture (K = 1, float64, initial correlation "
    f"{CORRELATION:g}): training-step time, closed form against autograd; covariance error of "
    "the time-marched solution",
    (Column("time_s", "time"), Column("repeats", "repeats", "int"),
     Column("error", "cov rel error", "error")),
)


def run(quick: bool, device: str) -> list[Row]:
    s = SETTINGS[tier(quick)]
    rows: list[Row] = []
    for d in s["dims"]:
        rows += _step_cost(d, s, device)
        setting = f"d={d} solve"
        rows += attempt("neuralpde time-march", setting, lambda d=d: _solve(d, s, device))
    return rows


def _step_cost(d: int, s: dict[str, Any], device: str) -> list[Row]:
    from neuralpde_cli.ansatz.gmm import GaussianMixtureAnsatz, GMMConfig
    from neuralpde_cli.equations.base import LogDensityFields
    from neuralpde_cli.equations.heat import HeatConfig, HeatEquation

    setting, batch, dev = f"d={d} step, batch {s['batch']}", s["batch"], torch.device(device)
    heat = HeatEquation(HeatConfig(dim=d, initial_correlation=CORRELATION), torch.float64, dev)
    torch.manual_seed(0)
    model = GaussianMixtureAnsatz.for_equation(GMMConfig(components=1), heat)
    for p in model.parameters():  # away from the zero-initialized output layer
        p.data.add_(0.01 * torch.randn_like(p))
    gen = torch.Generator(device="cpu").manual_seed(0)
    t = heat.t_final * torch.rand(batch, generator=gen, dtype=torch.float64).to(dev)
    mean, std = heat.envelope(t)
    x = mean + std * torch.randn(batch, d, generator=gen, dtype=torch.float64).to(dev)
    sqrt_d = heat.diffusion_sqrt(t, x)

    def autograd_fields() -> Any:
        inputs = torch.cat([t[:, None], x], dim=-1).requires_grad_(True)
        ell = model.log_density(inputs[:, 0], inputs[:, 1:])
        grads = torch.autograd.grad(ell.sum(), inputs, create_graph=True)[0]
        lap = looped_diagonal(grads, inputs, range(1, d + 1)).sum(-1)
        return LogDensityFields(ell, grads[:, 0], grads[:, 1:], heat.diffusivity * lap)

    methods: dict[str, Callable[[], Any]] = {
        "neuralpde GMM, closed form": lambda: model.log_density_fields(t, x, sqrt_d),
        "GMM by autograd (loop over dims)": autograd_fields,
    }
    def loss_of(fields: Callable[[], Any]) -> Tensor:
        return heat.log_residual(t, x, fields()).pow(2).mean()

    return step_cost_rows(model, methods, loss_of, setting, s, device, tolerance=1e-8)


def _solve(d: int, s: dict[str, Any], device: str) -> Row:
    overrides = ["equation=heat", "ansatz=gmm", f"equation.dim={d}",
                 f"equation.initial_correlation={CORRELATION}"]
    summary = neuralpde_solve(overrides, device, s["timeout_s"])
    metrics = summary["metrics"]
    return row("neuralpde time-march", f"d={d} solve", time_s=summary["wall_time_s"],
               error=metrics.get("cov_rel_error"), note="solve time from summary.json (process start-up excluded)",
               metrics=metrics, overrides=overrides)
