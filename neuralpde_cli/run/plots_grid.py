"""Plots of a steady grid solution, drawn only from what the run wrote (solution.npz, metrics.csv)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from neuralpde_cli.run.plots import scaled


def _heat_map(fig, ax, values: np.ndarray, x: np.ndarray, y: np.ndarray, title: str,
              cmap: str = "viridis", log: bool = False, diverging: bool = False) -> None:
    """values[i, j] at (x[i], y[j]) drawn with x to the right and y up; ``diverging`` centres
    the colour map on 0. A power-of-ten factor goes into the title (a colour bar's own offset
    text would overlap it); a constant field is named as one."""
    from matplotlib.colors import LogNorm
    finite = values[np.isfinite(values)]
    if finite.size and finite.min() == finite.max():
        title = f"{title} = {finite.min():.4g} (constant)"
    norm, factor = None, ""
    if log and np.all(values > 0) and values.max() > 10 * values.min():
        norm = LogNorm(vmin=values.min(), vmax=values.max())
    else:
        values, factor = scaled(values)
    limits = {}
    if diverging and norm is None:
        top = float(np.nanmax(np.abs(values))) or 1.0
        limits = {"vmin": -top, "vmax": top}
    hx, hy = (x[-1] - x[0]) / max(len(x) - 1, 1), (y[-1] - y[0]) / max(len(y) - 1, 1)
    im = ax.imshow(values.T, origin="lower", cmap=cmap, norm=norm, aspect="equal",
                   interpolation="nearest", **limits,
                   extent=(x[0] - hx / 2, x[-1] + hx / 2, y[0] - hy / 2, y[-1] + hy / 2))
    fig.colorbar(im, ax=ax, shrink=0.85)
    ax.set_title(title + factor, fontsize=10)
    ax.set_xlabel("x")
    ax.set_ylabel("y")


def plot_grid_run(npz_path: Path, plots_dir: Path) -> list[Path]:
    """solution.png (T, residual, κ, s); error.png when T_reference is stored. (The residual
    per cycle or step is on losses.png, drawn from metrics.csv like every run's.)"""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots_dir = Path(plots_dir)
    plots_dir.mkdir(parents=True, exist_ok=True)
    with np.load(npz_path) as data:
        arrays = dict(data)
    x, y = arrays["x"], arrays["y"]
    out: list[Path] = []

    fig, axes = plt.subplots(2, 2, figsize=(11, 9))
    _heat_map(fig, axes[0, 0], arrays["T"], x, y, "T")
    res = np.abs(arrays["residual"])
    _heat_map(fig, axes[0, 1], res, x, y, f"|∇·(κ∇T) + s|  (max {res.max():.2e})", cmap="magma")
    _heat_map(fig, axes[1, 0], arrays["kappa"], x, y, "κ", cmap="cividis", log=True)
    _heat_map(fig, axes[1, 1], arrays["source"], x, y, "s", cmap="coolwarm", diverging=True)
    n = arrays["T"].shape[0]
    fig.suptitle(f"steady diffusion on a {n}×{arrays['T'].shape[1]} grid")
    fig.tight_layout()
    path = plots_dir / "solution.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    out.append(path)

    if "T_reference" in arrays:
        err = arrays["T"] - arrays["T_reference"]
        rel = np.linalg.norm(err) / max(np.linalg.norm(arrays["T_reference"]), 1e-300)
        fig, ax = plt.subplots(figsize=(6.5, 5.5))
        _heat_map(fig, ax, err, x, y, f"T − T_direct  (relative L2 {rel:.2e})", cmap="RdBu_r",
                  diverging=True)
        fig.tight_layout()
        path = plots_dir / "error.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        out.append(path)

    return out


def plot_level_convergence(level_histories: dict[str, list[dict]], out: Path) -> list[Path]:
    """Relative residual against cycle, one line per level of a coarse-to-fine chain (log y)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    drawn = False
    for label, history in level_histories.items():
        cycles = np.array([h["cycle"] for h in history], dtype=float)
        rel = np.array([h["rel_residual"] for h in history], dtype=float)
        ok = np.isfinite(rel) & (rel > 0)
        if ok.any():
            ax.plot(cycles[ok], rel[ok], "o-", ms=3, lw=1.2, label=label)
            drawn = True
    if not drawn:
        plt.close(fig)
        return []
    ax.set_yscale("log")
    ax.set_xlabel("cycle")
    ax.set_ylabel("‖b − AT‖ / ‖b‖")
    ax.set_title("multigrid convergence per level")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return [out]
