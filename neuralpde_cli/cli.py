"""The ``neuralpde`` console script: dispatch ``argv[1]`` to a Hydra task.

Hydra has no subcommands, so the dispatcher pops the subcommand and hands the rest of the
command line to that task's ``main`` (made by ``tasks.common.make_main``: the path checks,
resume, the run directory and the exit codes every subcommand shares).
"""

from __future__ import annotations

import sys

from neuralpde_cli import __version__
from neuralpde_cli.errors import UserError

SUBCOMMANDS = {
    "solve": ("neuralpde_cli.tasks.solve", "Solve a PDE with an ansatz; writes a run directory."),
    "calibrate": ("neuralpde_cli.tasks.calibrate",
                  "Fit an SDE's parameters to data through its Fokker–Planck transition density."),
    "simulate": ("neuralpde_cli.tasks.simulate", "Sample an SDE at observation times; writes a data set."),
    "tune": ("neuralpde_cli.tasks.tune", "Search solve's settings with Optuna; a run directory per trial."),
    "report": ("neuralpde_cli.tasks.report", "Tables and plots over run directories, sweeps and studies."),
    "fit": ("neuralpde_cli.tasks.fit", "Learn dynamics from data: neural SDE, jump diffusion, neural reaction–diffusion."),
}

USAGE = f"""neuralpde {__version__}: differentiable PDE solving from Hydra configs

Usage: neuralpde <subcommand> [overrides ...]

Subcommands:
{chr(10).join(f"  {name:<10} {text}" for name, (_, text) in SUBCOMMANDS.items())}

Try:
  neuralpde solve --help               config groups and their options
  neuralpde solve                      2-D heat with an MLP (about half a minute on a CPU)
  neuralpde solve equation=fokker_planck
  neuralpde solve --cfg job            print the composed config
  neuralpde solve -m optimizer.lr=1e-3,3e-3 ansatz.width=32,64
"""


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    if args[0] in ("-V", "--version"):
        print(f"neuralpde {__version__}")
        return 0
    name, rest = args[0], args[1:]
    if name not in SUBCOMMANDS:
        print(f"neuralpde: unknown subcommand {name!r}; choose one of {sorted(SUBCOMMANDS)} "
              "(neuralpde --help)", file=sys.stderr)
        return 2
    try:
        module = __import__(SUBCOMMANDS[name][0], fromlist=["main"])
        sys.argv = [f"neuralpde-{name}", *rest]
        module.main()
    except UserError as exc:
        print(f"neuralpde: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # outside a run (a run handles its own, see tasks/common.py)
        print("neuralpde: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
