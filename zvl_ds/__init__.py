"""zvl_ds: ZeroVL-style contrastive vision-language pre-training on DeepSpeed ZeRO and WebDataset.

The package is laid out by role (docs/architecture.md): ``base``, ``config``, ``observe``, ``runtime``, ``data``,
``model``, ``objective``, ``evaluation``, ``export`` and ``bench``, with the entry points (``train``,
``make_shards``, ...) at the top.
"""
from zvl_ds.base.torchvision_shim import install_torchvision_shim

install_torchvision_shim()

__version__ = "0.1.0"

# ``zvl_ds.load_model`` / ``zvl_ds.ZvlModel`` are ``zvl_ds.model.inference``'s, resolved on first use: importing the
# package (every tool does) must not pay for torch, timm and transformers when it only needs the config.
_INFERENCE_NAMES = ("load_model", "ZvlModel")


def __getattr__(name: str):
    if name in _INFERENCE_NAMES:
        from zvl_ds.model import inference

        return getattr(inference, name)
    raise AttributeError(f"module 'zvl_ds' has no attribute {name!r}")
