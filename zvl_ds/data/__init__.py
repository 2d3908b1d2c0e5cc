"""The input side: shards -> per-rank batches (see ``stream.py``), with sampling, sources and transforms."""
from zvl_ds.data.sources import DataSourceError
from zvl_ds.data.stream import (TrainBatch, TrainLoader, ValidBatch, ValidLoader, build_train_loader,
                                build_valid_loader)
from zvl_ds.data.transforms import load_tokenizer, normalize_images, tokenize

__all__ = ["DataSourceError", "TrainBatch", "TrainLoader", "ValidBatch", "ValidLoader", "build_train_loader",
           "build_valid_loader", "load_tokenizer", "normalize_images", "tokenize"]
