"""Training with Accelerate: the arguments of a run, the resumable training loop, SyncBatchNorm on CPUs."""
