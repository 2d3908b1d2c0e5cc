"""The verify_exactness tool's report: PASS within the tolerance, FAIL and a marked group beyond it."""
from zvl_ds import verify_exactness
from zvl_ds.objective.exactness import GroupDifference


def test_verify_report_fails_beyond_tolerance(capsys):
    assert verify_exactness.report([GroupDifference("text tower", 1e-7, 1.0)], 1e-4) is True
    assert verify_exactness.report([GroupDifference("text tower", 1e-3, 1.0)], 1e-4) is False
    assert "exceeds tolerance" in capsys.readouterr().out
