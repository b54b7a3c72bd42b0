"""The per-task gradient engine: Jacobians, Gramians, the multi-task ``backward``, the layer-wise
Gramian capture and mixed precision. It knows tasks only as a list of scalar losses and methods
only by the contract they implement; nothing here knows about optimizers, strategies or runs."""
