"""Make PyPI's CUDA-built torchvision importable next to a CPU-only torch.

timm and transformers import torchvision at import time. The PyPI torchvision wheel links
CUDA libraries; next to a CPU torch its C extension fails to load and torchvision's fake-op
registrations for ``torchvision::nms``/``qnms`` raise, so ``import timm`` dies. Declaring those two
op schemas ourselves lets torchvision (transforms, models) import. The C++ ops themselves
(nms, roi_align, torchvision.io) stay unavailable; zvl_ds decodes images with Pillow.

Where torchvision's own extension loads (a matching GPU build), this does nothing.
"""
from __future__ import annotations

import glob
import importlib.util
import os

_LIBRARY = None  # keeps the op library alive; also marks the shim as applied
_CHECKED = False


def install_torchvision_shim() -> bool:
    """Apply the shim once. Returns True when the schemas were declared, False when not needed."""
    global _LIBRARY, _CHECKED
    if _CHECKED:
        return _LIBRARY is not None
    _CHECKED = True
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return False
    import torch

    package_dir = list(spec.submodule_search_locations)[0]
    extensions = glob.glob(os.path.join(package_dir, "_C*.so")) + glob.glob(os.path.join(package_dir, "_C*.pyd"))
    if extensions:
        try:
            torch.ops.load_library(extensions[0])
            return False  # torchvision's own ops load: nothing to fix
        except (OSError, RuntimeError):
            pass
    _LIBRARY = torch.library.Library("torchvision", "DEF")
    _LIBRARY.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIBRARY.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    return True
