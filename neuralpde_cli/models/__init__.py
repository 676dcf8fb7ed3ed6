"""Learned dynamics: the neural SDE, the neural jump diffusion and the neural reaction–diffusion system."""
