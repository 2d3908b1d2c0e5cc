"""The benchmarks' one fresh-process helper: a result comes back as JSON, a failure as the child's stderr."""
import os

import pytest

from zvl_ds.bench.fresh_process import call_in_fresh_process

pytestmark = pytest.mark.slow  # each test starts an interpreter that imports torch


def test_result_and_environment_reach_the_caller():
    result, error = call_in_fresh_process("os:getenv", {"key": "ZVL_FRESH_PROCESS_PROBE"}, timeout_s=120,
                                          env={"ZVL_FRESH_PROCESS_PROBE": "from the parent"})
    assert (result, error) == ("from the parent", None)
    assert "ZVL_FRESH_PROCESS_PROBE" not in os.environ  # only the child's environment was extended


def test_a_raising_child_returns_its_error_text():
    result, error = call_in_fresh_process("json:loads", {"s": "{not json"}, timeout_s=120)
    assert result is None
    assert "JSONDecodeError" in error


def test_the_child_is_a_different_process():
    child_pid, error = call_in_fresh_process("os:getpid", {}, timeout_s=120)
    assert error is None and child_pid != os.getpid()
