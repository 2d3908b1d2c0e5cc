"""The one error exit path of every entry point: a `UserError` becomes ``error: <message>`` and exit code 2.

Entry points call ``sys.exit(run(main))``. A user error needs no traceback: its message says what and where.
Anything else is a bug or a machine fault and keeps its traceback (exit code 1, as Python itself would).

In a multi-rank job an error on one rank must end the whole job quickly: the other ranks are waiting in a
collective that will never complete. The failing rank prints its error and leaves at once with ``os._exit``:
no barrier, no process-group teardown (both wait for ranks that will not come), no interpreter cleanup that
could block on a gloo/NCCL destructor. Its sockets close with it, so the peers' collectives fail within
seconds, and both launchers (torchrun and the deepspeed launcher) stop every other worker as soon as one
exits non-zero.
"""
from __future__ import annotations

import errno
import os
import sys
import traceback
from typing import Callable, Optional

from zvl_ds.base.errors import USER_ERROR_EXIT_CODE, UserError

BUG_EXIT_CODE = 1

# A full disk or a read-only folder is the user's to fix (free space, another folder), not a bug in zvl_ds.
USER_FIXABLE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES})


def error_message(error: BaseException) -> Optional[str]:
    """The one-line message for an error the user can fix, or None for a bug (which keeps its traceback)."""
    if isinstance(error, UserError):
        return str(error)
    if isinstance(error, OSError) and error.errno in USER_FIXABLE_ERRNOS:
        where = f" ({error.filename})" if error.filename else ""
        return f"{error.strerror or error}{where}"
    return None


def _process_group() -> Optional[int]:
    """This rank when a multi-rank process group is up, else None."""
    torch_dist = sys.modules.get("torch.distributed")
    if torch_dist is None or not torch_dist.is_available() or not torch_dist.is_initialized():
        return None
    return torch_dist.get_rank() if torch_dist.get_world_size() > 1 else None


def _leave_now(code: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run(main: Callable[[], Optional[int]]) -> int:
    """Call ``main()``; turn a user error into ``error: <message>`` on stderr and exit code 2.

    In a multi-rank job, any error (user error or bug) ends this process at once; see the module docstring.
    """
    try:
        return int(main() or 0)
    except SystemExit:
        raise
    except BaseException as error:  # noqa: B902  (KeyboardInterrupt on one rank must end the job too)
        message = error_message(error)
        rank = _process_group()
        if message is None and rank is None:
            raise  # a bug in a single process: Python prints the traceback
        prefix = f"[rank {rank}] " if rank is not None else ""
        if message is None:
            sys.stderr.write(f"{prefix}" + "".join(traceback.format_exception(type(error), error,
                                                                             error.__traceback__)))
        else:
            sys.stderr.write(f"error: {prefix}{message}\n")
        code = USER_ERROR_EXIT_CODE if message is not None else BUG_EXIT_CODE
        if rank is not None:
            _leave_now(code)
        return code
