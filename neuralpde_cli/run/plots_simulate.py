"""The picture of a simulated data set, drawn only from the run directory (data.npz, summary.json)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

#: paths drawn (the histogram uses every observation)
MAX_PATHS = 3
#: state coordinates drawn, one row each
MAX_COORDS = 4


def plot_paths(run_path: Path) -> list[Path]:
    """plots/paths.png: a few paths against time per coordinate, beside the histogram of all
    observations of that coordinate (irregular sampling shows as the dots on the paths)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_path = Path(run_path)
    npz = run_path / "data.npz"
    if not npz.exists():
        return []
    with np.load(npz) as data:
        time, state, path = data["time"], data["state"], data["path"]
        names = [str(s) for s in data["state_names"]] if "state_names" in data else \
            [f"x{i + 1}" for i in range(state.shape[1])]
    try:
        summary = json.loads((run_path / "summary.json").read_text())
    except (OSError, ValueError):
        summary = {}
    ids = np.unique(path)
    shown = ids[:MAX_PATHS]
    dims = min(state.shape[1], MAX_COORDS)
    fig, axes = plt.subplots(dims, 2, figsize=(11, 2.8 * dims + 0.6), squeeze=False,
                             gridspec_kw={"width_ratios": [4, 1]}, sharey="row")
    for j in range(dims):
        ax, hist = axes[j]
        for k in shown:
            rows = path == k
            few = rows.sum() <= 300
            ax.plot(time[rows], state[rows, j], lw=0.8, marker="." if few else None, ms=3,
                    label=f"path {k}")
        ax.set_ylabel(names[j])
        hist.hist(state[:, j], bins=int(np.clip(np.sqrt(len(time)), 10, 60)), orientation="horizontal", color="0.45", density=True)
        hist.set_xlabel("density")
        hist.set_title(f"all {len(ids)} path(s)" if j == 0 else "", fontsize=9)
        if j == dims - 1:
            ax.set_xlabel("time")
    if 1 < len(shown):  # above the axes, off the paths
        axes[0][0].legend(loc="lower left", bbox_to_anchor=(0.0, 1.0), fontsize=8,
                          ncol=len(shown), frameon=False)
    fig.suptitle(_title(summary, len(ids), len(shown)), fontsize=10)
    fig.tight_layout()
    out = run_path / "plots" / "paths.png"
    out.parent.mkdir(exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return [out]


def _title(summary: dict, n_paths: int, n_shown: int) -> str:
    values = summary.get("true_values") or {}
    params = ", ".join(f"{k}={v:.3g}" for k, v in list(values.items())[:8])
    params += ", …" if len(values) > 8 else ""
    method = summary.get("method")
    how = "exact transitions" if method == "exact" else \
        f"Euler–Maruyama, sub-steps ≤ {summary.get('substep'):g}" if method == "euler" else \
        f"{method}, sub-steps ≤ {summary.get('substep'):g}" if method else ""
    dt = summary.get("dt") or {}
    step = f"Δt = {dt['median']:.3g}" if dt and np.isclose(dt["min"], dt["max"], rtol=1e-9) else \
        f"Δt ∈ [{dt['min']:.3g}, {dt['max']:.3g}]" if dt else ""
    shown = f"{n_shown} of {n_paths} paths" if n_shown < n_paths else f"{n_paths} path(s)"
    head = f"{summary.get('sde', 'SDE')} ({params})" if params else str(summary.get("sde", "SDE"))
    return f"{head}\n{shown}, {step}, {how}".strip(", ")
