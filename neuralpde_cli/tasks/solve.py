"""``neuralpde solve``: config → equation + ansatz → solver → run directory.

The task function stays thin: it builds the pieces named by the config, hands them to the
solver the ``optimizer`` group chose, and writes what the run produced. Bad input of any kind
ends as one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import json
import logging
import platform
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

import neuralpde_cli
from neuralpde_cli.config import register_configs
from neuralpde_cli.device import resolve_device, resolve_precision
from neuralpde_cli.errors import UserError
from neuralpde_cli.registry import option, validate_combination
from neuralpde_cli.run import plots
from neuralpde_cli.run.rundir import RunDir
from neuralpde_cli.training.checkpoint import load_checkpoint
from neuralpde_cli.training.trainer import Diverged, Interrupted

log = logging.getLogger(__name__)


def _config_dir() -> str:
    """Configs ship inside the package (``neuralpde_cli/configs``); a checkout keeps them at the
    top level beside the package."""
    here = Path(__file__).resolve().parent.parent
    installed = here / "configs"
    return str(installed if (installed / "solve.yaml").exists() else here.parent / "configs")


def build(cfg: DictConfig, device: torch.device, dtype: torch.dtype) -> tuple[Any, Any, Any]:
    """The equation, ansatz and solver objects the config names (validated as a combination)."""
    names = (cfg.equation.name, cfg.ansatz.name, cfg.optimizer.name)
    validate_combination(*names)
    eq_opt, an_opt, opt_opt = (option(g, n) for g, n in zip(("equation", "ansatz", "optimizer"), names))
    equation = eq_opt.target_class(OmegaConf.to_object(cfg.equation), dtype, device)
    ansatz = an_opt.target_class.for_equation(OmegaConf.to_object(cfg.ansatz), equation)
    solver = opt_opt.target_class(OmegaConf.to_object(cfg.optimizer))
    return equation, ansatz, solver


def solve(cfg: DictConfig, run: RunDir) -> dict[str, Any]:
    """Run the job the config describes into ``run``; returns the summary written."""
    from neuralpde_cli.solvers.dispatch import run_solver  # heavy imports only when solving

    device = resolve_device(cfg.device.name)
    dtype = resolve_precision(cfg.precision)
    torch.manual_seed(cfg.seed)
    start = time.perf_counter()
    resume_state = None
    if cfg.get("resume"):
        resume_state = load_checkpoint(run.checkpoints / "last.pt", map_location=device)
    equation, ansatz, solver = build(cfg, device, dtype)
    summary = _summary_header(cfg, device, "running")
    run.write_summary(summary)
    result = run_solver(cfg, equation, ansatz, solver, run, resume_state)
    summary.update(result)
    summary["status"] = "completed"
    summary["wall_time_s"] = time.perf_counter() - start + float(result.get("resumed_elapsed_s", 0))
    run.write_summary(summary)
    summary["plots"] = [str(p.relative_to(run.path)) for p in plots.make_plots(run.path)]
    run.write_summary(summary)
    return summary


def _summary_header(cfg: DictConfig, device: torch.device, status: str) -> dict[str, Any]:
    return {
        "status": status,
        "equation": cfg.equation.name, "ansatz": cfg.ansatz.name, "optimizer": cfg.optimizer.name,
        "device": str(device), "precision": cfg.precision, "seed": cfg.seed,
        "versions": {"neuralpde": neuralpde_cli.__version__, "torch": torch.__version__,
                     "python": platform.python_version()},
        "config": OmegaConf.to_container(cfg, resolve=True),
    }


def _resumed_config(cfg: DictConfig) -> DictConfig:
    """The config of the run being resumed, read from its own ``.hydra/config.yaml``."""
    run_dir = Path(cfg.resume)
    saved = run_dir / ".hydra" / "config.yaml"
    if not saved.is_file():
        raise UserError(f"resume={cfg.resume}: {saved} not found; resume takes a run directory "
                        "written by neuralpde solve (outputs/DATE/TIME)")
    old = OmegaConf.merge(OmegaConf.structured(_schema()), OmegaConf.load(saved))
    old.resume = str(run_dir)
    return old


def _schema() -> Any:
    from neuralpde_cli.config import SolveConfig
    return SolveConfig


def task(cfg: DictConfig) -> float | None:
    """The Hydra task: returns the final error (for sweepers) and maps failures to exit codes."""
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    out = Path(hc.runtime.output_dir)
    run: RunDir | None = None
    try:
        if cfg.get("resume"):
            if multirun:
                raise UserError("resume= continues one run; it cannot be combined with -m")
            cfg = _resumed_config(cfg)
            out = Path(cfg.resume)
        run = RunDir(out)
        summary = solve(cfg, run)
        error = summary.get("metrics", {}).get("rel_l2_error")
        print(f"done: {out}  " + "  ".join(f"{k}={v:.3e}" for k, v in summary.get("metrics", {}).items()
                                             if k in _HEADLINE and isinstance(v, float)))
        return error
    except Interrupted as exc:
        _mark(run, "interrupted", str(exc))
        print(f"neuralpde: {exc}; checkpoint written. Resume with: neuralpde solve resume={out}",
              file=sys.stderr)
        sys.exit(128 + exc.signum)
    except (UserError, Diverged) as exc:
        status = "diverged" if isinstance(exc, Diverged) else "failed"
        _mark(run, status, str(exc))
        print(f"neuralpde: error: {exc}", file=sys.stderr)
        if multirun:
            _record_failure(out, status, str(exc))
            return None
        sys.exit(3 if isinstance(exc, Diverged) else 2)


_HEADLINE = ("rel_l2_error", "rel_l2_log_error", "cov_rel_error", "l1_error", "rel_residual")


def _mark(run: RunDir | None, status: str, message: str) -> None:
    """Record a run's end in its summary without touching anything else it wrote."""
    if run is None:
        return
    summary = run.read_summary()
    summary.update({"status": status, "error": message})
    run.write_summary(summary)


def _record_failure(out: Path, status: str, message: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "summary.json"
    if not path.exists():
        path.write_text(json.dumps({"status": status, "error": message}))


def main() -> None:
    register_configs()
    hydra.main(version_base="1.3", config_path=_config_dir(), config_name="solve")(task)()
