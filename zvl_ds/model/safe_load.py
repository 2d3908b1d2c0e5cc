"""Reading checkpoint files without running code from them.

``torch.load(weights_only=False)`` (what DeepSpeed's loader and its ``zero_to_fp32`` / ``ds_to_universal`` tools
use) unpickles arbitrary objects, so a crafted ``*.pt`` file runs code when it is opened. Every file those tools
will open is first read here with the weights-only unpickler, which accepts tensors, plain containers and the
few DeepSpeed data classes listed below, and nothing that can call a function. A user who trusts a checkpoint
(their own run, written by a newer DeepSpeed that pickles another class) skips the check explicitly.
"""
from __future__ import annotations

import glob
import importlib
import os
from typing import Any, List, Type

import torch

from zvl_ds.base.errors import UserError

# DeepSpeed's own plain data classes that appear in its checkpoint files (ZeRO stage, loss-scaler settings,
# fragment offsets). They carry values only; allowing them keeps the weights-only unpickler's guarantee that
# loading runs no code.
_DEEPSPEED_SAFE_GLOBALS = (("deepspeed.runtime.zero.config", "ZeroStageEnum"),
                           ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
                           ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
                           ("deepspeed.utils.tensor_fragment", "fragment_address"))


class UnsafeCheckpointError(UserError, RuntimeError):
    pass


def deepspeed_safe_globals() -> List[type]:
    found = []
    for module_name, name in _DEEPSPEED_SAFE_GLOBALS:
        try:
            found.append(getattr(importlib.import_module(module_name), name))
        except (ImportError, AttributeError):  # another DeepSpeed version: the class simply is not needed
            pass
    return found


def load_weights_only(path: str, error_type: Type[Exception] = UnsafeCheckpointError, opt_out: str = "") -> Any:
    """``torch.load`` that refuses anything but tensors, plain containers and DeepSpeed's data classes above.
    ``mmap`` keeps this cheap: tensor data is not read. ``opt_out`` names the user's switch in the message."""
    try:
        with torch.serialization.safe_globals(deepspeed_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # pickled code, an unknown class, or not a torch file
        hint = (f" If this checkpoint is yours (e.g. a newer DeepSpeed pickles another class), {opt_out} to skip "
                "this check." if opt_out else "")
        raise error_type(f"{path} cannot be read as a weights-only checkpoint file, so it is not opened ({error})."
                         f"{hint}") from error


def checkpoint_files(folder: str) -> List[str]:
    """Every torch file under a checkpoint folder (its sub-folders too: the universal format nests them)."""
    return sorted(glob.glob(os.path.join(glob.escape(folder), "**", "*.pt"), recursive=True))


def check_checkpoint_folder(folder: str, error_type: Type[Exception] = UnsafeCheckpointError,
                            opt_out: str = "") -> None:
    """Refuse the folder if any of its torch files holds more than weights (see ``load_weights_only``)."""
    for path in checkpoint_files(folder):
        load_weights_only(path, error_type, opt_out)
