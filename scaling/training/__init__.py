"""Training infrastructure used by the recipes: accelerator, optimizer, checkpoints, tracking, memory."""
