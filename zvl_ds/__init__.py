"""zvl_ds: ZeroVL-style contrastive vision-language pre-training on DeepSpeed ZeRO and WebDataset.

The package is laid out by role (README's code map): ``config``, ``data``, ``model``, ``objective``, ``runtime``,
``evaluation``, ``export`` and ``bench``, with the entry points (``train``, ``make_shards``, ...) at the top.
"""
import importlib
import importlib.abc
import importlib.util
import sys

from zvl_ds.runtime.torchvision_shim import install_torchvision_shim

install_torchvision_shim()

__version__ = "0.1.0"

# ``zvl_ds.load_model`` / ``zvl_ds.ZvlModel`` are ``zvl_ds.export.model_folder``'s, resolved on first use: importing the
# package (every tool does) must not pay for torch, timm and transformers when it only needs the config.
_INFERENCE_NAMES = ("load_model", "ZvlModel")

# Modules that lived at these paths before the package was laid out by role. Scripts written against the old
# paths keep working: importing an old name returns the module at its new home (the same module object).
MOVED_MODULES = {
    "zvl_ds.atomic_write": "zvl_ds.runtime.atomic_write",
    "zvl_ds.checkpoint": "zvl_ds.runtime.checkpoint",
    "zvl_ds.cli": "zvl_ds.runtime.cli",
    "zvl_ds.dist": "zvl_ds.runtime.dist",
    "zvl_ds.engine": "zvl_ds.runtime.engine",
    "zvl_ds.errors": "zvl_ds.runtime.errors",
    "zvl_ds.logs": "zvl_ds.runtime.logs",
    "zvl_ds.monitor": "zvl_ds.runtime.monitor",
    "zvl_ds.optim": "zvl_ds.runtime.optim",
    "zvl_ds.schedule": "zvl_ds.runtime.schedule",
    "zvl_ds.records": "zvl_ds.runtime.records",
    "zvl_ds.profile_ranges": "zvl_ds.runtime.profile_ranges",
    "zvl_ds.package_paths": "zvl_ds.runtime.package_paths",
    "zvl_ds.dga": "zvl_ds.objective.step",
    "zvl_ds.loss": "zvl_ds.objective.softmax_loss",
    "zvl_ds.sigmoid_loss": "zvl_ds.objective.sigmoid_loss",
    "zvl_ds.dense_loss": "zvl_ds.objective.dense_reference",
    "zvl_ds.mixup": "zvl_ds.objective.mixup",
    "zvl_ds.exactness": "zvl_ds.objective.exactness",
    "zvl_ds.presets": "zvl_ds.model.presets",
    "zvl_ds.init_weights": "zvl_ds.model.init_weights",
    "zvl_ds.safe_load": "zvl_ds.model.safe_load",
    "zvl_ds.consolidate": "zvl_ds.export.consolidate",
    "zvl_ds.inference": "zvl_ds.export.model_folder",
    "zvl_ds.zero_shot": "zvl_ds.evaluation.zero_shot",
    "zvl_ds.retrieval": "zvl_ds.evaluation",
    "zvl_ds.retrieval.metrics": "zvl_ds.evaluation.metrics",
    "zvl_ds.retrieval.embed": "zvl_ds.evaluation.embed",
    "zvl_ds.retrieval.grid": "zvl_ds.evaluation.grid",
    "zvl_ds.retrieval.evaluation": "zvl_ds.evaluation.retrieval",
    "zvl_ds.data.annotations": "zvl_ds.data.writing.annotations",
    "zvl_ds.data.images": "zvl_ds.data.writing.images",
    "zvl_ds.data.shards": "zvl_ds.data.writing.shard_writer",
    "zvl_ds.data.demo": "zvl_ds.data.writing.demo",
}


class _MovedModuleLoader(importlib.abc.Loader):
    def __init__(self, new_name: str):
        self.new_name = new_name

    def create_module(self, spec):
        return importlib.import_module(self.new_name)

    def exec_module(self, module) -> None:
        """The module at its new home has run already."""


class _MovedModuleFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        new_name = MOVED_MODULES.get(fullname)
        return importlib.util.spec_from_loader(fullname, _MovedModuleLoader(new_name)) if new_name else None


# First in line: an old path inside an old package (zvl_ds.retrieval.metrics) would otherwise be found again through
# the new package's __path__ and run a second time, as a different module object.
if not any(isinstance(finder, _MovedModuleFinder) for finder in sys.meta_path):
    sys.meta_path.insert(0, _MovedModuleFinder())


def __getattr__(name: str):
    if name in _INFERENCE_NAMES:
        from zvl_ds.export import model_folder

        return getattr(model_folder, name)
    raise AttributeError(f"module 'zvl_ds' has no attribute {name!r}")
