"""Case: the MLP density everywhere, not only where the exact solution puts its mass.

Each run is the real CLI in a fresh process; its figures come from its own ``summary.json``:

* ``rel_l2_error``: relative L2 error of p on 4096 points drawn from the exact solution (what
  the demo always reported; blind where p has no mass);
* ``grid_rel_l2_error`` and ``max_rel_peak_error``: relative L2 error, and the largest pointwise
  error as a fraction of the peak, on the regular grid of ``solution.npz`` (64² over the
  initial mean ± 4 of the widest standard deviation; d ≥ 3: the (x1, x2) slice through the
  initial mean), where a spurious bump cannot hide;
* ``grid_mass_error`` (d ≤ 2) |Σ(p̂ − p)|·h^d over that grid, else ``mass_error`` by importance
  sampling from the exact law.

Worst over the eval times in the table; per time in the JSON. The demo (``neuralpde solve
device=…``) runs three times; its whole command (as timed from outside) is split by the run's
own ``summary.json`` ``timings`` into start-up (process start to the run's start: interpreter,
imports, Hydra), training (the trainer's clock), evaluation (building, the final evaluation,
solution.npz), plotting, and exit (the rest); medians of the three. The other settings run
once: the heat MLP in d = 3 and d = 10 from a mean and a full covariance
(``experiment=heat3d``, ``heat10d``), the 2-D Ornstein–Uhlenbeck equation from a wide start
(``experiment=ou_mlp``), and the demo with the bare network (``ansatz.envelope=none``, the
ansatz before the envelope) to show what the grid figures catch.

    python -m benchmarks.run --cases mlp_density
"""

from __future__ import annotations

import statistics
from typing import Any

from benchmarks.common import (TRAINING, Column, Row, Spec, attempt, neuralpde_solve, row,
                               tier)

SETTINGS: dict[str, dict[str, Any]] = {
    "full": dict(repeats=3, timeout_s=900, training=[]),
    "quick": dict(repeats=1, timeout_s=300, training=TRAINING["quick"][1:]),
    "smoke": dict(repeats=1, timeout_s=120, training=TRAINING["smoke"][1:]),
}
#: (setting, method, overrides, repeats?) — the demo first: its timing is the headline
CASES = (
    ("d=2 heat, the demo", "neuralpde MLP (envelope)", [], True),
    ("d=2 heat, the demo", "neuralpde MLP, envelope=none (before)", ["ansatz.envelope=none"],
     False),
    ("d=3 heat, mean + full Σ₀", "neuralpde MLP (envelope)", ["experiment=heat3d"], False),
    ("d=10 heat, mean + full Σ₀", "neuralpde MLP (envelope)", ["experiment=heat10d"], False),
    ("d=2 OU, wide start (std 1)", "neuralpde MLP (envelope)", ["experiment=ou_mlp"], False),
)
SPEC = Spec(
    "mlp_density",
    "The MLP density everywhere: relative L2 error on exact-law points and on the regular grid "
    "of solution.npz, largest grid error / peak, mass error (worst over the eval times); "
    "wall time split (medians of 3 for the demo)",
    (Column("error", "L2 (exact-law pts)", "error"), Column("grid_error", "L2 (grid)", "error"),
     Column("max_rel_peak_error", "max err/peak (grid)", "error"),
     Column("mass_error", "mass error", "error"), Column("total_s", "whole command"),
     Column("startup_s", "start-up"), Column("time_s", "training"),
     Column("evaluation_s", "evaluation"), Column("plots_s", "plotting"),
     Column("exit_s", "exit")),
    ratio_key="total_s", plot="settings", plot_key="total_s",
)


def run(quick: bool, device: str) -> list[Row]:
    s = SETTINGS[tier(quick)]
    rows: list[Row] = []
    for setting, method, overrides, repeated in CASES:
        repeats = s["repeats"] if repeated else 1
        rows += attempt(method, setting, lambda: _row(
            method, setting, [*overrides, *s["training"]], device, s["timeout_s"], repeats))
    return rows


def _row(method: str, setting: str, overrides: list[str], device: str, timeout_s: float,
         repeats: int) -> Row:
    runs = [neuralpde_solve(overrides, device, timeout_s) for _ in range(repeats)]
    splits = [_split(r) for r in runs]
    median = {k: statistics.median(sp[k] for sp in splits) for k in splits[0]}
    metrics = runs[-1]["metrics"]
    by_t = {key: {k[len(key) + 2:]: v for k, v in metrics.items() if k.startswith(f"{key}_t")}
            for key in ("rel_l2_error", "grid_rel_l2_error", "max_rel_peak_error",
                        "grid_mass_error", "mass_error")}
    mass = metrics.get("grid_mass_error", metrics.get("mass_error"))
    totals = ", ".join(f"{sp['total_s']:.1f}" for sp in splits)
    note = (f"{runs[-1]['ansatz']}, {runs[-1]['optimizer']}, {runs[-1].get('steps', '?')} steps"
            + (f"; whole command {totals} s" if repeats > 1 else ""))
    return row(method, setting, error=metrics.get("rel_l2_error"),
               grid_error=metrics.get("grid_rel_l2_error"),
               max_rel_peak_error=metrics.get("max_rel_peak_error"), mass_error=mass,
               by_t=by_t, repeats=repeats, splits=splits, overrides=overrides, note=note,
               **median)


def _split(summary: dict[str, Any]) -> dict[str, float]:
    """The whole command's seconds and their shares from summary.json's ``timings``: start-up
    (process start to the run's start: interpreter, imports, Hydra), training, evaluation
    (building, the final evaluation, solution.npz), plotting, and exit (the rest: the last
    summary write, the interpreter's teardown)."""
    t, total = summary["timings"], summary["process_s"]
    out = {"total_s": total, "time_s": t["train_s"], "evaluation_s": t["evaluate_s"],
           "plots_s": t["plots_s"]}
    inside = out["time_s"] + out["evaluation_s"] + out["plots_s"]
    out["startup_s"] = t["startup_s"] if t.get("startup_s") is not None else total - inside
    out["exit_s"] = total - inside - out["startup_s"]
    return out
