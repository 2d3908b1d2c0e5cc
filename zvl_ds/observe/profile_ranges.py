"""Named ``torch.profiler`` ranges that cost nothing when no profiler is recording.

``torch.profiler.record_function`` enters a dispatcher op even when nothing records; a step of many chunks
opens a few ranges per chunk, so the range is only opened while a profiler is active.
"""
from __future__ import annotations

import contextlib

import torch
from torch.autograd import profiler as _autograd_profiler

_NOTHING = contextlib.nullcontext()


def profile_range(name: str):
    """``record_function(name)`` while a profiler records; a shared no-op context otherwise."""
    if _autograd_profiler._is_profiler_enabled:  # a module flag torch sets while any profiler records
        return torch.profiler.record_function(name)
    return _NOTHING
