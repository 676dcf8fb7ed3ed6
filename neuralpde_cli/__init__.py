"""neuralpde: differentiable PDE solving from Hydra configs."""

__version__ = "0.1.0"


def calibrate(*args, **kwargs):  # noqa: ANN002, ANN003 - the signature is api.calibrate's
    """Fit an SDE to data by maximum likelihood: see :func:`neuralpde_cli.api.calibrate`."""
    from neuralpde_cli.api import calibrate as run
    return run(*args, **kwargs)


__all__ = ["calibrate", "__version__"]
