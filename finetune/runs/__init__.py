"""What a run leaves on disk and who may touch it: run records and plots, complete-or-absent checkpoints with
manifests, finding a run's weights, and the lock and ownership rules for output directories."""
