"""Training: pure train/eval steps, epoch loops, and the reference (teacher) model."""
