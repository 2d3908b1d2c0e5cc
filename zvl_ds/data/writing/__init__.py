"""The writing side of the data: annotation CSVs and image folders -> WebDataset shards (``annotations``,
``images``, ``shard_writer``), and the procedural demo datasets (``demo``)."""
