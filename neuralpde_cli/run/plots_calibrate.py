"""Plots of a `calibrate` run, drawn only from fit.json, metrics.csv and diagnostics.npz.

Each plot answers one question a statistician asks of a fit: did the optimizer converge
(trace), is the likelihood quadratic enough for the Wald intervals to mean anything (profiles),
does the fitted transition law match the data (transition, pit), and how far is the PDE
estimate from the exact MLE and the cheap approximations, in standard errors (estimates).
A missing file or key skips the plots that need it, with a log line, never the others.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from neuralpde_cli.run.rundir import read_metrics

log = logging.getLogger(__name__)

#: the χ²₁ 95% quantile halved: a profile log-likelihood above −1.92 is inside the 95% interval
CHI2_95_HALF = 0.5 * 3.841458820694124
#: the normal 97.5% quantile, for ±1.96·SE bars
Z_95 = 1.959963984540054
#: order and colour of the methods on estimates.png (the fit itself is "pde")
METHOD_COLORS = {"pde": "C0", "bias-corrected": "C4", "exact": "k", "kessler": "C2",
                 "euler": "C3"}
#: metrics.csv columns that are not parameters
_METRIC_COLUMNS = ("iteration", "loglik", "grad_norm", "step_size")
_DPI = 110


def make_calibration_plots(run_dir: Path) -> list[Path]:
    """trace, profiles, transition, pit, estimates and correlation PNGs under run_dir/plots
    (each one whose inputs are there); returns the paths written."""
    import matplotlib
    matplotlib.use("Agg")
    run_dir = Path(run_dir)
    plots_dir = run_dir / "plots"
    plots_dir.mkdir(parents=True, exist_ok=True)
    fit = _read_fit(run_dir / "fit.json")
    diag = _read_diagnostics(run_dir / "diagnostics.npz")
    metrics_path = run_dir / "metrics.csv"
    metrics = read_metrics(metrics_path) if metrics_path.exists() else {}

    out: list[Path] = []
    if metrics.get("loglik") is not None:
        out += plot_trace(metrics, fit, plots_dir / "trace.png")
    else:
        log.info("trace.png skipped: %s has no loglik rows", metrics_path)
    if _has(diag, "profile_names", "profile_grid", "profile_loglik"):
        out += plot_profiles(diag, fit, plots_dir / "profiles.png")
    else:
        log.info("profiles.png skipped: diagnostics.npz holds no profile_grid/profile_loglik")
    if _has(diag, "bin_edges", "bin_dt", "density_x", "density_fit", "bin_x1", "bin_index"):
        out += plot_transition(diag, fit, plots_dir / "transition.png")
    else:
        log.info("transition.png skipped: diagnostics.npz holds no transition-density bins")
    if _has(diag, "pit") and np.isfinite(diag["pit"]).any():
        out += plot_pit(diag["pit"], plots_dir / "pit.png")
        if _has(diag, "transition_time"):
            out += plot_pit_time(diag, plots_dir / "pit_time.png")
    else:
        log.info("pit.png skipped: diagnostics.npz holds no PIT values")
    if _has(diag, "filtered_time", "filtered_variance_mean"):
        out += plot_filtered(diag, plots_dir / "filtered.png")
    if fit.get("estimates"):
        out += plot_estimates(fit, plots_dir / "estimates.png")
    else:
        log.info("estimates.png skipped: fit.json holds no estimates")
    names = _names(fit)
    if len(names) > 1 and np.shape(fit.get("correlation") or []) == (len(names), len(names)):
        out += plot_correlation(fit, plots_dir / "correlation.png")
    elif len(names) > 1:
        log.info("correlation.png skipped: fit.json holds no %d × %d correlation", len(names),
                 len(names))
    return out


def plot_correlation(fit: dict[str, Any], path: Path) -> list[Path]:
    """The estimates' correlation matrix (observed information): which parameters the data
    cannot tell apart (|r| near 1), on a diverging scale centred on 0."""
    import matplotlib.pyplot as plt
    names = _names(fit)
    corr = np.array([[_num(v) for v in row] for row in fit["correlation"]], dtype=float)
    size = max(4.0, 1.2 + 0.55 * len(names))
    fig, ax = plt.subplots(figsize=(size + 1.2, size), layout="constrained")
    image = ax.imshow(corr, cmap="RdBu_r", vmin=-1, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    if len(names) <= 12:
        for i in range(len(names)):
            for j in range(len(names)):
                if np.isfinite(corr[i, j]):
                    ax.text(j, i, f"{corr[i, j]:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if abs(corr[i, j]) > 0.6 else "black")
    fig.colorbar(image, ax=ax, label="correlation of the estimates")
    ax.set_title("correlation of the estimates (observed information)", fontsize=10)
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------
# the plots

def plot_trace(metrics: dict[str, np.ndarray], fit: dict[str, Any], path: Path) -> list[Path]:
    """Each parameter against iteration (final estimate ± SE band, truth dashed), then the
    log-likelihood's gap to its final value and the gradient norm, both on log scales."""
    names = [n for n in _names(fit) if n in metrics] or \
        [k for k in metrics if k not in _METRIC_COLUMNS and k != "phase"]
    it = metrics.get("iteration", np.arange(len(metrics["loglik"]), dtype=float))
    fig, axes = _panels(len(names) + 2, max_cols=4)
    truth = fit.get("true_values") or {}
    for ax, name in zip(axes, names):
        values = metrics[name]
        est, se = _num(fit.get("estimates", {}).get(name)), _num(fit.get("se", {}).get(name))
        ax.plot(it, values, "o-" if len(it) < 40 else "-", ms=2.5, lw=1.2, color="C0",
                label="iterate")
        if math.isfinite(est):
            ax.axhline(est, color="C0", lw=0.8, alpha=0.7, label="final estimate")
            if math.isfinite(se) and se > 0:
                ax.axhspan(est - se, est + se, color="C0", alpha=0.15, lw=0, label="± 1 SE")
        if math.isfinite(_num(truth.get(name))):
            ax.axhline(_num(truth[name]), color="k", ls="--", lw=1, label="truth")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("iteration")
    ax_ll, ax_grad = axes[len(names)], axes[len(names) + 1]
    loglik = metrics["loglik"]
    finite = np.isfinite(loglik)
    final = float(loglik[finite][-1]) if finite.any() else math.nan
    gap = final - loglik
    shown = finite & (gap > 0)
    if shown.any():
        ax_ll.semilogy(it[shown], gap[shown], "o-" if shown.sum() < 40 else "-", ms=2.5,
                       lw=1.2, color="C1")
        ax_ll.set_ylabel("ℓ(final) − ℓ")
    else:  # one iteration, or a flat trace: the log-likelihood itself
        ax_ll.plot(it[finite], loglik[finite], "o-", ms=2.5, color="C1")
        ax_ll.set_ylabel("ℓ")
    ax_ll.set_title(f"log-likelihood (final {final:.6g})", fontsize=9)
    ax_ll.set_xlabel("iteration")
    drawn = False
    for key, color in (("grad_norm", "C4"), ("step_size", "C5")):
        values = metrics.get(key)
        if values is not None:
            ok = np.isfinite(values) & (values > 0)
            if ok.any():
                ax_grad.semilogy(it[ok], values[ok], "o-" if ok.sum() < 40 else "-", ms=2.5,
                                 lw=1.2, color=color, label=key.replace("_", " "))
                drawn = True
    if drawn:
        ax_grad.legend(fontsize=7)
    else:
        ax_grad.text(0.5, 0.5, "no gradient norm recorded", ha="center", va="center",
                     transform=ax_grad.transAxes, fontsize=8, color="0.4")
    ax_grad.set_title("gradient norm and step size", fontsize=9)
    ax_grad.set_xlabel("iteration")
    for ax in axes[:len(names) + 2]:
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
    _figure_legend(fig, axes[:len(names)])
    fig.suptitle(f"{fit.get('method', 'fit')}: iterates of the likelihood maximization", fontsize=10)
    return _save(fig, path)


def plot_profiles(diag: dict[str, np.ndarray], fit: dict[str, Any], path: Path) -> list[Path]:
    """Profile log-likelihood minus its maximum per parameter, the χ²₁ 95% line at −1.92 and the
    Wald quadratic −½((θ − θ̂)/SE)²: where the two part, the Wald interval is not to be trusted."""
    names = [n.decode() if isinstance(n, bytes) else str(n)
             for n in np.atleast_1d(diag["profile_names"])]
    grid = np.atleast_2d(np.asarray(diag["profile_grid"], dtype=float))
    loglik = np.atleast_2d(np.asarray(diag["profile_loglik"], dtype=float))
    fig, axes = _panels(len(names), max_cols=3)
    truth = fit.get("true_values") or {}
    for ax, name, g, ll in zip(axes, names, grid, loglik):
        ok = np.isfinite(g) & np.isfinite(ll)
        g, ll = g[ok], ll[ok]
        order = np.argsort(g)
        g, ll = g[order], ll[order]
        ax.set_xlabel(name)
        ax.set_ylabel("profile ℓ − max ℓ")
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
        if len(g) < 2:
            ax.set_title(f"{name}: no finite profile points", fontsize=8)
            continue
        rel = ll - ll.max()
        est = _num(fit.get("estimates", {}).get(name))
        if not math.isfinite(est):
            est = float(g[np.argmax(ll)])
        se = _num(fit.get("se", {}).get(name))
        fine = np.linspace(g[0], g[-1], 200)
        ax.plot(g, rel, "o-", ms=3, lw=1.4, color="C0", label="profile likelihood")
        title = f"{name}: profile 95% {_interval_text(profile_interval(g, ll))}"
        if math.isfinite(se) and se > 0:
            ax.plot(fine, -0.5 * ((fine - est) / se) ** 2, "--", lw=1.2, color="C1",
                    label="Wald quadratic (from SE)")
            title += f"\nWald 95% [{est - Z_95 * se:.4g}, {est + Z_95 * se:.4g}]"
        ax.axhline(-CHI2_95_HALF, color="0.3", ls=":", lw=1, label="χ²₁ 95% (−1.92)")
        ax.axvline(est, color="C0", lw=0.8, alpha=0.6)
        if math.isfinite(_num(truth.get(name))):
            ax.axvline(_num(truth[name]), color="k", ls="--", lw=1, label="truth")
        low = float(rel.min())
        ax.set_ylim(min(low, -2.5) * 1.08, 0.25 * max(1.0, -low / 10))
        ax.set_xlim(g[0], g[-1])
        ax.set_title(title, fontsize=8)
    _figure_legend(fig, axes[:len(names)])
    fig.suptitle("profile log-likelihood (the others on the line where they maximize the "
                 "quadratic model from the observed information)", fontsize=10)
    return _save(fig, path)


def plot_transition(diag: dict[str, np.ndarray], fit: dict[str, Any], path: Path) -> list[Path]:
    """Top row, per x_k bin: the fitted conditional density given the bin's median start (and
    the exact one where the law is known) on a log scale, so the tails show, over a histogram
    of the bin's moves recentred on that start. Bottom: each observed transition's
    log-density against time, fitted and exact, the lowest ones dated: the moves the model
    finds extreme, and where the approximation errs."""
    import matplotlib.pyplot as plt

    edges = np.atleast_2d(np.asarray(diag["bin_edges"], dtype=float))
    bin_dt = np.atleast_1d(np.asarray(diag["bin_dt"], dtype=float))
    starts = np.atleast_1d(np.asarray(diag.get("bin_start", np.full(len(edges), np.nan)), float))
    dens_x = np.atleast_2d(np.asarray(diag["density_x"], dtype=float))
    dens_fit = np.atleast_2d(np.asarray(diag["density_fit"], dtype=float))
    dens_exact = diag.get("density_exact")
    dens_exact = None if dens_exact is None else np.atleast_2d(np.asarray(dens_exact, dtype=float))
    x1 = np.asarray(diag["bin_x1"], dtype=float).ravel()
    index = np.asarray(diag["bin_index"]).ravel()
    method = fit.get("method", "fit")
    n_bins = len(edges)
    per_transition = _has(diag, "transition_time", "logdensity_fit")
    fig = plt.figure(figsize=(3.6 * min(n_bins, 4), 2.9 + (3.0 if per_transition else 0.0)),
                     layout="constrained")
    grid = fig.add_gridspec(2 if per_transition else 1, min(n_bins, 4))
    for b in range(min(n_bins, 4)):
        ax = fig.add_subplot(grid[0, b])
        data = x1[(index == b) & np.isfinite(x1)]
        if len(data):
            n_hist = int(np.clip(np.sqrt(len(data)), 8, 50))
            ax.hist(data, bins=n_hist, density=True, color="0.75", edgecolor="0.55", lw=0.4,
                    label="observed moves, recentred")
        xs, fit_b = dens_x[b], dens_fit[b]
        ax.plot(xs, fit_b, "-", lw=1.5, color="C0", label=f"fitted ({method})")
        if dens_exact is not None and b < len(dens_exact) and np.isfinite(dens_exact[b]).any():
            ax.plot(xs, dens_exact[b], "--", lw=1.2, color="k", label="exact law at θ̂")
        ax.set_yscale("log")
        top = float(np.nanmax(fit_b)) if np.isfinite(fit_b).any() else 1.0
        ax.set_ylim(top * 1e-7, top * 3)
        ax.set_xlim(xs[0], xs[-1])
        dt = bin_dt[b] if b < len(bin_dt) else math.nan
        ax.set_title(f"$x_k$ = {starts[b]:.4g} (bin [{edges[b, 0]:.4g}, {edges[b, 1]:.4g}]), "
                     f"Δt = {dt:.3g}, n = {len(data)}", fontsize=7)
        ax.set_xlabel("$x_{k+1}$ (moves: $x_{k+1} - x_k + $ the bin's median start)", fontsize=7)
        ax.set_ylabel("density (log scale)", fontsize=7)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if b == 0:
            ax.legend(fontsize=6, loc="lower center")
    if per_transition:
        ax = fig.add_subplot(grid[1, :])
        t, xlabel = _time_axis(diag, "transition_time", "transition_date")
        lp = np.asarray(diag["logdensity_fit"], float)
        ex = np.asarray(diag.get("logdensity_exact", np.full(t.shape, np.nan)), float)
        dates = diag.get("transition_date")
        ax.plot(t, lp, ".", ms=2.5 if t.size > 800 else 4, color="C0",
                label=f"fitted ({method})")
        if np.isfinite(ex).any():
            ax.plot(t, ex, "o", ms=4 if t.size <= 800 else 3, mfc="none", mec="k", mew=0.5,
                    label="exact law at θ̂")
        for k in np.argsort(lp)[:5]:
            when = str(dates[k]) if dates is not None else f"t = {float(t[k]):.6g}"
            ax.annotate(f"{when}: {lp[k]:.1f}", (t[k], lp[k]), fontsize=6, xytext=(4, -2),
                        textcoords="offset points", color="C3")
        ax.set_xlabel(f"{xlabel} of the transition's end")
        ax.set_ylabel("log-density of the observed move")
        ax.set_title("each observed transition under the fitted law: the lowest are the moves "
                     "the model finds extreme (the five lowest dated)", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower left")
        ax.tick_params(labelsize=7)
    fig.suptitle("transition law given $x_k$: fitted against observed moves (log scale) and "
                 "per transition", fontsize=10)
    return _save(fig, path)


def plot_pit_time(diag: dict[str, np.ndarray], path: Path) -> list[Path]:
    """The PIT's normal score z_k = Φ⁻¹(u_k) against time, with the bands that |z| passes with
    probability 1 % and 0.1 % under the model, the points beyond dated; and a rolling mean of
    z² (1 when the model's scale is right): where in time the model fails."""
    import matplotlib.pyplot as plt
    from scipy.stats import norm

    u = np.clip(np.asarray(diag["pit"], float), 1e-16, 1 - 1e-16)
    t, xlabel = _time_axis(diag, "transition_time", "transition_date")
    z = norm.ppf(u)
    dates = diag.get("transition_date")
    fig, axes = plt.subplots(2, 1, figsize=(11, 5.6), sharex=True, layout="constrained",
                             height_ratios=[2, 1])
    ax = axes[0]
    ax.plot(t, z, ".", ms=2.5 if t.size > 800 else 4, color="k")
    for q, style in ((0.99, ":"), (0.999, "--")):
        c = norm.ppf(0.5 + q / 2)
        ax.axhline(c, color="C3", ls=style, lw=0.9, label=f"|z| = {c:.2f}: {1 - q:.1%} under the model")
        ax.axhline(-c, color="C3", ls=style, lw=0.9)
    beyond = np.flatnonzero(np.abs(z) > norm.ppf(0.9995))
    expected = 0.001 * z.size
    for k in beyond[np.argsort(-np.abs(z[beyond]))][:8]:
        when = str(dates[k]) if dates is not None else f"t = {float(t[k]):.6g}"
        ax.annotate(when, (t[k], z[k]), fontsize=6, xytext=(3, 0), textcoords="offset points",
                    color="C3")
    ax.set_ylabel("z = Φ⁻¹(PIT)")
    ax.set_title(f"normal scores of the transitions: {beyond.size} beyond 0.1 % bands where "
                 f"the model expects {expected:.1f}", fontsize=9)
    ax.legend(fontsize=7, loc="lower left")
    ax.grid(alpha=0.3)
    window = int(np.clip(z.size // 20, 5, 250))
    if z.size >= window:
        kernel = np.ones(window) / window
        rolling = np.convolve(z * z, kernel, mode="valid")
        centre = t[window // 2: window // 2 + rolling.size]
        axes[1].plot(centre, rolling, color="C0", lw=1.2)
    axes[1].axhline(1.0, color="k", lw=0.8)
    axes[1].set_ylabel(f"rolling mean of z²\n({window} transitions)", fontsize=8)
    axes[1].set_xlabel(f"{xlabel} of the transition's end")
    axes[1].grid(alpha=0.3)
    for a in axes:
        a.tick_params(labelsize=7)
    fig.suptitle("where in time the fitted law fails: normal scores and their rolling variance "
                 "(1 when the model's scale is right)", fontsize=10)
    return _save(fig, path)


def _time_axis(diag: dict[str, np.ndarray], time_key: str, date_key: str
               ) -> tuple[np.ndarray, str]:
    """The x values of a plot against time, and their label: the dates where the data had
    them (a time in years counted from 1970 by trading days reads years off the calendar: 2014
    plotted as 2015.6), else the data's own time in years."""
    dates = diag.get(date_key)
    if dates is not None and len(dates) == len(diag[time_key]):
        try:
            return np.asarray([str(d) for d in dates], dtype="datetime64[s]"), "date"
        except ValueError:
            pass
    return np.asarray(diag[time_key], float), "time (years)"


def plot_filtered(diag: dict[str, np.ndarray], path: Path) -> list[Path]:
    """The latent variance as the filter sees it after each observation (mean, 5–95 % band),
    beside the proxy the user named (VIX² for V, say), and the volatility √V below: what a
    fit from prices alone says the variance was."""
    import matplotlib.pyplot as plt

    t, xlabel = _time_axis(diag, "filtered_time", "filtered_date")
    mean = np.asarray(diag["filtered_variance_mean"], float)
    lo, hi = (np.asarray(diag[k], float) for k in ("filtered_variance_q05", "filtered_variance_q95"))
    proxy = np.asarray(diag["filtered_proxy"], float) if "filtered_proxy" in diag else None
    fig, axes = plt.subplots(2, 1, figsize=(11, 5.6), sharex=True, layout="constrained")
    for ax, f, label in ((axes[0], lambda v: v, "V"), (axes[1], np.sqrt, "√V (volatility)")):
        ax.fill_between(t, f(lo), f(hi), color="C0", alpha=0.25, lw=0,
                        label="filtered 5–95 %")
        ax.plot(t, f(mean), color="C0", lw=0.9, label="filtered mean")
        if proxy is not None and np.isfinite(proxy).any():
            name = str(diag.get("filtered_proxy_name", "proxy"))
            ax.plot(t, f(np.clip(proxy, 0, None)), color="C3", lw=0.7, alpha=0.8,
                    label=f"proxy: {name}")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
    axes[0].legend(fontsize=7, loc="upper left")
    dates = diag.get("filtered_date")
    axes[1].set_xlabel(xlabel + (f"; {dates[0]} … {dates[-1]}" if dates is not None
                                 and len(dates) else ""))
    inside = None
    if proxy is not None and np.isfinite(proxy).any():
        ok = np.isfinite(proxy)
        inside = float(np.mean((proxy[ok] >= lo[ok]) & (proxy[ok] <= hi[ok])))
    fig.suptitle("the latent variance filtered from the observed series at the estimate"
                 + (f" (the proxy inside the 5–95 % band {inside:.0%} of the time)"
                    if inside is not None else ""), fontsize=10)
    return _save(fig, path)


def plot_pit(u: np.ndarray, path: Path) -> list[Path]:
    """PIT values u_k = F(x_{k+1} | x_k; θ̂), uniform when the fitted law is right: histogram
    (95% binomial band around 1), QQ-plot against U(0,1), and the ECDF's departure from the
    diagonal, both with the 95% Kolmogorov–Smirnov band."""
    import matplotlib.pyplot as plt
    from scipy import stats
    u = np.asarray(u, dtype=float).ravel()
    u = np.sort(u[np.isfinite(u)])
    n = len(u)
    ks = stats.kstest(u, "uniform")
    band = ks_band(n)
    fig, axes = plt.subplots(1, 3, figsize=(13, 4), layout="constrained")
    n_hist = int(np.clip(np.sqrt(n), 5, 40))
    axes[0].hist(u, bins=n_hist, range=(0, 1), density=True, color="0.6", edgecolor="0.45",
                 lw=0.4, alpha=0.75, zorder=2)
    p = 1.0 / n_hist
    half = Z_95 * math.sqrt((1 - p) / (n * p))  # per-bin binomial, in density units
    axes[0].axhspan(1 - half, 1 + half, color="C0", alpha=0.15, lw=0, zorder=1,
                    label="95% range of a bin under U(0,1)")
    axes[0].axhline(1.0, color="C0", lw=1.2, zorder=3, label="U(0,1)")
    axes[0].set_xlim(0, 1)
    axes[0].set_xlabel("u")
    axes[0].set_ylabel("density")
    axes[0].set_title("histogram of u (flat at 1 when the law is right)", fontsize=9)
    axes[0].legend(fontsize=7, loc="lower center", framealpha=0.9)

    q = (np.arange(1, n + 1) - 0.5) / n
    grid = np.linspace(0, 1, 201)
    axes[1].fill_between(grid, np.clip(grid - band, 0, 1), np.clip(grid + band, 0, 1),
                         color="C0", alpha=0.15, lw=0, label="95% KS band")
    axes[1].plot([0, 1], [0, 1], color="C0", lw=1)
    axes[1].plot(q, u, ".", ms=2 if n > 500 else 4, color="k", label="sorted u")
    axes[1].set_xlim(0, 1)
    axes[1].set_ylim(0, 1)
    axes[1].set_aspect("equal")
    axes[1].set_xlabel("U(0,1) quantile")
    axes[1].set_ylabel("empirical quantile of u")
    axes[1].set_title("QQ-plot against U(0,1)", fontsize=9)
    axes[1].legend(fontsize=7, loc="upper left")

    ecdf_hi = np.arange(1, n + 1) / n  # the ECDF just at and just below each u_(i)
    ecdf_lo = np.arange(0, n) / n
    steps_x = np.repeat(u, 2)
    steps_y = np.column_stack([ecdf_lo - u, ecdf_hi - u]).ravel()
    axes[2].fill_between([0, 1], -band, band, color="C0", alpha=0.15, lw=0, label="95% KS band")
    axes[2].axhline(0, color="C0", lw=1)
    axes[2].plot(steps_x, steps_y, lw=0.9, color="k", label="ECDF(u) − u")
    lim = 1.3 * max(band, float(np.abs(steps_y).max()))
    axes[2].set_xlim(0, 1)
    axes[2].set_ylim(-lim, lim)
    axes[2].set_xlabel("u")
    axes[2].set_ylabel("ECDF(u) − u")
    axes[2].set_title("departure from uniform (KS D is its largest |value|)", fontsize=9)
    axes[2].legend(fontsize=7, loc="upper right")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
    fig.suptitle(f"probability integral transform, n = {n}: Kolmogorov–Smirnov D = "
                 f"{ks.statistic:.4f}, p = {ks.pvalue:.3g} (95% critical D = {band:.4f})",
                 fontsize=10)
    return _save(fig, path)


def plot_estimates(fit: dict[str, Any], path: Path) -> list[Path]:
    """Per parameter: the fit and every baseline with ±1.96·SE bars, the truth as a line, and
    each method's distance from the exact MLE in exact SEs (with its SE relative to the exact)."""
    baselines = fit.get("baselines") or {}
    order = sorted(baselines, key=lambda k: list(METHOD_COLORS).index(k) if k in METHOD_COLORS
                   else len(METHOD_COLORS))
    methods = {fit.get("method", "pde"): fit}
    if (fit.get("bias_correction") or {}).get("estimates"):  # fit.bootstrap_sets
        methods["bias-corrected"] = fit["bias_correction"]
    methods.update({k: baselines[k] for k in order})
    exact = baselines.get("exact")
    truth = fit.get("true_values") or {}
    names = _names(fit)
    fig, axes = _panels(len(names), max_cols=3, panel=(3.6, 3.0))
    for ax, name in zip(axes, names):
        ex_est = _num((exact or {}).get("estimates", {}).get(name))
        ex_se = _num((exact or {}).get("se", {}).get(name))
        labels = []
        for i, (method, result) in enumerate(methods.items()):
            est = _num((result.get("estimates") or {}).get(name))
            se = _num((result.get("se") or {}).get(name))
            labels.append(method)
            if not math.isfinite(est):
                continue
            color = METHOD_COLORS.get(method, f"C{5 + i}")
            ax.errorbar(i, est, yerr=Z_95 * se if math.isfinite(se) else None, fmt="o",
                        ms=5, capsize=4, lw=1.4, color=color)
            notes = [] if math.isfinite(se) else ["no SE"]
            if method != "exact" and math.isfinite(ex_est) and math.isfinite(ex_se) and ex_se > 0:
                notes.append(f"{(est - ex_est) / ex_se:+.2f} SE")
                if math.isfinite(se):
                    notes.append(f"SE×{se / ex_se:.2f}")
            if notes:
                ax.annotate("\n".join(notes), (i, est), xytext=(7, 0), textcoords="offset points",
                            fontsize=6.5, va="center", color=color)
        if math.isfinite(_num(truth.get(name))):
            ax.axhline(_num(truth[name]), color="0.2", ls="--", lw=1, label="truth")
        if math.isfinite(ex_est):
            ax.axhline(ex_est, color="k", ls=":", lw=0.8, alpha=0.6, label="exact MLE")
        ax.set_xticks(range(len(labels)), labels, fontsize=8)
        ax.set_xlim(-0.5, len(labels) - (0.2 if exact else 0.5))
        ax.set_ylabel("estimate")
        ax.set_title(name, fontsize=9)
        ax.tick_params(axis="y", labelsize=7)
        ax.grid(alpha=0.3, axis="y")
    _figure_legend(fig, axes[:len(names)])
    note = ("; beside each: (estimate − exact MLE) / exact SE, and SE / exact SE"
            if exact else "")
    fig.suptitle(f"estimates with 95% intervals (±1.96 SE){note}", fontsize=10)
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------
# helpers (public ones are tested against closed forms)

def profile_interval(grid: np.ndarray, loglik: np.ndarray) -> tuple[float, float]:
    """The 95% profile-likelihood interval {θ: ℓ_p(θ) ≥ max ℓ_p − 1.92}, its ends interpolated
    linearly between grid points; an end the grid does not reach is NaN."""
    grid, rel = np.asarray(grid, float), np.asarray(loglik, float) - np.max(loglik)
    top = int(np.argmax(rel))
    inside = rel >= -CHI2_95_HALF

    def crossing(indices: range) -> float:
        prev = top
        for i in indices:
            if not inside[i]:
                a, b = rel[prev], rel[i]
                w = (a + CHI2_95_HALF) / (a - b)
                return float(grid[prev] + w * (grid[i] - grid[prev]))
            prev = i
        return math.nan
    return crossing(range(top - 1, -1, -1)), crossing(range(top + 1, len(grid)))


def ks_band(n: int) -> float:
    """The 95% critical value of the two-sided one-sample Kolmogorov–Smirnov statistic for n
    points: the ECDF of n uniforms stays within ±band of the diagonal with probability 0.95."""
    from scipy import stats
    return float(stats.kstwo.ppf(0.95, n)) if n > 0 else math.nan


def _interval_text(interval: tuple[float, float]) -> str:
    lo, hi = interval
    return (f"[{lo:.4g}" if math.isfinite(lo) else "[< grid") + ", " + \
        (f"{hi:.4g}]" if math.isfinite(hi) else "> grid]")


def _density_range(xs: np.ndarray, density: np.ndarray, data: np.ndarray) -> tuple[float, float]:
    """Where the density has mass (above 1e-3 of its peak) joined with where the data lie."""
    ok = np.isfinite(density) & np.isfinite(xs)
    lo, hi = (float(xs[ok].min()), float(xs[ok].max())) if ok.any() else (math.inf, -math.inf)
    if ok.any() and np.nanmax(density[ok]) > 0:
        mass = xs[ok][density[ok] > 1e-3 * np.nanmax(density[ok])]
        lo, hi = float(mass.min()), float(mass.max())
    if len(data):
        lo, hi = min(lo, float(data.min())), max(hi, float(data.max()))
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return (lo - 0.5, lo + 0.5) if math.isfinite(lo) else (0.0, 1.0)
    pad = 0.03 * (hi - lo)
    return lo - pad, hi + pad


def _panels(n: int, max_cols: int, panel: tuple[float, float] = (3.4, 2.7)):
    """A grid of n small panels (the unused ones hidden) on a constrained-layout figure."""
    import matplotlib.pyplot as plt
    n = max(n, 1)
    cols = min(n, max_cols)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(max(panel[0] * cols, 5.0), panel[1] * rows + 0.8),
                             squeeze=False, layout="constrained")
    flat = list(axes.ravel())
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat


def _figure_legend(fig, axes) -> None:
    """One legend under the panels, each label once (small panels stay uncluttered)."""
    seen: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, handle)
    if seen:
        fig.legend(list(seen.values()), list(seen.keys()), loc="outside lower center",
                   ncols=min(len(seen), 5), fontsize=8, frameon=False)


def _save(fig, path: Path) -> list[Path]:
    import matplotlib.pyplot as plt
    fig.savefig(path, dpi=_DPI)
    plt.close(fig)
    return [path]


def _read_fit(path: Path) -> dict[str, Any]:
    if not path.exists():
        log.info("%s not found: plots drawn without estimates or standard errors", path)
        return {}
    return json.loads(path.read_text())


def _read_diagnostics(path: Path) -> dict[str, np.ndarray]:
    if not path.exists():
        log.info("%s not found: profiles, transition and pit plots skipped", path)
        return {}
    out: dict[str, np.ndarray] = {}
    with np.load(path, allow_pickle=False) as data:
        for key in data.files:
            try:
                out[key] = data[key]
            except ValueError:  # an object array: not part of the schema
                log.info("%s: array %r is not plain numbers or strings; ignored", path, key)
    return out


def _has(arrays: dict[str, np.ndarray], *keys: str) -> bool:
    return all(k in arrays and np.size(arrays[k]) > 0 for k in keys)


def _names(fit: dict[str, Any]) -> list[str]:
    return list(fit.get("names") or (fit.get("estimates") or {}).keys())


def _num(value: Any) -> float:
    """A JSON number as float; null (how NaN is written) and absent as NaN."""
    try:
        return float(value) if value is not None else math.nan
    except (TypeError, ValueError):
        return math.nan
