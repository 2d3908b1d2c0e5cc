"""The input side: shards -> per-rank batches (see ``train_stream.py`` and ``valid_stream.py``), with sampling,
sources and transforms."""
from zvl_ds.data.sources import DataSourceError
from zvl_ds.data.train_stream import TeacherInputs, TrainBatch, TrainLoader, build_train_loader
from zvl_ds.data.transforms import load_tokenizer, normalize_images, tokenize
from zvl_ds.data.valid_stream import ValidBatch, ValidLoader, build_valid_loader

__all__ = ["DataSourceError", "TeacherInputs", "TrainBatch", "TrainLoader", "ValidBatch", "ValidLoader",
           "build_train_loader", "build_valid_loader", "load_tokenizer", "normalize_images", "tokenize"]
