"""Shared test helpers: real multi-process runs (dist_utils), tiny shards (data_fixtures) and the repository's
location (paths). The dense reference losses live in the library (zvl_ds.objective.dense_reference): the tools use them too."""
