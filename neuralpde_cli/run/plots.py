"""Plots drawn only from what a run directory holds (metrics.csv, solution.npz)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from neuralpde_cli.run.rundir import read_metrics


def make_plots(run_path: Path) -> list[Path]:
    """Every plot that fits what the run wrote; returns their paths."""
    import matplotlib
    matplotlib.use("Agg")
    run_path = Path(run_path)
    plots_dir = run_path / "plots"
    plots_dir.mkdir(exist_ok=True)
    out: list[Path] = []
    metrics_path = run_path / "metrics.csv"
    if metrics_path.exists():
        out += plot_losses(read_metrics(metrics_path), plots_dir / "losses.png")
    npz_path = run_path / "solution.npz"
    if npz_path.exists():
        with np.load(npz_path) as data:
            arrays = dict(data)
        if "T" in arrays:
            from neuralpde_cli.run.plots_grid import plot_grid_run
            out += plot_grid_run(npz_path, metrics_path if metrics_path.exists() else None, plots_dir)
        elif "u" in arrays:
            out += plot_density(arrays, plots_dir / "solution.png")
            out += plot_moments(arrays, plots_dir / "moments.png")
    return out


def make_chain_plots(chain_path: Path) -> list[Path]:
    """Per-level convergence of a coarse-to-fine chain, from each level's metrics.csv."""
    import matplotlib
    matplotlib.use("Agg")
    from neuralpde_cli.run.plots_grid import plot_level_convergence
    histories = {}
    for level in sorted(Path(chain_path).glob("level_*"), key=lambda p: int(p.name.split("_")[1])):
        if (level / "metrics.csv").exists():
            m = read_metrics(level / "metrics.csv")
            key = "rel_residual" if "rel_residual" in m else "loss"
            histories[level.name] = [{"cycle": int(s), "rel_residual": float(v)}
                                     for s, v in zip(m["step"], m[key])]
    if not histories:
        return []
    out = Path(chain_path) / "plots" / "levels.png"
    out.parent.mkdir(exist_ok=True)
    plot_level_convergence(histories, out)
    return [out]


#: columns of metrics.csv drawn on the loss plot besides loss* and *error
_CURVES = ("rel_residual", "dt", "lstsq_residual")


def plot_losses(metrics: dict[str, np.ndarray], path: Path) -> list[Path]:
    """Each loss term and error over steps (a time march: step size and residual over t)."""
    import matplotlib.pyplot as plt
    if not metrics or "step" not in metrics:
        return []
    marched = "t" in metrics and "dt" in metrics
    x_key = "t" if marched else "step"
    fig, ax = plt.subplots(figsize=(7, 4.5))
    step = metrics[x_key]
    drawn = 0
    for key, values in metrics.items():
        if key.startswith("loss") or key.endswith("error") or key in _CURVES:
            ok = np.isfinite(values) & (values > 0)
            if ok.any():
                style = "o-" if key.endswith("error") else "-"
                ax.plot(step[ok], values[ok], style, ms=3, lw=1.2, label=key)
                drawn += 1
    if "phase" in metrics and not marched:
        phases = metrics["phase"]
        for i in np.flatnonzero(phases[1:] != phases[:-1]) + 1:
            ax.axvline(step[i], color="0.7", lw=0.8, ls="--")
    ax.set_yscale("log")
    ax.set_xlabel(x_key)
    ax.set_title("time march: step size and least-squares residual" if marched
                 else "loss terms and error")
    if drawn:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def plot_density(arrays: dict[str, np.ndarray], path: Path) -> list[Path]:
    """The density at each eval time beside the reference and the pointwise error."""
    import matplotlib.pyplot as plt
    t, x, u = arrays["t"], arrays["x"], arrays["u"]
    ref = arrays.get("u_exact")
    n_t = len(t)
    if x.shape[1] == 1:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for i in range(n_t):
            line, = axes[0].plot(x[:, 0], u[i], lw=1.5, label=f"t={t[i]:g}")
            if ref is not None:
                axes[0].plot(x[:, 0], ref[i], "--", color=line.get_color(), lw=1)
                axes[1].semilogy(x[:, 0], np.abs(u[i] - ref[i]) + 1e-300, color=line.get_color())
        axes[0].set_title("density (solid) and reference (dashed)")
        axes[1].set_title("|error|")
        axes[0].legend(fontsize=8)
    else:
        n_side = int(round(np.sqrt(x.shape[0])))
        rows = 3 if ref is not None else 1
        fig, axes = plt.subplots(rows, n_t, figsize=(2.6 * n_t, 2.5 * rows), squeeze=False)
        extent = (x[:, 0].min(), x[:, 0].max(), x[:, 1].min(), x[:, 1].max())
        for i in range(n_t):
            panels = [("prediction", u[i])]
            if ref is not None:
                panels += [("exact", ref[i]), ("error", u[i] - ref[i])]
            for r, (name, values) in enumerate(panels):
                img = values.reshape(n_side, n_side).T
                cmap = "RdBu_r" if name == "error" else "viridis"
                vmax = np.abs(img).max() if name == "error" else None
                im = axes[r, i].imshow(img, origin="lower", extent=extent, cmap=cmap,
                                       vmin=-vmax if vmax else None, vmax=vmax)
                axes[r, i].set_title(f"{name} t={t[i]:g}", fontsize=8)
                axes[r, i].tick_params(labelsize=6)
                fig.colorbar(im, ax=axes[r, i], fraction=0.046).ax.tick_params(labelsize=6)
        if x.shape[1] > 2:
            fig.suptitle("slice through the initial mean (x1, x2; other coordinates at the mean)",
                         fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def plot_moments(arrays: dict[str, np.ndarray], path: Path) -> list[Path]:
    """Predicted against exact standard deviation (and mean) over t, first few coordinates."""
    import matplotlib.pyplot as plt
    if "std_pred" not in arrays:
        return []
    tm = arrays["moment_t"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for k in range(min(arrays["std_pred"].shape[1], 3)):
        line, = axes[0].plot(tm, arrays["std_pred"][:, k], lw=1.5, label=f"x{k + 1} predicted")
        line2, = axes[1].plot(tm, arrays["mean_pred"][:, k], lw=1.5, label=f"x{k + 1} predicted")
        if "std_exact" in arrays:
            axes[0].plot(tm, arrays["std_exact"][:, k], "k--", lw=1, label="exact" if k == 0 else None)
            axes[1].plot(tm, arrays["mean_exact"][:, k], "k--", lw=1, label="exact" if k == 0 else None)
    axes[0].set_title("standard deviation")
    axes[1].set_title("mean")
    for ax in axes:
        ax.set_xlabel("t")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]
