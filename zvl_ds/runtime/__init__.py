"""The training parts a run stands on: processes and gathers (``dist``), the DeepSpeed engine (``engine``), the
optimizer and its parameter groups (``optim``), the learning-rate schedule, model EMA, checkpoints, preemption
and the run lock. Nothing here imports the model, the objective or the trainer; importing this package loads
nothing heavy."""
