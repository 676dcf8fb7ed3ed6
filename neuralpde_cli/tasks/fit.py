"""``neuralpde fit model=neural_sde|jump_diffusion|neural_rd``: learn dynamics from data.

config → the model's experiment (truth, network, objective; every input checked before any
folder exists) → data (``data=PATH`` in the observation schema, or generated from the true
system into the run directory as data.csv + data.npz) → the project's Trainer (Adam, NaN
rollback, checkpoints, resume, metrics.csv) → solution.npz, summary.json, plots/.

An experiment (``registry.GROUPS["model"]``) offers: ``model`` (the trainable module),
``objective``, ``error_key``, ``phases()`` (the Trainer's plan), ``dim``,
``check_data(obs)``, ``generate()``, ``data_scheme()``, ``setup(obs)``, ``evaluate()``,
``results() → (metrics, arrays)`` and ``describe()``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING, DictConfig, OmegaConf

from neuralpde_cli.config import DeviceConfig
from neuralpde_cli.data import DataConfig, Observations, read_observations, write_observations
from neuralpde_cli.device import resolve_device, resolve_precision
from neuralpde_cli.errors import UserError
from neuralpde_cli.registry import option
from neuralpde_cli.run.rundir import RunDir, jsonable
from neuralpde_cli.tasks.common import make_main
from neuralpde_cli.training.checkpoint import load_checkpoint
from neuralpde_cli.training.trainer import Trainer, TrainerConfig

log = logging.getLogger(__name__)

#: headline metrics the final line prints, whichever the model reports
HEADLINE = ("mean_loss", "floor_mean_loss", "nll", "drift_error", "diffusion_error",
            "jump_map_error", "reaction_error", "data_rel_error")


@dataclass
class FitConfig:
    model: Any = MISSING
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)
    #: observations in the data schema (README § Data sets) and how to read them; data.path
    #: null: generated from the true system into the run directory (data.csv, data.npz)
    data: DataConfig = field(default_factory=DataConfig)
    seed: int = 0
    precision: str = "float64"
    #: continue an interrupted run: the path of its run directory
    resume: Optional[str] = None


def register() -> None:
    from hydra.core.config_store import ConfigStore

    from neuralpde_cli.config import register_configs
    register_configs()
    ConfigStore.instance().store(name="fit_schema", node=FitConfig)


def build(cfg: DictConfig) -> Any:
    """The model's experiment, its config checked (a stage count over the cap included)."""
    name = cfg.model.get("name")
    opt = option("model", str(name))
    model_cfg = OmegaConf.to_object(cfg.model)
    return opt.target_class(model_cfg, resolve_precision(cfg.precision),
                            resolve_device(cfg.device.name), int(cfg.seed))


def data_source(cfg: DictConfig, run_dir: Path | None = None) -> Path | None:
    """The data file a run reads: ``data=PATH``, or on resume the one it generated."""
    if cfg.data.get("path"):
        return Path(str(cfg.data.path)).expanduser()
    if run_dir is not None and (run_dir / "data.npz").is_file():
        return run_dir / "data.npz"
    return None


def check(cfg: DictConfig) -> None:
    """Every input check, before the run directory exists: the model's keys, the integrator's
    stage cap, and a data file's shape against the model."""
    OmegaConf.to_object(cfg.trainer).validate()
    experiment = build(cfg)
    source = data_source(cfg, Path(cfg.resume) if cfg.get("resume") else None)
    if source is not None:
        experiment.check_data(read_observations(source, options=OmegaConf.to_object(cfg.data)))


def fit(cfg: DictConfig, run: RunDir) -> dict[str, Any]:
    """Data, training, results, plots; returns summary.json's content."""
    from neuralpde_cli.run.plots_fit import plot_fit

    begin = time.perf_counter()
    resuming = bool(cfg.get("resume"))
    experiment = build(cfg)
    summary: dict[str, Any] = run.read_summary() if resuming and run.summary_json.is_file() else {}
    summary.update({"status": "running", "command": "fit", "model": str(cfg.model.name),
                    "device": str(resolve_device(cfg.device.name)), **experiment.describe(),
                    "config": OmegaConf.to_container(cfg, resolve=True)})
    run.write_summary(jsonable(summary))
    source = data_source(cfg, run.path if resuming else None)
    if source is None:
        log.info("generating the data from the true system (%s)", experiment.data_scheme())
        obs = experiment.generate()
        write_observations(obs, run.path / "data")
        obs = read_observations(run.path / "data.npz")
        summary.update({"data": "data.csv", "data_scheme": experiment.data_scheme()})
    else:
        obs = read_observations(source, options=OmegaConf.to_object(cfg.data))
        experiment.check_data(obs)
        summary.setdefault("data", str(source))
    experiment.setup(obs)
    phases = experiment.phases()
    trainer_cfg: TrainerConfig = OmegaConf.to_object(cfg.trainer)
    trainer = Trainer(trainer_cfg, phases, experiment.model, experiment.objective, run,
                      experiment.evaluate, experiment.error_key)
    if resuming and (run.checkpoints / "last.pt").is_file():
        trainer.load_state(load_checkpoint(run.checkpoints / "last.pt"))
        log.info("resumed at step %d of %d", trainer.step, trainer.total_steps)
    trainer.fit(resume_step=trainer.step if resuming else None)
    train_time = trainer.elapsed
    metrics, arrays = experiment.results()
    run.write_solution(arrays)
    summary.update({"status": "completed", "steps": trainer.step,
                    "stop_reason": trainer.stop_reason, "train_time_s": train_time,
                    "final_loss": trainer.last_terms.get("loss"),
                    "metrics": {k: float(v) for k, v in metrics.items()},
                    "wall_time_s": time.perf_counter() - begin})
    run.write_summary(jsonable(summary))
    summary["plots"] = [str(p.relative_to(run.path)) for p in plot_fit(run.path)]
    run.write_summary(jsonable(summary))
    return summary


main = make_main("fit", fit, check, headline=HEADLINE, schema=FitConfig, register=register,
                 threads=1)
