"""Training: batches, the loop, checkpoints, devices and distributed set-up."""
