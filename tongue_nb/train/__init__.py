"""Training: typed parameters, the run assembly (trainer), the epoch loop, the fit loop and its callbacks."""
