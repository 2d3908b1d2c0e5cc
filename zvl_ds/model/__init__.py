"""The dual encoder (``dual_encoder``), its presets, and loading and checking saved weights (``init_weights``,
``safe_load``).

``from zvl_ds.model import build_model`` (the module's old form) still works; the names resolve on first use so that
the config, which reads the presets, does not import torch, timm and transformers.
"""
_DUAL_ENCODER = "zvl_ds.model.dual_encoder"
_SUBMODULES = ("dual_encoder", "presets", "init_weights", "safe_load", "weights_files", "sources", "hf_clip",
               "open_clip_towers", "tiny_checkpoints")


def __getattr__(name: str):
    import importlib

    if name in _SUBMODULES or name.startswith("__"):  # ``from zvl_ds.model import presets`` must stay light
        raise AttributeError(f"module 'zvl_ds.model' has no attribute {name!r}")

    module = importlib.import_module(_DUAL_ENCODER)
    try:
        return getattr(module, name)
    except AttributeError:
        raise AttributeError(f"module 'zvl_ds.model' has no attribute {name!r}") from None
