"""Training: configuration, the training loop with EMA and checkpoints, metric plots."""
