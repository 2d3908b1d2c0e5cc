"""The old import path of the loaders, kept for user scripts: it re-exports the public names of their new modules.

The code now lives in ``train_stream.py`` (the training loader), ``valid_stream.py`` (the validation loader),
``pieces.py`` (reading pieces through the shuffle buffer) and ``decode.py`` (sample decoding in the workers).
"""
from zvl_ds.data.pieces import SourceStream, buffer_shuffle, read_piece
from zvl_ds.data.train_stream import STATE_FORMAT, TrainBatch, TrainLoader, build_train_loader
from zvl_ds.data.valid_stream import ValidBatch, ValidLoader, build_valid_loader, dataset_has_json_image_ids

__all__ = ["STATE_FORMAT", "SourceStream", "TrainBatch", "TrainLoader", "ValidBatch", "ValidLoader",
           "buffer_shuffle", "build_train_loader", "build_valid_loader", "dataset_has_json_image_ids", "read_piece"]
