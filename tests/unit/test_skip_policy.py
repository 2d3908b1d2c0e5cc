"""The skip policy: how many skipped steps in a row abort a run, and what the message says."""
import pytest

from zvl_ds.objective.skip import SkipPolicy, TrainingAborted
from zvl_ds.objective.step import StepResult


def test_skip_policy_aborts_after_too_many_in_a_row():
    policy = SkipPolicy(max_in_a_row=3)
    skipped = StepResult(applied=False, loss=float("nan"), i2t_acc=0, t2i_acc=0, temperature=0.07,
                         skip_reason="non-finite loss")
    good = StepResult(applied=True, loss=1.0, i2t_acc=0, t2i_acc=0, temperature=0.07)
    policy.record(skipped, 1, None)
    policy.record(skipped, 2, None)
    policy.record(good, 3, None)  # the run recovered: the count in a row restarts
    policy.record(skipped, 4, None)
    policy.record(skipped, 5, None)
    with pytest.raises(TrainingAborted, match="3 consecutive steps skipped up to step 6.*out/run/step_00000004"):
        policy.record(skipped, 6, "out/run/step_00000004")
    assert policy.total == 5
