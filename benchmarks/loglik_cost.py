"""Where one log-likelihood and its gradient spend their time (issue 26: "measure first").

For the transition density a calibrate fit evaluates in every BFGS iteration (steps frozen,
the density built by the task's own code from a data file, as ``neuralpde calibrate`` builds
it), one log L + ∇ is split into:

- the march forward (the mixture's moment ODEs, with the autograd graph recorded),
- the reads (each transition's log-density off the marched members: standardization, splines),
- the backward pass,

then the whole evaluation again with the march compiled (``fit.pde.compile``, which a fit turns
on by itself when two marches take 0.7 s or more): its median, and its first call (the compile);
and, from torch's profiler over one evaluation, the time inside torch's operators against the
wall time: the rest is Python and dispatch. Cases: 1-D CIR monthly (K = 3, 16 nodes), 1-D CIR
daily (the K the first march chooses), daily Heston with observed variance (2-D).
"""

from __future__ import annotations

import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import Column, Row, Spec, exact_cir_path, row, tier

SPEC = Spec(
    "loglik_cost",
    "One log L + ∇ of a calibrate fit, split: march forward, reads, backward; torch operators "
    "against Python and dispatch",
    (Column("steps", "steps", "int"), Column("members", "members", "int"),
     Column("time_s", "log L + ∇"), Column("march_s", "march fwd"), Column("reads_s", "reads"),
     Column("backward_s", "backward"), Column("ops_share", "in torch ops", "pct"),
     Column("compiled_s", "compiled"), Column("compile_s", "compiling"),
     Column("speedup", "×", "ratio"), Column("target", "target (issue 26)", "text")),
    ratio_key="time_s", plot="settings", plot_key="time_s",
)

SETTINGS = {"full": {"repeats": 5, "n": 1250}, "quick": {"repeats": 3, "n": 1250},
            "smoke": {"repeats": 1, "n": 200}}
#: issue 26's targets for one log L + ∇
TARGET_S = {"1-D": 0.030, "Heston": 0.100}


def _problem(data: Path, overrides: list[str]) -> Any:
    """The task's Problem and density at the start values, components chosen and steps frozen."""
    from hydra import compose, initialize_config_dir

    from neuralpde_cli.tasks import calibrate as task
    from neuralpde_cli.tasks.common import config_dir
    task.register()
    with initialize_config_dir(version_base="1.3", config_dir=config_dir(), job_name="bench"):
        cfg = compose(config_name="calibrate", overrides=[f"data.path={data}", *overrides])
    return task, task.Problem(cfg), cfg


def _split(problem: Any, density: Any, theta: np.ndarray, repeats: int) -> dict[str, float]:
    """Medians over ``repeats`` (after a warm-up): the march timed inside the same forward pass
    that reads the densities, so reads = forward − march."""
    inner = density._node_states
    spent: list[float] = []

    def timed(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        out = inner(*args, **kwargs)
        spent.append(time.perf_counter() - t0)
        return out

    density._node_states = timed
    march, forward, backward = [], [], []
    try:
        for _ in range(repeats + 1):  # the first is a warm-up
            values = problem.tensors(theta, True)
            t1 = time.perf_counter()
            total = density.log_density(values).sum()
            t2 = time.perf_counter()
            total.backward()
            t3 = time.perf_counter()
            march.append(spent[-1])
            forward.append(t2 - t1)
            backward.append(t3 - t2)
    finally:
        density._node_states = inner
    march, forward, backward = march[1:], forward[1:], backward[1:]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        values = problem.tensors(theta, True)
        t0 = time.perf_counter()
        density.log_density(values).sum().backward()
        wall = time.perf_counter() - t0
    ops = sum(e.self_cpu_time_total for e in prof.key_averages()) * 1e-6
    m, f, b = (statistics.median(v) for v in (march, forward, backward))
    return {"time_s": f + b, "march_s": m, "reads_s": max(f - m, 0.0), "backward_s": b,
            "ops_share": min(ops / wall, 1.0)}


def _compiled(problem: Any, density: Any, theta: np.ndarray, repeats: int) -> dict[str, float]:
    """The same evaluation with the march compiled (``fit.pde.compile``): the first call's
    time (the compile, on inductor's on-disk cache as found) and the median of the rest."""
    density.compiled = True
    times = []
    for _ in range(repeats + 1):
        values = problem.tensors(theta, True)
        t0 = time.perf_counter()
        density.log_density(values).sum().backward()
        times.append(time.perf_counter() - t0)
    return {"compiled_s": statistics.median(times[1:]), "compile_s": times[0]}


def _case(label: str, data: Path, overrides: list[str], theta_from: str, target: float,
          repeats: int) -> Row:
    task, problem, cfg = _problem(data, ["fit.pde.compile=false", *overrides])
    baselines = task._baselines(problem)
    theta, _, start, density = task._start(problem, baselines)  # components and steps, as a fit
    figures = _split(problem, density, theta, repeats)
    figures.update(_compiled(problem, density, theta, repeats))
    best = min(figures["time_s"], figures["compiled_s"])
    return row("neuralpde log L + ∇", label, steps=len(density.step_times),
               members=density.members, components=density.mixture.components, **figures,
               speedup=figures["time_s"] / figures["compiled_s"],
               target=f"≤ {target * 1e3:.0f} ms: {'met' if best <= target else 'not met'}",
               note=f"at the {start} start; K = {density.mixture.components}; median of {repeats}; "
                    "eager, then compiled (the first compiled call apart)")


def _write_cir(path: Path, n: int, dt: float) -> Path:
    x = exact_cir_path(n, dt, 3.0, 0.3, 0.2, seed=7)
    path.write_text("time,x\n" + "".join(f"{i * dt!r},{float(v)!r}\n" for i, v in enumerate(x)))
    return path


def _write_heston(work: Path, n: int) -> Path:
    """Daily Heston (μ 0.05, κ 3, θ 0.04, ξ 0.4, ρ −0.7) from `neuralpde simulate`."""
    run = work / "heston"
    subprocess.run([sys.executable, "-m", "neuralpde_cli.cli", "simulate", "equation.dim=2",
                    "equation.sde.kind=heston", "equation.sde.mu=0.05", "equation.sde.rate=3",
                    "equation.sde.level=0.04", "equation.sde.noise=0.4", "equation.sde.rho=-0.7",
                    "equation.initial_mean=[0.0,0.04]", f"simulate.observations={n}",
                    "simulate.dt=0.003968", f"hydra.run.dir={run}"], check=True,
                   capture_output=True, timeout=600)
    return run / "data.csv"


def run(quick: bool, device: str) -> list[Row]:
    s = SETTINGS[tier(quick)]
    torch.set_num_threads(1)  # what calibrate runs with (device.threads: 0 → 1 for calibrate)
    work = Path(tempfile.mkdtemp(prefix="neuralpde-bench-loglik-"))
    rows = [
        _case("CIR monthly (3, 0.3, 0.2), K = 3, 16 nodes", _write_cir(work / "m.csv", s["n"], 1 / 12),
              ["equation.sde.kind=cir", "fit.pde.gaussian_residual=0"], "kessler",
              TARGET_S["1-D"], s["repeats"]),
        _case("CIR daily (3, 0.3, 0.2), K as chosen", _write_cir(work / "d.csv", s["n"], 1 / 252),
              ["equation.sde.kind=cir"], "kessler", TARGET_S["1-D"], s["repeats"]),
        _case("Heston daily, variance observed", _write_heston(work, s["n"] // 2 if s["n"] < 1000
                                                               else 1000),
              ["equation.dim=2", "equation.sde.kind=heston"], "euler", TARGET_S["Heston"],
              s["repeats"]),
    ]
    if not math.isfinite(rows[0]["time_s"]):
        raise RuntimeError("no timing")
    return rows
