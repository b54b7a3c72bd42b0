"""Data parallelism: the DDP reducer of Jacobians and Gramians, and sharding of batches and
loaders across processes."""
