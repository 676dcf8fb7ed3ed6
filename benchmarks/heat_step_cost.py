"""Case 2: the cost of one training step of the heat residual, by how ∇²ℓ is computed.

One step = the log-density fields (ℓ, ∂ₜℓ, ∇ℓ, tr(D∇²ℓ)) at a batch, the heat residual, its
mean square, backward and an Adam step, on the same network and the same points for every
method:

* neuralpde, exact trace: Taylor-mode forward pass along the d columns of √D (probes = 0);
* neuralpde, Hutchinson: the same pass along 4 random probes (probes = 4);
* whole-batch Hessian: ``torch.autograd.functional.hessian`` of Σℓ with respect to the whole
  (batch, 1 + d) input, then its diagonal blocks: O(batch²·d²) memory and batch·(1 + d)
  backward passes. Run only where that fits;
* loop over dimensions: ∇ℓ, then d backward passes for ∂²ℓ/∂xᵢ² (DeepXDE's way).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from benchmarks.common import Column, Row, Spec, attempt, median_time, row, skipped, tier

WIDTH, DEPTH, PROBES = 128, 3, 4  # the network of experiment=heat100d, used at every d
SPEC = Spec(
    "heat_step_cost",
    f"Heat: time of one training step (tanh MLP {DEPTH}×{WIDTH}, float32), median of repeats",
    (Column("time_s", "time / step"), Column("repeats", "repeats", "int")),
)
SETTINGS: dict[str, dict[str, Any]] = {
    # memory_gb caps the baselines' estimated peak memory (see _memory_gb); budget_s the time
    # spent repeating one measurement (a first call slower than that is the one measurement)
    "full": dict(dims=(2, 10, 100), batches=(256, 1024, 4096), repeats=7, budget_s=5.0,
                 memory_gb=5.0),
    "quick": dict(dims=(2, 10, 100), batches=(256, 1024), repeats=3, budget_s=1.5,
                  memory_gb=2.5),
    "smoke": dict(dims=(2, 5), batches=(16,), repeats=2, budget_s=0.2, memory_gb=0.05),
}


def _memory_gb(method: str, d: int, batch: int) -> float:
    """Peak memory of a baseline's step: every backward pass with create_graph keeps about
    7 float32 values per point and hidden unit alive (measured: 1.9 GB for the whole-batch
    Hessian at d = 2, batch 256). The Hessian takes batch·(1 + d) passes, the loop d."""
    passes = batch * (d + 1) if method == "whole-batch Hessian" else d
    return 7 * 4 * passes * batch * WIDTH * DEPTH / 1e9


# --- the two baselines' second derivatives (heat2d uses the Hessian one too) -----------
def hessian_diagonal(f: Callable[[Tensor], Tensor], inputs: Tensor) -> Tensor:
    """∂²f/∂zⱼ² at every point (B, n), from the whole-batch Hessian of Σf (B, n, B, n)."""
    hess = torch.autograd.functional.hessian(lambda z: f(z).sum(), inputs, create_graph=True)
    blocks = torch.diagonal(hess, dim1=0, dim2=2)  # (n, n, B): each point's own Hessian
    return torch.diagonal(blocks, dim1=0, dim2=1)  # (B, n)


def looped_diagonal(grads: Tensor, inputs: Tensor, dims: range) -> Tensor:
    """∂²f/∂zⱼ² for j in ``dims`` (B, len(dims)): one backward pass of ∇f per dimension."""
    return torch.stack([torch.autograd.grad(grads[:, j].sum(), inputs, create_graph=True)[0][:, j]
                        for j in dims], dim=-1)


# --- the case ---------------------------------------------------------------------------
def run(quick: bool, device: str) -> list[Row]:
    s = SETTINGS[tier(quick)]
    rows: list[Row] = []
    for d in s["dims"]:
        for batch in s["batches"]:
            rows += _setting(d, batch, s, device)
    return rows


def _setting(d: int, batch: int, s: dict[str, Any], device: str) -> list[Row]:
    from neuralpde_cli.ansatz.mlp import MLP, MLPConfig
    from neuralpde_cli.equations.base import LogDensityFields
    from neuralpde_cli.equations.heat import HeatConfig, HeatEquation

    setting = f"d={d} batch={batch}"
    dev = torch.device(device)
    heat = HeatEquation(HeatConfig(dim=d), torch.float32, dev)
    torch.manual_seed(0)
    model = MLP.for_equation(MLPConfig(width=WIDTH, depth=DEPTH, probes=0), heat)
    gen = torch.Generator(device="cpu").manual_seed(0)
    t = heat.t_final * torch.rand(batch, generator=gen).to(dev)
    x = torch.randn(batch, d, generator=gen).to(dev) * torch.sqrt(1.0 + t)[:, None]
    sqrt_d = heat.diffusion_sqrt(t, x)
    kappa = heat.diffusivity

    def baseline_fields(second: Callable[[Tensor, Tensor], Tensor]) -> Callable[[], Any]:
        def fields() -> Any:
            inputs = torch.cat([t[:, None], x], dim=-1).requires_grad_(True)
            ell = model(inputs)  # output=log: the network output is ℓ
            grads = torch.autograd.grad(ell.sum(), inputs, create_graph=True)[0]
            lap = second(grads, inputs).sum(-1)
            return LogDensityFields(ell, grads[:, 0], grads[:, 1:], kappa * lap)
        return fields

    methods: dict[str, Callable[[], Any]] = {
        "neuralpde exact trace (Taylor)": lambda: model.log_density_fields(t, x, sqrt_d, probes=0),
        f"neuralpde Hutchinson ({PROBES} probes)":
            lambda: model.log_density_fields(t, x, sqrt_d, probes=PROBES, generator=gen),
        "whole-batch Hessian": baseline_fields(lambda g, z: hessian_diagonal(model, z)[:, 1:]),
        "loop over dimensions":
            baseline_fields(lambda g, z: looped_diagonal(g, z, range(1, d + 1))),
    }
    def loss_of(fields: Callable[[], Any]) -> Tensor:
        return heat.log_residual(t, x, fields()).pow(2).mean()

    skip = {name: f"needs about {_memory_gb(name, d, batch):.1f} GB (cap {s['memory_gb']:g} GB)"
            for name in methods
            if not name.startswith("neuralpde") and _memory_gb(name, d, batch) > s["memory_gb"]}
    return step_cost_rows(model, methods, loss_of, setting, s, device, skip=skip,
                          unchecked=("Hutchinson",), tolerance=1e-3)


def step_cost_rows(model: torch.nn.Module, methods: dict[str, Callable[[], Any]],
                   loss_of: Callable[[Callable[[], Any]], Tensor], setting: str,
                   s: dict[str, Any], device: str, skip: dict[str, str] | None = None,
                   unchecked: tuple[str, ...] = (), tolerance: float = 1e-3) -> list[Row]:
    """Median time of one Adam step on ``loss_of(fields)`` per method, from the same weights.

    The first method is the reference: every other (but those named in ``unchecked``, e.g. a
    stochastic estimate) must give its loss to ``tolerance``, or its row says by how much not.
    """
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    first = next(iter(methods))
    reference = float(loss_of(methods[first]).detach())
    rows: list[Row] = []
    for name, fields in methods.items():
        if skip and name in skip:
            rows.append(skipped(name, setting, skip[name]))
            continue

        def measure(fields: Callable[[], Any] = fields, name: str = name) -> Row:
            model.load_state_dict(initial)  # every method starts from the same weights
            loss = float(loss_of(fields).detach())
            rel = abs(loss - reference) / max(abs(reference), 1e-300)
            agrees = any(u in name for u in unchecked) or rel < tolerance
            note = "" if agrees else f"loss differs from {first} by {rel:.1e}"
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

            def step() -> None:
                optimizer.zero_grad(set_to_none=True)
                loss_of(fields).backward()
                optimizer.step()

            timing = median_time(step, s["repeats"], device, s["budget_s"])
            return row(name, setting, time_s=timing.median_s, repeats=timing.repeats, note=note)

        rows += attempt(name, setting, measure)
    return rows
