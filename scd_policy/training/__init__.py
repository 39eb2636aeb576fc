"""Training: the optimisation loop, EMA, learning-rate schedule, checkpoints and DDP plumbing."""
