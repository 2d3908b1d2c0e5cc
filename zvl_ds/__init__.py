"""zvl_ds: ZeroVL-style contrastive vision-language pre-training on DeepSpeed ZeRO and WebDataset."""
from zvl_ds._compat import install_torchvision_shim

install_torchvision_shim()

__version__ = "0.1.0"


def load_model(model_dir):
    """Load an exported model folder (see ``tools/export.py``); DeepSpeed is not needed."""
    from zvl_ds.export import load_model as _load_model

    return _load_model(model_dir)
