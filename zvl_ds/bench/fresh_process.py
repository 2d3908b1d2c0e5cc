"""Running one measurement in a fresh Python interpreter, so that its memory peak is its own.

A peak measured in the benchmark's own process would include every earlier case's allocator cache (and an
out-of-memory failure could leave it unusable). ``call_in_fresh_process("pkg.module:function", kwargs)`` starts
``python -m zvl_ds.bench.fresh_process``, which imports the function, calls it with the JSON keyword arguments and
prints its JSON result on a line of its own; the caller gets that result, or the end of the child's stderr.
``single_rank_env()`` gives such a child the variables of a one-rank process group, for measurements that build a
DeepSpeed engine.
"""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from typing import Dict, Mapping, Optional, Sequence, Tuple

from zvl_ds.runtime.dist import free_port

_RESULT_PREFIX = "RESULT "
_STDERR_TAIL = 3000  # characters of a failed child's stderr handed back


def call_in_fresh_process(function: str, kwargs: Mapping[str, object], timeout_s: float,
                          env: Optional[Mapping[str, str]] = None) -> Tuple[Optional[Dict], Optional[str]]:
    """(the function's JSON result, None), or (None, the end of the child's stderr) when it failed.

    ``env`` entries are added to this process's environment. Raises ``subprocess.TimeoutExpired`` after
    ``timeout_s`` (the child is killed)."""
    done = subprocess.run([sys.executable, "-m", __name__, function, json.dumps(dict(kwargs))],
                          capture_output=True, text=True, timeout=timeout_s, env={**os.environ, **(env or {})})
    lines = [line for line in done.stdout.splitlines() if line.startswith(_RESULT_PREFIX)]
    if done.returncode != 0 or not lines:
        return None, done.stderr[-_STDERR_TAIL:] or f"exit status {done.returncode}, no result"
    return json.loads(lines[-1][len(_RESULT_PREFIX):]), None


def single_rank_env() -> Dict[str, str]:
    """The variables of a process group of one rank on this machine, at a free port: what a measurement that
    builds a DeepSpeed engine in a fresh process needs."""
    return {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(free_port())}


def _child(argv: Sequence[str]) -> int:
    module_name, _, function_name = argv[0].partition(":")
    function = getattr(importlib.import_module(module_name), function_name)
    result = function(**json.loads(argv[1]))
    print(_RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
