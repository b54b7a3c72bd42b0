"""Training: the step driver, update strategies, task groups, the Trainer, checkpoints, logs,
diagnostics and the non-finite policy."""
