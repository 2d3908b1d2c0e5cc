"""The one path for messages: the standard ``logging`` module under the ``zvl_ds`` logger.

Every module logs with ``logging.getLogger(__name__)``; entry points call `setup_logging` once. Progress goes to
stdout and problems (warnings and worse) to stderr, so a user can pipe the one and watch the other. In a
multi-rank job only rank 0 reports progress (every rank would print the same line), while every rank reports
its problems, prefixed with its rank so a failing rank can be told apart. Python warnings are routed through the
same handlers, and the third-party ones that say nothing a user can act on are filtered here, in one place.
"""
from __future__ import annotations

import logging
import sys
import warnings

ROOT = "zvl_ds"

# (category, message regex, module regex) of third-party warnings that carry no action for our users
_QUIET_WARNINGS = (
    (FutureWarning, r".*", r"(timm|transformers|deepspeed)(\.|$)"),
    (DeprecationWarning, r".*", r"(timm|transformers|deepspeed|webdataset|torch)(\.|$)"),
    (UserWarning, r".*TypedStorage is deprecated.*", r".*"),
)


class _BelowWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.WARNING


def setup_logging(rank: int = 0, world_size: int = 1, level: int = logging.INFO,
                  stream_out=None, stream_err=None) -> logging.Logger:
    """Configure the ``zvl_ds`` logger for this process; safe to call again (it replaces its own handlers)."""
    logger = logging.getLogger(ROOT)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    prefix = f"[zvl_ds rank {rank}]" if world_size > 1 else "[zvl_ds]"
    progress = logging.StreamHandler(stream_out or sys.stdout)
    progress.addFilter(_BelowWarning())
    progress.setFormatter(logging.Formatter("%(message)s"))
    progress.setLevel(level if rank == 0 else logging.WARNING)
    problems = logging.StreamHandler(stream_err or sys.stderr)
    problems.setLevel(logging.WARNING)
    problems.setFormatter(logging.Formatter(f"{prefix} %(levelname)s: %(message)s"))
    logger.addHandler(progress)
    logger.addHandler(problems)
    logger.setLevel(min(level, logging.WARNING))
    logger.propagate = False
    quiet_third_party_warnings()
    return logger


def quiet_third_party_warnings() -> None:
    for category, message, module in _QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)

