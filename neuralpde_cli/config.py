"""Structured-config schemas: Hydra checks every YAML and override against these dataclasses.

Each option's YAML starts with ``defaults: [/schema_<group>_<name>@_here_]``, so a wrong type
or an unknown key fails at composition, before any work starts. The group options and their
classes are listed once, in :mod:`neuralpde_cli.registry`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from neuralpde_cli.registry import GROUPS
from neuralpde_cli.training.samplers import SamplerConfig
from neuralpde_cli.training.trainer import TrainerConfig

@dataclass
class DeviceConfig:
    #: auto: CUDA when available, else CPU
    name: str = "auto"
    #: CPU intra-op threads (torch.set_num_threads); 0: the subcommand's default, 1 for
    #: calibrate, simulate and fit (small tensors: a second thread buys nothing idle and costs
    #: many times over on a busy machine, README § Performance), torch's own for solve and tune
    threads: int = 0


@dataclass
class InitConfig:
    #: warm-start from an earlier run directory (its checkpoint or solution.npz)
    from_run: Optional[str] = None


@dataclass
class ChainConfig:
    #: > 1 runs a coarse-to-fine chain: resolution (n − 1)·2^k + 1 for k = 0 … levels − 1,
    #: each level warm-started from the previous one and written to level_<k>/
    levels: int = 1


@dataclass
class SolveConfig:
    equation: Any = MISSING
    ansatz: Any = MISSING
    optimizer: Any = MISSING
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)
    init: InitConfig = field(default_factory=InitConfig)
    multigrid: ChainConfig = field(default_factory=ChainConfig)
    seed: int = 0
    precision: str = "float64"
    #: continue an interrupted run: the path of its run directory
    resume: Optional[str] = None


@dataclass
class SimulateSettings:
    #: independent paths, all from the same start
    paths: int = 1
    #: observations per path after its start: each path has observations + 1 rows and as many
    #: transitions as observations
    observations: int = 1000
    #: time between observations (the mean when irregular)
    dt: float = 0.1
    #: none: every step is dt; exponential: steps ~ Exp(mean dt) (Poisson sampling times);
    #: uniform: steps ~ U[(1 − jitter)·dt, (1 + jitter)·dt]
    irregular: str = "none"
    jitter: float = 0.5
    #: kinds without an exact law: Euler–Maruyama with each step split into ⌈Δt/substep⌉
    #: equal sub-steps
    substep: float = 1e-3
    #: time of each path's first observation
    t0: float = 0.0
    #: time simulated before the first observation and discarded (0: start exactly at
    #: equation.initial_mean)
    burn_in: float = 0.0


@dataclass
class SimulateConfig:
    equation: Any = MISSING
    simulate: SimulateSettings = field(default_factory=SimulateSettings)
    device: DeviceConfig = field(default_factory=DeviceConfig)
    seed: int = 0
    precision: str = "float64"


def register_configs() -> None:
    """Store the root schema and one schema per group option (idempotent)."""
    cs = ConfigStore.instance()
    cs.store(name="solve_schema", node=SolveConfig)
    cs.store(name="simulate_schema", node=SimulateConfig)
    for group, options in GROUPS.items():
        for name, option in options.items():
            cs.store(name=f"schema_{group}_{name}", node=option.config_class)
    # schemas are stored outside any group, so `--help` lists only the groups users pick from
    cs.store(name="schema_sampler_sampler", node=SamplerConfig)
    cs.store(name="schema_trainer_trainer", node=TrainerConfig)
    cs.store(name="schema_device_device", node=DeviceConfig)
