"""The trainer's parts, one job each: checkpoints, workdir, interrupts, progress, evaluation."""
