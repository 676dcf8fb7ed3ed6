"""Config group choice → code: the one table that says which file implements which option.

Every option of the ``equation``, ``ansatz`` and ``optimizer`` groups names a module, its
config dataclass (the structured-config schema that validates the YAML) and the class it
builds. Adding an option means one file, one YAML and one line here.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from neuralpde_cli.errors import UserError


@dataclass(frozen=True)
class Option:
    module: str
    config: str
    target: str

    def load(self, attr: str) -> Any:
        return getattr(importlib.import_module(self.module), attr)

    @property
    def config_class(self) -> type:
        return self.load(self.config)

    @property
    def target_class(self) -> type:
        return self.load(self.target)


GROUPS: dict[str, dict[str, Option]] = {
    "equation": {
        "heat": Option("neuralpde_cli.equations.heat", "HeatConfig", "HeatEquation"),
        "fokker_planck": Option("neuralpde_cli.equations.fokker_planck", "FokkerPlanckConfig",
                                "FokkerPlanck"),
        "diffusion": Option("neuralpde_cli.equations.diffusion", "DiffusionConfig",
                            "SteadyDiffusion"),
    },
    "ansatz": {
        "mlp": Option("neuralpde_cli.ansatz.mlp", "MLPConfig", "MLP"),
        "gmm": Option("neuralpde_cli.ansatz.gmm", "GMMConfig", "GaussianMixtureAnsatz"),
        "grid": Option("neuralpde_cli.ansatz.grid", "GridConfig", "GridAnsatz"),
    },
    "optimizer": {
        "adam": Option("neuralpde_cli.solvers.gradient", "GradientConfig", "GradientSolver"),
        "lbfgs": Option("neuralpde_cli.solvers.gradient", "GradientConfig", "GradientSolver"),
        "adam_lbfgs": Option("neuralpde_cli.solvers.gradient", "GradientConfig", "GradientSolver"),
        "levenberg_marquardt": Option("neuralpde_cli.solvers.gradient", "GradientConfig",
                                      "GradientSolver"),
        "time_march": Option("neuralpde_cli.solvers.time_march", "TimeMarchConfig", "TimeMarcher"),
        "multigrid": Option("neuralpde_cli.solvers.multigrid", "MultigridConfig",
                            "MultigridSolver"),
    },
    # `neuralpde fit`: the learned-dynamics models (the target builds data, objective, report)
    "model": {
        "neural_sde": Option("neuralpde_cli.models.neural_sde", "NeuralSDEConfig", "SDEExperiment"),
        "jump_diffusion": Option("neuralpde_cli.models.neural_sde", "JumpDiffusionConfig",
                                 "SDEExperiment"),
        "neural_rd": Option("neuralpde_cli.models.reaction_diffusion", "NeuralRDConfig",
                            "RDExperiment"),
    },
}


def option(group: str, name: str) -> Option:
    """The option ``name`` of ``group``, or a UserError listing the choices."""
    choices = GROUPS[group]
    if name not in choices:
        raise UserError(f"{group}.name={name!r} is not a known {group}; choose one of "
                        f"{sorted(choices)}")
    return choices[name]


GRADIENT = ["adam", "adam_lbfgs", "lbfgs"]

#: equation → ansatz → the optimizers that can solve that pair
VALID: dict[str, dict[str, list[str]]] = {
    "heat": {"mlp": GRADIENT, "gmm": GRADIENT + ["levenberg_marquardt", "time_march"]},
    "fokker_planck": {"mlp": GRADIENT, "gmm": GRADIENT + ["levenberg_marquardt", "time_march"]},
    "diffusion": {"grid": GRADIENT + ["multigrid"], "mlp": GRADIENT},
}


def validate_combination(equation: str, ansatz: str, optimizer: str) -> None:
    """Name an incompatible equation/ansatz/optimizer choice with what would work instead."""
    option("equation", equation), option("ansatz", ansatz), option("optimizer", optimizer)
    ansatzes = VALID[equation]
    if ansatz not in ansatzes:
        why = ("its solution is not a density" if ansatz == "gmm"
               else "it is a steady problem on a grid" if ansatz == "grid" else "")
        raise UserError(f"ansatz={ansatz} cannot solve equation={equation}"
                        f"{' (' + why + ')' if why else ''}; choose ansatz from {sorted(ansatzes)}")
    if optimizer not in ansatzes[ansatz]:
        raise UserError(f"optimizer={optimizer} cannot train ansatz={ansatz} on "
                        f"equation={equation}; choose optimizer from {ansatzes[ansatz]}")


#: a choice implies defaults for other groups the user did not name: the Fokker–Planck
#: equation is solved with the Gaussian mixture, the mixture by time-marching, the steady
#: problem on a grid by multigrid. Explicit choices always win.
IMPLIED: dict[str, dict[str, dict[str, str]]] = {
    "equation": {"fokker_planck": {"ansatz": "gmm"}, "diffusion": {"ansatz": "grid"}},
    "ansatz": {"gmm": {"optimizer": "time_march"}, "grid": {"optimizer": "multigrid"}},
}


def implied_choices(args: list[str]) -> list[str]:
    """Extra ``group=option`` overrides implied by the single choices in ``args``."""
    chosen = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in args
              if "=" in a and a.split("=", 1)[0] in GROUPS}
    extra: dict[str, str] = {}
    for group in ("equation", "ansatz"):  # in order: an implied ansatz implies its optimizer
        value = chosen.get(group, extra.get(group))
        for target, choice in IMPLIED[group].get(value or "", {}).items():
            if target not in chosen and target not in extra:
                extra[target] = choice
    return [f"{k}={v}" for k, v in extra.items()]
