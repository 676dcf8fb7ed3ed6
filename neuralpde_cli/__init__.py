"""neuralpde: differentiable PDE solving from Hydra configs."""

__version__ = "0.1.0"
