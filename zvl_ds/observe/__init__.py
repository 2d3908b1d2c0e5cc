"""Watching a run: the console and TensorBoard (``monitor``), Weights & Biases (``wandb_sink``), logging set-up
(``logs``), the run's append-only records (``records``) and named profiler ranges (``profile_ranges``)."""
