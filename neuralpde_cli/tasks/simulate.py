"""``neuralpde simulate``: config → SDE → sampled paths → data set in a run directory.

The SDE comes from the same ``equation`` group as ``solve`` and ``calibrate``; each step
between observations is one :meth:`~neuralpde_cli.sdes.SDE.sample_transition` of every path at
once: exact where the law is known (OU, Brownian, CIR, GBM), Euler–Maruyama sub-steps of at
most ``simulate.substep`` otherwise. The run directory holds ``data.csv`` and ``data.npz`` (the
schema of :mod:`neuralpde_cli.data`), ``summary.json`` with the true parameter values, and
``plots/paths.png``.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from neuralpde_cli.config import SimulateConfig, register_configs
from neuralpde_cli.data import Observations, default_state_names, describe_steps, write_observations
from neuralpde_cli.device import resolve_device, resolve_precision
from neuralpde_cli.errors import UserError, check_choice
from neuralpde_cli.run.rundir import RunDir
from neuralpde_cli.sdes import SDE, SDEConfig, build_sde, parameter_values
from neuralpde_cli.tasks.common import make_main

log = logging.getLogger(__name__)

IRREGULAR = ("none", "exponential", "uniform")


def start_point(sde_cfg: SDEConfig, dim: int, initial_mean: list[float]) -> list[float]:
    """equation.initial_mean, or the kind's long-run level when it is empty."""
    if initial_mean:
        if len(initial_mean) != dim:
            raise UserError(f"equation.initial_mean has {len(initial_mean)} entries; "
                            f"equation.dim={dim} needs {dim} (or [] for the kind's level)")
        return [float(v) for v in initial_mean]
    if sde_cfg.kind == "ou":
        return [float(v) for v in (sde_cfg.mean if len(sde_cfg.mean) == dim else [0.0] * dim)]
    if sde_cfg.kind in ("cir", "cev"):
        return [float(sde_cfg.level)] * dim
    return [1.0 if sde_cfg.kind == "gbm" else 0.0] * dim


def only_sde_equations(args: list[str]) -> list[str]:
    """Before composing: simulate.yaml sets equation.sde, which other equations lack, so
    ``equation=heat`` would fail as a config key error instead of saying what is wrong."""
    for arg in args:
        key, _, value = arg.lstrip("+").partition("=")
        if key == "equation" and value.strip("'\"") != "fokker_planck":
            raise UserError(f"simulate samples an SDE: it needs equation=fokker_planck (its "
                            f"equation.sde), not equation={value}")
    return []


def check(cfg: DictConfig) -> None:
    """Every input check, before the run directory exists."""
    if cfg.equation.get("name") != "fokker_planck":
        raise UserError(f"simulate samples an SDE: it needs equation=fokker_planck (its "
                        f"equation.sde), not equation={cfg.equation.get('name')}")
    s = cfg.simulate
    for key in ("paths", "observations"):
        if int(s[key]) < 1:
            raise UserError(f"simulate.{key}={s[key]} must be an integer ≥ 1")
    for key in ("dt", "substep"):
        if not float(s[key]) > 0:
            raise UserError(f"simulate.{key}={s[key]} must be > 0")
    if float(s.burn_in) < 0:
        raise UserError(f"simulate.burn_in={s.burn_in} must be ≥ 0")
    check_choice("simulate.irregular", s.irregular, IRREGULAR)
    if s.irregular == "uniform" and not 0 <= float(s.jitter) < 1:
        raise UserError(f"simulate.jitter={s.jitter} must lie in [0, 1) (steps in "
                        "[(1 − jitter)·dt, (1 + jitter)·dt] stay positive)")
    _build(cfg)


def _build(cfg: DictConfig) -> tuple[SDE, torch.Tensor, torch.device]:
    """The SDE, the start point (d,) and the device, all checked."""
    dim = int(cfg.equation.dim)
    if dim < 1:
        raise UserError(f"equation.dim={dim} must be an integer ≥ 1")
    device = resolve_device(cfg.device.name)
    dtype = resolve_precision(cfg.precision)
    sde_cfg: SDEConfig = OmegaConf.to_object(cfg.equation.sde)
    sde = build_sde(sde_cfg, dim, dtype, device)
    start = start_point(sde_cfg, dim, list(cfg.equation.initial_mean))
    if sde.lower_bound is not None and min(start) <= sde.lower_bound:
        raise UserError(f"equation.initial_mean={start} must lie above {sde.lower_bound:g} for "
                        f"equation.sde.kind={sde_cfg.kind}")
    return sde, torch.tensor(start, dtype=dtype, device=device), device


def _steps(cfg: DictConfig, generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """The time steps (paths, observations): regular, exponential or uniformly jittered."""
    s = cfg.simulate
    shape = (int(s.paths), int(s.observations))
    u = torch.rand(*shape, generator=generator, dtype=dtype, device=generator.device)
    if s.irregular == "exponential":  # Δt = −dt·log(1 − U), never 0
        return -float(s.dt) * torch.log1p(-u)
    if s.irregular == "uniform":
        return float(s.dt) * (1.0 + float(s.jitter) * (2.0 * u - 1.0))
    return torch.full(shape, float(s.dt), dtype=dtype, device=generator.device)


def sample_paths(sde: SDE, start: torch.Tensor, cfg: DictConfig,
                 generator: torch.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Observation times (paths, n + 1) and states (paths, n + 1, d) of every path."""
    s = cfg.simulate
    paths, substep = int(s.paths), float(s.substep)
    steps = _steps(cfg, generator, start.dtype).to(start.device)
    t0 = torch.full((paths,), float(s.t0), dtype=start.dtype, device=start.device)
    if s.irregular == "none":  # multiples of dt, not a running sum that drifts in the last digit
        k = torch.arange(steps.shape[1] + 1, dtype=start.dtype, device=start.device)
        times = t0[:, None] + float(s.dt) * k
    else:
        times = torch.cat([t0[:, None], t0[:, None] + torch.cumsum(steps, dim=1)], dim=1)
    steps = times[:, 1:] - times[:, :-1]
    x = start.expand(paths, -1).clone()
    if float(s.burn_in) > 0:
        x = sde.sample_transition(x, t0 - float(s.burn_in), torch.full_like(t0, float(s.burn_in)),
                                  generator, substep)
    states = [x]
    report = max(1, steps.shape[1] // 10)
    with torch.no_grad():
        for k in range(steps.shape[1]):
            x = sde.sample_transition(x, times[:, k], steps[:, k], generator, substep)
            states.append(x)
            if (k + 1) % report == 0 and steps.shape[1] >= 1000:
                log.info("simulated %d of %d steps", k + 1, steps.shape[1])
    return times.cpu().numpy(), torch.stack(states, dim=1).cpu().numpy()


def simulate(cfg: DictConfig, run: RunDir) -> dict[str, Any]:
    """Sample, write the data set, plot; returns summary.json's content."""
    from neuralpde_cli.run.plots_simulate import plot_paths

    begin = time.perf_counter()
    sde, start, device = _build(cfg)
    sde_cfg: SDEConfig = OmegaConf.to_object(cfg.equation.sde)
    dim = int(cfg.equation.dim)
    s = cfg.simulate
    method = sde.transition_scheme
    summary: dict[str, Any] = {
        "status": "running", "command": "simulate", "sde": sde_cfg.kind, "dim": dim,
        "true_values": parameter_values(sde_cfg, dim),
        "method": method, "substep": None if method == "exact" else float(s.substep),
        "start": start.tolist(), "device": str(device),
        "config": OmegaConf.to_container(cfg, resolve=True)}
    run.write_summary(summary)
    log.info("simulating %d path(s) × %d steps of %s (%s%s)", int(s.paths), int(s.observations),
             sde_cfg.kind, method, "" if method == "exact" else f", sub-steps ≤ {float(s.substep):g}")
    generator = torch.Generator(device=device).manual_seed(int(cfg.seed))
    times, states = sample_paths(sde, start, cfg, generator)
    paths, rows = times.shape
    obs = Observations(time=times.reshape(-1), state=states.reshape(paths * rows, dim),
                       path=np.repeat(np.arange(paths), rows), state_names=default_state_names(dim))
    files = write_observations(obs, run.path / "data")
    steps = np.diff(times, axis=1).reshape(-1)
    summary.update({
        "status": "completed", "files": [f.name for f in files], "paths": paths,
        "rows": int(paths * rows), "n_transitions": int(steps.size),
        "dt": describe_steps(steps), "irregular": str(s.irregular),
        "metrics": {"n_transitions": float(steps.size),
                    "state_mean": float(states.mean()), "state_std": float(states.std())},
        "wall_time_s": time.perf_counter() - begin})
    run.write_summary(summary)
    summary["plots"] = [str(p.relative_to(run.path)) for p in plot_paths(run.path)]
    run.write_summary(summary)
    return summary


main = make_main("simulate", simulate, check, headline=("n_transitions", "state_mean", "state_std"),
                 schema=SimulateConfig, pre_compose=only_sde_equations, register=register_configs,
                 threads=1)
