"""Itô SDEs dX = μ(t, X) dt + σ(t, X) dW: the one home of an SDE for solve, simulate, calibrate.

An SDE is a ``torch.nn.Module``: its coefficients are buffers (a calibration can switch on
``requires_grad`` and differentiate the density through them). Every SDE gives its drift μ and
S with D = S Sᵀ = ½σσᵀ, closed-form divergences where they exist (``None`` lets the equation
fall back to autograd), exact Gaussian moments when it is linear, and one transition sampler
(exact where the law is known, Euler–Maruyama sub-steps otherwise).

One file per family: ``linear`` (OU, Brownian motion), ``double_well``, ``square_root`` (CIR,
GBM, CEV), ``heston``, ``custom`` (callables), on ``base`` (the config, the base class, the
march's Box–Cox coordinates). ``build`` holds the one table from kind to family
(:data:`~neuralpde_cli.sdes.build.FAMILIES`) and names the calibratable parameters as in the
config (``theta``, ``noise`` …; entries as ``theta[0][1]``, ``mean[1]`` when dim > 1):
:func:`parameter_names`, :func:`parameter_values`, :func:`parameter_constraint`, and
:func:`build_sde_with`, which builds the SDE from given tensors so the likelihood is
differentiable in them.
"""

from neuralpde_cli.sdes.base import (SDE, SDEConfig, march_log_jacobian, standard_gamma,
                                     to_march)
from neuralpde_cli.sdes.build import (FAMILIES, KINDS, PARAMETER_KEYS, build_sde, build_sde_with,
                                      parameter_constraint, parameter_names, parameter_values)
from neuralpde_cli.sdes.custom import CallableSDE, load_callable
from neuralpde_cli.sdes.double_well import CoupledDoubleWell, DoubleWell
from neuralpde_cli.sdes.heston import Heston, HestonLogVariance
from neuralpde_cli.sdes.linear import LinearSDE
from neuralpde_cli.sdes.square_root import CEV, PowerNoiseInPowerCoordinates, StateDependentNoise

__all__ = ["CEV", "FAMILIES", "KINDS", "PARAMETER_KEYS", "SDE", "CallableSDE", "CoupledDoubleWell",
           "DoubleWell", "Heston", "HestonLogVariance", "LinearSDE", "PowerNoiseInPowerCoordinates",
           "SDEConfig", "StateDependentNoise", "build_sde", "build_sde_with", "load_callable",
           "march_log_jacobian", "parameter_constraint", "parameter_names", "parameter_values",
           "standard_gamma", "to_march"]
