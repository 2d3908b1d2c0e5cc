"""Shared test helpers: real multi-process runs (dist_utils), tiny shards (data_fixtures), the dense reference
loss (loss_reference) and the repository's location (paths)."""
