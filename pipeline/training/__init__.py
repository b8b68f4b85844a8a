"""Training: engine, losses, LR schedules, EMA, checkpointing, monitoring, plots and run folders."""
