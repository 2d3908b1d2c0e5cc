"""zvl_ds: ZeroVL-style contrastive vision-language pre-training on DeepSpeed ZeRO and WebDataset."""
from zvl_ds._compat import install_torchvision_shim

install_torchvision_shim()

__version__ = "0.1.0"

# ``zvl_ds.load_model`` / ``zvl_ds.ZvlModel`` are ``zvl_ds.inference``'s, resolved on first use: importing the
# package (every tool does) must not pay for torch, timm and transformers when it only needs the config.
_INFERENCE_NAMES = ("load_model", "ZvlModel")


def __getattr__(name: str):
    if name in _INFERENCE_NAMES:
        from zvl_ds import inference

        return getattr(inference, name)
    raise AttributeError(f"module 'zvl_ds' has no attribute {name!r}")
