"""Case 3: the 2-D Ornstein–Uhlenbeck Fokker–Planck equation (``equation=fokker_planck``).

neuralpde's default for it (the Gaussian mixture, time-marched), the same mixture trained in
space-time by L-BFGS (``experiment=ou_spacetime``) and its MLP (Adam + L-BFGS),
each the real CLI in a fresh process: the relative L2 error against the exact OU density at the
equation's evaluation times, and the time it took.
"""

from __future__ import annotations

from typing import Any

from benchmarks.common import TRAINING, Column, Row, Spec, attempt, neuralpde_row, tier

TARGET = 1e-2
SETTING = "2-D OU"
SETTINGS: dict[str, dict[str, Any]] = {
    "full": dict(budget_s=30.0, timeout_s=300),
    "quick": dict(budget_s=10.0, timeout_s=120),
    "smoke": dict(budget_s=1.0, timeout_s=120),
}
SPEC = Spec(
    "fokker_planck",
    "2-D Ornstein–Uhlenbeck Fokker–Planck: relative L2 error against the exact density (worst "
    "over the equation's eval times), and time",
    (Column("time_s", "time"), Column("time_to_target_s", f"time to {TARGET:g}"),
     Column("error", "final error", "error"), Column("errors_by_t", "final error by t", "by_t")),
    ratio_key="time_s", plot="curves", target=TARGET,
)


def run(quick: bool, device: str) -> list[Row]:
    s = SETTINGS[tier(quick)]
    methods = {
        "neuralpde default (GMM)": ["equation=fokker_planck"],
        "neuralpde space-time GMM": ["experiment=ou_spacetime"],
        "neuralpde MLP": ["equation=fokker_planck", "ansatz=mlp", "optimizer=adam_lbfgs",
                          *TRAINING[tier(quick)]],
    }
    rows: list[Row] = []
    for name, overrides in methods.items():
        rows += attempt(name, SETTING, lambda: neuralpde_row(
            name, SETTING, overrides, device, s["timeout_s"], TARGET, s["budget_s"]))
    return rows
