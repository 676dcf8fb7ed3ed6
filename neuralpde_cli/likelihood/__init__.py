"""Likelihoods of discretely observed SDEs: the Fokker–Planck transition density, Gaussian baselines, and the fitter."""
