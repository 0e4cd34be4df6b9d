"""The training engine: loop, optimiser, schedules, distributed set-up and checkpoints."""
