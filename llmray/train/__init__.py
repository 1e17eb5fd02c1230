"""Training: DeepSpeed settings and engines, completion-marker checkpoints, the Ray Train loop, pretrain and SFT."""
