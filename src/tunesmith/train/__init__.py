"""Training: the SFT loop, checkpoints and tracking."""
