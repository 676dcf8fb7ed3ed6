"""Plots drawn only from what a run directory holds (metrics.csv, solution.npz)."""

from __future__ import annotations

import json
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
            out += plot_moments(arrays, plots_dir / "moments.png", _closed_form_moments(run_path))
            out += plot_animation(arrays, plots_dir / "density.gif")
            if "u_marginal" in arrays:
                marginal = {"t": arrays["t"], "x": arrays["x_marginal"], "u": arrays["u_marginal"]}
                if "u_marginal_exact" in arrays:
                    marginal["u_exact"] = arrays["u_marginal_exact"]
                out += plot_density(marginal, plots_dir / "marginals.png",
                                    "(x1, x2) marginal: the other coordinates integrated out")
    return out


def _closed_form_moments(run_path: Path) -> bool:
    """Whether the run's ansatz has closed-form moments (the mixture), from its summary.json."""
    try:
        return json.loads((run_path / "summary.json").read_text()).get("ansatz") == "gmm"
    except (OSError, ValueError):
        return False


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
    if x.shape[1] == 1:
        fig = _density_1d(plt, t, x[:, 0], u, ref)
    else:
        fig = _density_2d(plt, t, x, u, ref, title)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


#: |error| below this fraction of the largest is not drawn on the 1-D error axis (float64
#: rounding of densities and their tails reach 1e-300; eight decades hold what can be seen)
ERROR_DECADES = 8

#: a 2-D panel shows where the density exceeds this fraction of its peak, padded
ZOOM_LEVEL = 1e-3


def _density_1d(plt, t: np.ndarray, x: np.ndarray, u: np.ndarray, ref: np.ndarray | None):
    fig, axes = plt.subplots(1, 2 if ref is not None else 1, figsize=(11, 4), squeeze=False)
    axes = axes[0]
    worst = 0.0
    for i in range(len(t)):
        line, = axes[0].plot(x, u[i], lw=1.5, label=f"t={t[i]:g}")
        if ref is not None:
            axes[0].plot(x, ref[i], "--", color=line.get_color(), lw=1)
            err = np.abs(u[i] - ref[i])
            worst = max(worst, float(np.nanmax(err)))
            axes[1].semilogy(x, np.where(err > 0, err, np.nan), color=line.get_color(), lw=1.2,
                             label=f"t={t[i]:g}")
    axes[0].set_title("density (solid) and reference (dashed)" if ref is not None else "density")
    axes[0].set_xlabel("x")
    axes[0].set_ylabel("p(t, x)")
    axes[0].legend(fontsize=8)
    if ref is not None:
        if worst > 0:
            axes[1].set_ylim(worst * 10.0 ** -ERROR_DECADES, worst * 3)
        axes[1].set_title(f"|density − reference| (down to {10.0 ** -ERROR_DECADES:g} of the "
                          "largest)", fontsize=10)
        axes[1].set_xlabel("x")
        axes[1].grid(alpha=0.3, which="major")
    fig.tight_layout()
    return fig


def scaled(values: np.ndarray) -> tuple[np.ndarray, str]:
    """Values scaled by a power of ten so colour-bar ticks stay short; the factor for the title
    (a colour bar's own ``1e-5`` offset text would sit on the panel title above it)."""
    top = float(np.nanmax(np.abs(values))) if values.size else 0.0
    if not np.isfinite(top) or top == 0 or 1e-2 <= top < 1e3:
        return values, ""
    exponent = int(np.floor(np.log10(top)))
    return values / 10.0 ** exponent, f" (×1e{exponent})"


def _window(x: np.ndarray, images: list[np.ndarray]) -> tuple[float, float, float, float]:
    """Where any of the images exceeds ZOOM_LEVEL of its peak, padded by a quarter and by two
    grid cells, within the grid: each time gets its own window (a narrow early density is
    otherwise a dot in the window that holds the late one)."""
    lo, hi = x.min(0), x.max(0)
    mask = np.zeros(images[0].shape, dtype=bool)
    for img in images:
        peak = float(np.nanmax(img)) if img.size else 0.0
        if peak > 0:
            mask |= img >= ZOOM_LEVEL * peak
    n_side = images[0].shape[0]
    if not mask.any():
        return lo[0], hi[0], lo[1], hi[1]
    h = (hi - lo) / (n_side - 1)
    axes_x = [lo[k] + h[k] * np.arange(n_side) for k in (0, 1)]
    rows, cols = np.nonzero(mask)  # img[i, j]: i along x2 (row), j along x1 (column)
    x1 = axes_x[0][[cols.min(), cols.max()]]
    x2 = axes_x[1][[rows.min(), rows.max()]]
    half = 0.5 * max(x1[1] - x1[0], x2[1] - x2[0]) * 1.25 + 2 * h.max()
    out = []
    for k, centre in ((0, 0.5 * (x1[0] + x1[1])), (1, 0.5 * (x2[0] + x2[1]))):
        if 2 * half >= hi[k] - lo[k]:
            out += [lo[k], hi[k]]
        else:  # a square window, shifted (not cut) to stay inside the grid
            start = min(max(centre - half, lo[k]), hi[k] - 2 * half)
            out += [start, start + 2 * half]
    return tuple(out)  # type: ignore[return-value]


def _density_2d(plt, t: np.ndarray, x: np.ndarray, u: np.ndarray, ref: np.ndarray | None,
                title: str | None):
    n_t = len(t)
    n_side = int(round(np.sqrt(x.shape[0])))
    rows = 3 if ref is not None else 1
    width = 2.9 * n_t + 0.6
    fig, axes = plt.subplots(rows, n_t, figsize=(width, 2.6 * rows + 0.5), squeeze=False)
    h = (x.max(0) - x.min(0)) / (n_side - 1)
    # pixel edges half a cell outside the sample points, so each pixel is centred on its point
    extent = (x[:, 0].min() - h[0] / 2, x[:, 0].max() + h[0] / 2,
              x[:, 1].min() - h[1] / 2, x[:, 1].max() + h[1] / 2)
    for i in range(n_t):
        pred = u[i].reshape(n_side, n_side).T
        panels = [("prediction", pred)]
        if ref is not None:
            exact = ref[i].reshape(n_side, n_side).T
            panels += [("exact", exact), ("error", pred - exact)]
        window = _window(x, [p for name, p in panels if name != "error"])
        for r, (name, img) in enumerate(panels):
            ax = axes[r, i]
            shown, factor = scaled(img)
            if name == "error":
                vmax = float(np.nanmax(np.abs(shown))) or 1.0
                im = ax.imshow(shown, origin="lower", extent=extent, cmap="RdBu_r",
                               vmin=-vmax, vmax=vmax, interpolation="bilinear")
            else:
                im = ax.imshow(shown, origin="lower", extent=extent, cmap="viridis",
                               interpolation="bilinear")
            ax.set_xlim(window[0], window[1])
            ax.set_ylim(window[2], window[3])
            ax.set_title(f"{name} t={t[i]:g}{factor}", fontsize=8)
            ax.tick_params(labelsize=6)
            if r == rows - 1:
                ax.set_xlabel("x₁", fontsize=8)
            if i == 0:
                ax.set_ylabel("x₂", fontsize=8)
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03).ax.tick_params(labelsize=6)
    if title is None and x.shape[1] > 2:
        title = "slice through the initial mean (x₁, x₂; other coordinates at the mean)"
    title = (title + "; " if title else "") + "each time in its own window"
    fig.suptitle(title, fontsize=9)
    # fixed margins in inches (tight_layout would draw the 30 axes once more just to measure):
    # room for the last colour bar's labels on the right and the axis labels on the left
    height = 2.6 * rows + 0.5
    fig.subplots_adjust(left=0.55 / width, right=1 - 0.5 / width, bottom=0.45 / height,
                        top=1 - 0.6 / height, wspace=0.55, hspace=0.4)
    return fig


#: the grid's window must hold the exact mean ± this many stds for moments by quadrature (the
#: variance beyond 3.5 std of a Gaussian is 0.4% of it, 0.2% of the std)
COVER = 3.5


def moments_by_quadrature(x: np.ndarray, frames: np.ndarray, std_exact: np.ndarray,
                          mean_exact: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std (n_t, d) of the stored density frames by the grid's rule, NaN at times the
    grid does not resolve: a spacing above the exact std, or a window that does not hold the
    exact mean ± COVER std (d ≤ 2, where solution.npz holds frames on the regular grid)."""
    w = frames.astype(np.float64)
    mass = w.sum(1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = (w @ x) / mass
        var = (w @ (x * x)) / mass - mean ** 2
    std = np.sqrt(np.clip(var, 0.0, None))
    lo, hi = x.min(0), x.max(0)
    n_side = len(np.unique(x[:, 0]))
    h = (hi - lo) / max(n_side - 1, 1)
    ok = (std_exact >= h).all(1) & (mean_exact - COVER * std_exact >= lo).all(1) \
        & (mean_exact + COVER * std_exact <= hi).all(1) & (mass[:, 0] > 0)
    mean[~ok], std[~ok] = np.nan, np.nan
    return mean, std


def plot_moments(arrays: dict[str, np.ndarray], path: Path, closed_form: bool = False) -> list[Path]:
    """Predicted against exact standard deviation (and mean) over t, first few coordinates.

    The model's moments: its closed forms (``closed_form``, the mixture); else the quadrature
    of the density frames on the grid (d ≤ 2, where it resolves them), the same density
    solution.png shows; else (d > 2) the importance-sampled estimate stored in solution.npz,
    labelled as such (noisy where the model's tails differ from the exact law's)."""
    import matplotlib.pyplot as plt
    if "std_pred" not in arrays:
        return []
    tm = arrays["moment_t"]
    mean_pred, std_pred = arrays["mean_pred"], arrays["std_pred"]
    how = "closed form"
    if not closed_form:
        if "u_frames" in arrays and "std_exact" in arrays:
            mean_pred, std_pred = moments_by_quadrature(arrays["x"], arrays["u_frames"],
                                                        arrays["std_exact"], arrays["mean_exact"])
            how = "quadrature of the density on the plotted grid"
            if np.isnan(std_pred).any():
                how += " (gaps: times the grid does not resolve)"
        else:
            how = "importance-sampled from the exact law (noisy where the tails differ)"
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.3))
    for k in range(min(std_pred.shape[1], 3)):
        axes[0].plot(tm, std_pred[:, k], lw=1.5, label=f"x{k + 1} model")
        axes[1].plot(tm, mean_pred[:, k], lw=1.5, label=f"x{k + 1} model")
        if "std_exact" in arrays:
            style = {"lw": 1, "ls": "--", "color": "k", "label": "exact" if k == 0 else None}
            axes[0].plot(tm, arrays["std_exact"][:, k], **style)
            axes[1].plot(tm, arrays["mean_exact"][:, k], **style)
    axes[0].set_title("standard deviation")
    axes[1].set_title("mean")
    for ax, what in zip(axes, ("std of xₖ", "mean of xₖ")):
        ax.set_xlabel("t")
        ax.set_ylabel(what)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(f"model moments: {how}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def plot_animation(arrays: dict[str, np.ndarray], path: Path) -> list[Path]:
    """The density evolving over [0, T] (d ≤ 2), each frame on its own scale: 1-D p/max p
    with the peak in the title, 2-D a colour map from 0 to the frame's peak.

    The axes are drawn once; each frame redraws only the curve or image and the title onto
    that background (blitting), about five times cheaper than a full redraw per frame."""
    import matplotlib.pyplot as plt
    from PIL import Image
    if "u_frames" not in arrays:
        return []
    step = max(1, len(arrays["moment_t"]) // GIF_FRAMES)
    frames, tm, x = arrays["u_frames"][::step], arrays["moment_t"][::step], arrays["x"]
    fig, ax = plt.subplots(figsize=(4.2, 3.6), dpi=60)
    title = ax.set_title(" ", fontsize=9)
    if x.shape[1] == 1:
        artist, = ax.plot(x[:, 0], frames[0], lw=1.5)
        ax.set_xlim(float(x[0, 0]), float(x[-1, 0]))
        ax.set_ylim(0.0, 1.1)
        ax.set_xlabel("x")
        ax.set_ylabel("p / max p")

        def draw(i: int) -> None:
            peak = float(frames[i].max())
            artist.set_ydata(frames[i] / (peak or 1.0))
            title.set_text(f"p(t, x), t = {tm[i]:.3g}, max p = {peak:.3g}")
    else:
        n_side = int(round(np.sqrt(x.shape[0])))
        h = (x.max(0) - x.min(0)) / (n_side - 1)
        extent = (x[:, 0].min() - h[0] / 2, x[:, 0].max() + h[0] / 2,
                  x[:, 1].min() - h[1] / 2, x[:, 1].max() + h[1] / 2)
        artist = ax.imshow(frames[0].reshape(n_side, n_side).T, origin="lower", extent=extent,
                           cmap="viridis")
        ax.set_xlabel("x₁")
        ax.set_ylabel("x₂")

        def draw(i: int) -> None:
            img = frames[i].reshape(n_side, n_side).T
            artist.set_data(img)
            artist.set_clim(0.0, float(img.max()) or 1.0)
            title.set_text(f"p(t, x), t = {tm[i]:.3g}")
    fig.tight_layout()
    artist.set_animated(True)
    title.set_animated(True)
    canvas = fig.canvas
    canvas.draw()  # the static part: axes, ticks, labels
    background = canvas.copy_from_bbox(fig.bbox)
    images = []
    for i in range(len(tm)):
        draw(i)
        canvas.restore_region(background)
        ax.draw_artist(artist)
        fig.draw_artist(title)
        images.append(Image.frombuffer("RGBA", canvas.get_width_height(),
                                       bytes(canvas.buffer_rgba()), "raw", "RGBA", 0, 1)
                      .convert("RGB"))
    plt.close(fig)
    images[0].save(path, save_all=True, append_images=images[1:], duration=200, loop=0)
    return [path]
