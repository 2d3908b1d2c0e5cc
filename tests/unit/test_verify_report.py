"""The verify_exactness tool's report: PASS within the tolerance, FAIL and a marked group beyond it."""
import importlib.util
import os

from tests.helpers.paths import REPO_ROOT
from zvl_ds.exactness import GroupDifference


def test_verify_report_fails_beyond_tolerance(capsys):
    # the tool is a script, not a package module: load it from its file
    spec = importlib.util.spec_from_file_location("verify_exactness",
                                                  os.path.join(REPO_ROOT, "tools", "verify_exactness.py"))
    verify_exactness = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(verify_exactness)
    assert verify_exactness.report([GroupDifference("text tower", 1e-7, 1.0)], 1e-4) is True
    assert verify_exactness.report([GroupDifference("text tower", 1e-3, 1.0)], 1e-4) is False
    assert "exceeds tolerance" in capsys.readouterr().out
