"""Case 1: 2-D heat ∂u/∂t = ½∇²u from N(0, I) on t ∈ [0, 10], exact solution N(0, (1 + t)I).

Every method is scored the same way: the relative L2 error of u on 4096 points drawn from the
exact solution at t = 0, 1, 2.5, 5, 10 (the headline is the worst of the five), against its
training time; and, since those points never fall where the solution has no mass, on the
regular grid neuralpde writes to solution.npz (64² over ±13.3 = ±4 final standard deviations):
relative L2 error and the largest error as a fraction of the peak, worst over the five times
(DeepXDE, trained on [-6, 6]², also on a 64² grid of its own box). The baselines' clocks stop while they are evaluated; neuralpde's is its
trainer's ``elapsed_s`` (its own quick evaluations included; a solver without a trainer reports
its wall time). Time to 1e-2 comes from each run's error-against-time record. Methods:

* neuralpde's MLP (``experiment=heat2d``) and Gaussian mixture (``equation=heat ansatz=gmm``),
  each the real CLI in a fresh process, read back from ``summary.json`` and ``metrics.csv``;
* the classic PINN of the same network on u itself, its Laplacian from the whole-batch Hessian
  (batch 64, 100 initial-condition steps, then 1000 Adam steps, as published);
* DeepXDE (PyTorch backend) on the box [-6, 6]² with exact Dirichlet and initial data, Adam then
  L-BFGS, in a fresh process (it changes torch's global defaults on import).
"""

from __future__ import annotations

import importlib.util
import math
from typing import Any, Callable

import torch
from torch import Tensor

from benchmarks.common import (TRAINING, Clock, Column, Row, Spec, attempt, call_in_subprocess,
                               curve_figures, neuralpde_errors_by_t, neuralpde_row, row, tier,
                               unavailable)
from benchmarks.heat_step_cost import hessian_diagonal

TARGET = 1e-2
T_FINAL, KAPPA, BOX = 10.0, 0.5, 6.0
#: the half-width of solution.npz's grid for this problem: 4 standard deviations at t = T
GRID_HALF, GRID_SIDE = 4.0 * math.sqrt(1.0 + 2.0 * KAPPA * T_FINAL), 64
EVAL_TIMES = (0.0, 1.0, 2.5, 5.0, 10.0)
SETTING = "d=2, t∈[0,10]"
SETTINGS: dict[str, dict[str, Any]] = {
    "full": dict(
        budget_s=30.0, timeout_s=300,
        pinn=dict(ic_steps=100, steps=1000, batch=64, eval_every=25, cap_s=240.0),
        deepxde=dict(adam_steps=5000, lbfgs_steps=2000, n_domain=2000, n_boundary=200,
                     n_initial=200, eval_every=100, cap_s=180.0)),
    "quick": dict(
        budget_s=10.0, timeout_s=120,
        pinn=dict(ic_steps=100, steps=1000, batch=64, eval_every=10, cap_s=8.0),
        deepxde=dict(adam_steps=1000, lbfgs_steps=200, n_domain=1000, n_boundary=100,
                     n_initial=100, eval_every=50, cap_s=8.0)),
    "smoke": dict(
        budget_s=1.0, timeout_s=120,
        pinn=dict(ic_steps=3, steps=6, batch=16, eval_every=3, cap_s=5.0),
        deepxde=dict(adam_steps=20, lbfgs_steps=10, n_domain=64, n_boundary=16, n_initial=16,
                     eval_every=10, cap_s=5.0)),
}
SPEC = Spec(
    "heat2d",
    "2-D heat ∂u/∂t = ½∇²u from N(0, I), t ∈ [0, 10]: relative L2 error of u against the exact "
    f"N(0, (1+t)I) (worst of t = {', '.join(f'{t:g}' for t in EVAL_TIMES)}); training time; "
    f"budget {SETTINGS['full']['budget_s']:g} s ({SETTINGS['quick']['budget_s']:g} s quick)",
    (Column("time_s", "train time"), Column("time_to_target_s", f"time to {TARGET:g}"),
     Column("error_at_budget", "error @ budget", "error"), Column("error", "final error", "error"),
     Column("grid_error", "grid L2 (±13.3)", "error"),
     Column("max_rel_peak_error", "max err/peak (grid)", "error"),
     Column("errors_by_t", "final error by t", "by_t")),
    ratio_key="time_to_target_s", plot="curves", target=TARGET,
)


def run(quick: bool, device: str) -> list[Row]:
    s = SETTINGS[tier(quick)]
    neuralpde = {"neuralpde MLP": ["experiment=heat2d", *TRAINING[tier(quick)]],
                 "neuralpde GMM": ["equation=heat", "ansatz=gmm"]}
    rows: list[Row] = []
    for name, overrides in neuralpde.items():
        rows += attempt(name, SETTING, lambda: _neuralpde_row(name, overrides, device, s))
    rows += attempt("PINN, whole-batch Hessian", SETTING, lambda: _pinn(s, device))
    rows += attempt("DeepXDE (PyTorch)", SETTING, lambda: _deepxde(s, device))
    return rows


# --- scoring ----------------------------------------------------------------------------
def exact_u(t: Tensor, x: Tensor) -> Tensor:
    var = 1.0 + 2.0 * KAPPA * t
    return torch.exp(-(x * x).sum(-1) / (2.0 * var)) / (2.0 * math.pi * var)


def exact_errors(u: Callable[[Tensor], Tensor], n: int = 4096) -> dict[str, float]:
    """Relative L2 error of ``u`` ((N, 3) inputs (t, x, y) → (N,)) at each eval time, on
    points drawn from the exact solution (float64, the same points for every method)."""
    gen = torch.Generator(device="cpu").manual_seed(1234)
    out = {}
    for t in EVAL_TIMES:
        x = torch.randn(n, 2, generator=gen, dtype=torch.float64) * math.sqrt(1.0 + 2.0 * KAPPA * t)
        tt = torch.full((n,), t, dtype=torch.float64)
        with torch.no_grad():
            pred = u(torch.cat([tt[:, None], x], dim=-1)).detach().to("cpu", torch.float64)
        exact = exact_u(tt, x)
        diff = torch.linalg.norm(pred.reshape(-1) - exact)
        out[f"{t:g}"] = float(diff / torch.linalg.norm(exact))
    return out


def grid_errors(u: Callable[[Tensor], Tensor], half: float = GRID_HALF,
                n: int = GRID_SIDE) -> dict[str, Any]:
    """Relative L2 error and max |error| / peak of ``u`` on the n² grid over [−half, half]²
    at each eval time (float64), worst over the times and by time."""
    axis = torch.linspace(-half, half, n, dtype=torch.float64)
    a, b = torch.meshgrid(axis, axis, indexing="ij")
    x = torch.stack([a.reshape(-1), b.reshape(-1)], -1)
    by_t: dict[str, dict[str, float]] = {"grid_rel_l2_error": {}, "max_rel_peak_error": {}}
    for t in EVAL_TIMES:
        tt = torch.full((x.shape[0],), t, dtype=torch.float64)
        with torch.no_grad():
            pred = u(torch.cat([tt[:, None], x], dim=-1)).detach().to("cpu", torch.float64)
        exact = exact_u(tt, x)
        diff = pred.reshape(-1) - exact
        by_t["grid_rel_l2_error"][f"{t:g}"] = float(torch.linalg.norm(diff) / torch.linalg.norm(exact))
        by_t["max_rel_peak_error"][f"{t:g}"] = float(diff.abs().max() / exact.max())
    return {"grid_error": max(by_t["grid_rel_l2_error"].values()),
            "max_rel_peak_error": max(by_t["max_rel_peak_error"].values()), "grid_by_t": by_t}


def _neuralpde_row(name: str, overrides: list[str], device: str, s: dict[str, Any]) -> Row:
    """A neuralpde row with the grid figures its own summary.json reports (on the same grid)."""
    out = neuralpde_row(name, SETTING, overrides, device, s["timeout_s"], TARGET, s["budget_s"])
    metrics = out["metrics"]
    out.update(grid_error=metrics.get("grid_rel_l2_error"),
               max_rel_peak_error=metrics.get("max_rel_peak_error"),
               grid_by_t={key: neuralpde_errors_by_t(metrics, key)
                          for key in ("grid_rel_l2_error", "max_rel_peak_error")})
    return out


def _result_row(method: str, s: dict[str, Any], errors: dict[str, float], time_s: float,
                curve: list[tuple[float, float]], **extra: Any) -> Row:
    error = max(errors.values())
    return row(method, SETTING, time_s=time_s, error=error, errors_by_t=errors,
               **curve_figures(curve, TARGET, s["budget_s"], error, time_s), **extra)


# --- the classic PINN: u itself, Laplacian from the whole-batch Hessian -----------------
class TanhNet(torch.nn.Module):
    """u(t, x, y) = U₀·MLP(t/5 − 1, x/6, y/6), tanh; the same layers as neuralpde's MLP."""

    def __init__(self, width: int, depth: int) -> None:
        super().__init__()
        sizes = [3] + [width] * depth + [1]
        self.layers = torch.nn.ModuleList(torch.nn.Linear(a, b)
                                          for a, b in zip(sizes[:-1], sizes[1:]))
        for layer in self.layers:
            torch.nn.init.xavier_normal_(layer.weight)
            torch.nn.init.zeros_(layer.bias)
        self.register_buffer("scale", torch.tensor([T_FINAL / 2, BOX, BOX]))
        self.register_buffer("shift", torch.tensor([1.0, 0.0, 0.0]))

    def forward(self, z: Tensor) -> Tensor:
        h = z / self.scale - self.shift
        for layer in self.layers[:-1]:
            h = torch.tanh(layer(h))
        return self.layers[-1](h).squeeze(-1) / (2.0 * math.pi)


def _pinn(s: dict[str, Any], device: str) -> Row:
    from neuralpde_cli.ansatz.mlp import MLPConfig

    p = s["pinn"]
    cfg = MLPConfig()
    torch.manual_seed(0)
    net = TanhNet(cfg.width, cfg.depth).to(device)
    u = lambda z: net(z.float().to(device))  # noqa: E731 - for exact_errors
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    gen = torch.Generator(device="cpu").manual_seed(0)

    def box(n: int) -> Tensor:
        return (BOX * (2.0 * torch.rand(n, 2, generator=gen) - 1.0)).to(device)

    clock, curve = Clock(device), []
    total = p["ic_steps"] + p["steps"]
    for k in range(total):
        x0 = box(p["batch"])
        z0 = torch.cat([torch.zeros(p["batch"], 1, device=device), x0], dim=-1)
        loss = ((net(z0) - exact_u(z0[:, 0], x0)) ** 2).mean()
        if k >= p["ic_steps"]:
            t = T_FINAL * torch.rand(p["batch"], 1, generator=gen).to(device)
            z = torch.cat([t, box(p["batch"])], dim=-1).requires_grad_(True)
            u_t = torch.autograd.grad(net(z).sum(), z, create_graph=True)[0][:, 0]
            lap = hessian_diagonal(net, z)[:, 1:].sum(-1)
            loss = loss + ((u_t - KAPPA * lap) ** 2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (k + 1) % p["eval_every"] == 0 or k + 1 == total or clock.read() > p["cap_s"]:
            elapsed = clock.pause()
            curve.append((elapsed, max(exact_errors(u).values())))
            clock.resume()
            if elapsed > p["cap_s"]:
                break
    errors = exact_errors(u)
    note = (f"{cfg.depth}×{cfg.width} tanh, float32, batch {p['batch']}, "
            f"{p['ic_steps']} IC + {max(0, k + 1 - p['ic_steps'])} Adam steps"
            + (f" (stopped at the {p['cap_s']:g} s cap)" if k + 1 < total else ""))
    return _result_row("PINN, whole-batch Hessian", s, errors, clock.elapsed, curve, note=note,
                       **grid_errors(u))


# --- DeepXDE ----------------------------------------------------------------------------
def _deepxde(s: dict[str, Any], device: str) -> Row:
    if importlib.util.find_spec("deepxde") is None:
        return unavailable("DeepXDE (PyTorch)", SETTING,
                           "deepxde is not installed (pip install '.[bench]')")
    from neuralpde_cli.ansatz.mlp import MLPConfig
    cfg = MLPConfig()
    env = {"DDE_BACKEND": "pytorch"} | ({"CUDA_VISIBLE_DEVICES": ""} if device == "cpu" else {})
    out = call_in_subprocess("benchmarks.heat2d:deepxde_child",
                             dict(s["deepxde"], width=cfg.width, depth=cfg.depth),
                             timeout_s=s["timeout_s"], env=env)
    d = s["deepxde"]
    own = out["own_box"]
    note = (f"DeepXDE {out['version']}, {cfg.depth}×{cfg.width} tanh, float32, "
            f"{d['n_domain']}+{d['n_boundary']}+{d['n_initial']} points, "
            f"{out['steps']} Adam+L-BFGS iterations"
            + (" (stopped at the cap)" if out["capped"] else "")
            + f"; on its own box [-{BOX:g}, {BOX:g}]² (64²): grid L2 {own['grid_error']:.1e}, "
              f"max err/peak {own['max_rel_peak_error']:.1e}")
    return _result_row("DeepXDE (PyTorch)", s, out["errors_by_t"], out["time_s"],
                       [tuple(p) for p in out["curve"]], note=note, own_box=own, **out["grid"])


def deepxde_child(adam_steps: int, lbfgs_steps: int, n_domain: int, n_boundary: int,
                  n_initial: int, eval_every: int, cap_s: float, width: int,
                  depth: int) -> dict[str, Any]:
    """Runs in a fresh process with DDE_BACKEND=pytorch; returns the errors and the curve."""
    import deepxde as dde
    import numpy as np

    dde.config.set_random_seed(0)
    geom = dde.geometry.GeometryXTime(dde.geometry.Rectangle([-BOX, -BOX], [BOX, BOX]),
                                      dde.geometry.TimeDomain(0.0, T_FINAL))

    def exact(z: np.ndarray) -> np.ndarray:  # DeepXDE's inputs are (x, y, t)
        var = 1.0 + 2.0 * KAPPA * z[:, 2:3]
        return np.exp(-(z[:, 0:1] ** 2 + z[:, 1:2] ** 2) / (2.0 * var)) / (2.0 * np.pi * var)

    def pde(z: Tensor, u: Tensor) -> Tensor:
        lap = dde.grad.hessian(u, z, i=0, j=0) + dde.grad.hessian(u, z, i=1, j=1)
        return dde.grad.jacobian(u, z, i=0, j=2) - KAPPA * lap

    data = dde.data.TimePDE(
        geom, pde, [dde.icbc.DirichletBC(geom, exact, lambda _, on_b: on_b),
                    dde.icbc.IC(geom, exact, lambda _, on_i: on_i)],
        num_domain=n_domain, num_boundary=n_boundary, num_initial=n_initial)
    model = dde.Model(data, dde.nn.FNN([3] + [width] * depth + [1], "tanh", "Glorot normal"))

    def predict(z: Tensor) -> Tensor:
        return torch.from_numpy(model.predict(z[:, [1, 2, 0]].numpy()).astype(np.float64))

    class Recorder(dde.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            device = "cuda" if torch.cuda.is_available() else "cpu"  # as DeepXDE chose
            self.clock, self.curve, self.last, self.capped = Clock(device), [], 0, False

        def on_train_begin(self) -> None:
            self.clock.resume()

        def on_epoch_end(self) -> None:
            step = int(self.model.train_state.step)
            if step - self.last < eval_every:
                return
            self.last = step
            elapsed = self.clock.pause()
            self.curve.append((elapsed, max(exact_errors(predict).values())))
            self.capped = elapsed > cap_s
            self.model.stop_training = self.capped
            self.clock.resume()

        def on_train_end(self) -> None:
            self.clock.pause()

    recorder = Recorder()
    model.compile("adam", lr=1e-3, verbose=0)
    model.train(iterations=adam_steps, display_every=eval_every, callbacks=[recorder], verbose=0)
    if lbfgs_steps > 0 and not recorder.capped:
        dde.optimizers.set_LBFGS_options(maxiter=lbfgs_steps)
        dde.optimizers.config.LBFGS_options.update(  # report every eval_every iterations
            iter_per_step=eval_every, fun_per_step=int(1.25 * eval_every))
        model.compile("L-BFGS", verbose=0)
        model.train(display_every=eval_every, callbacks=[recorder], verbose=0)
    errors = exact_errors(predict)
    return {"errors_by_t": errors, "grid": grid_errors(predict),
            "own_box": grid_errors(predict, half=BOX), "time_s": recorder.clock.elapsed,
            "curve": recorder.curve,
            "steps": int(model.train_state.step), "capped": recorder.capped,
            "version": dde.__version__}
