"""Training: config, loop, checkpoints (and the scale-out trainer)."""
