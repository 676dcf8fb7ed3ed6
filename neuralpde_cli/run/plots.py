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
            out += plot_grid_run(npz_path, plots_dir)
        elif "u" in arrays:
            out += plot_density(arrays, plots_dir / "solution.png")
            out += plot_moments(arrays, plots_dir / "moments.png")
            out += plot_animation(arrays, plots_dir / "density.gif")
            if "u_marginal" in arrays:
                marginal = {"t": arrays["t"], "x": arrays["x_marginal"], "u": arrays["u_marginal"]}
                if "u_marginal_exact" in arrays:
                    marginal["u_exact"] = arrays["u_marginal_exact"]
                out += plot_density(marginal, plots_dir / "marginals.png",
                                    "(x1, x2) marginal: the other coordinates integrated out")
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


#: frames of plots/density.gif (about; every k-th of the stored ones)
GIF_FRAMES = 20

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


def plot_density(arrays: dict[str, np.ndarray], path: Path, title: str | None = None) -> list[Path]:
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
        if title is None and x.shape[1] > 2:
            title = "slice through the initial mean (x1, x2; other coordinates at the mean)"
        if title:
            fig.suptitle(title, fontsize=9)
        # fixed spacing: tight_layout would draw the 30 axes once more just to measure them
        fig.subplots_adjust(left=0.04, right=0.97, bottom=0.06, top=0.92, wspace=0.45, hspace=0.4)
    if x.shape[1] == 1:
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


def plot_animation(arrays: dict[str, np.ndarray], path: Path) -> list[Path]:
    """The density evolving over [0, T] (d ≤ 2), each frame on its own colour/height scale."""
    import matplotlib.pyplot as plt
    from matplotlib.animation import FuncAnimation, PillowWriter
    if "u_frames" not in arrays:
        return []
    step = max(1, len(arrays["moment_t"]) // GIF_FRAMES)  # writing frames is what costs
    frames, tm, x = arrays["u_frames"][::step], arrays["moment_t"][::step], arrays["x"]
    fig, ax = plt.subplots(figsize=(4.2, 3.6))
    if x.shape[1] == 1:
        line, = ax.plot(x[:, 0], frames[0], lw=1.5)
        ax.set_xlabel("x")

        def draw(i: int) -> None:
            line.set_ydata(frames[i])
            ax.set_ylim(0.0, 1.1 * float(frames[i].max()) or 1.0)
            ax.set_title(f"p(t, x), t = {tm[i]:.3g}", fontsize=9)
    else:
        n_side = int(round(np.sqrt(x.shape[0])))
        extent = (x[:, 0].min(), x[:, 0].max(), x[:, 1].min(), x[:, 1].max())
        image = ax.imshow(frames[0].reshape(n_side, n_side).T, origin="lower", extent=extent,
                          cmap="viridis")
        ax.set_xlabel("x1")
        ax.set_ylabel("x2")

        def draw(i: int) -> None:
            img = frames[i].reshape(n_side, n_side).T
            image.set_data(img)
            image.set_clim(0.0, float(img.max()) or 1.0)
            ax.set_title(f"p(t, x), t = {tm[i]:.3g}", fontsize=9)
    FuncAnimation(fig, draw, frames=len(tm)).save(path, writer=PillowWriter(fps=5), dpi=60)
    plt.close(fig)
    return [path]
