"""`python -m zvl_ds.bench gpu-report --smoke`: every stage of the GPU report, run as on a GPU but on the CPU with
tiny towers, so that a GPU loan cannot be lost to a typo; then README's table from its report."""
import json
import math
import os
import shutil
import subprocess
import sys

from tests.helpers.paths import REPO_ROOT
from tests.helpers.processes import child_env
from zvl_ds.bench.gpu_report import SMOKE, STAGE_NAMES


def test_gpu_report_smoke_runs_every_stage(tmp_path):
    out = tmp_path / "report"
    done = subprocess.run([sys.executable, "-m", "zvl_ds.bench", "gpu-report", "--smoke", "--out", str(out)],
                          capture_output=True, text=True, timeout=1500, env=child_env())
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    report = json.loads((out / "report.json").read_text())
    assert report["smoke"] and report["order"] == STAGE_NAMES and report["torch"] and report["commit"]
    records = report["stages"]
    for name in STAGE_NAMES:  # each stage's own file, written when it ended
        assert json.loads((out / f"{name}.json").read_text()) == records[name]
        assert records[name]["status"] == "ok", records[name]["error_tail"]
    results = {name: records[name]["result"] for name in STAGE_NAMES}

    dga = results["dga"]
    assert dga["chunk"] in SMOKE.chunks and dga["chunk_choice"]["chunk"] == dga["chunk"]
    assert dga["global_batch"] == SMOKE.global_batch and dga["compile"] == "none"
    for name, cols in (("rows", 0), ("tiled", SMOKE.tile_cols)):
        variant = dga["variants"][name]
        assert variant["loss_chunk_cols"] == cols and variant["samples_per_sec"] > 0
        assert math.isfinite(variant["loss"]) and 0 <= variant["i2t_acc"] <= 1 and variant["peak_memory_bytes"] > 0
    compiled = results["dga_compiled"]
    assert compiled["compile"] == "default" and compiled["chunk"] == dga["chunk"] and compiled["chunk_choice"] is None

    split = results["profile"]["ms_per_step"]
    for part in ("pass1", "loss", "pass2", "optimizer", "host_to_device", "deepspeed", "host_other"):
        assert split[part] >= 0
    assert split["pass2"] > 0 and results["profile"]["chunk"] == dga["chunk"]

    openclip = results["openclip"]
    assert openclip["samples_per_sec"] > 0 and openclip["steps_logged"] == SMOKE.openclip_steps
    assert openclip["accum_freq"] == SMOKE.global_batch // dga["chunk"]
    assert openclip["ratio_zvl_ds_to_openclip"] == dga["samples_per_sec"] / openclip["samples_per_sec"]

    big = results["big_step"]
    assert big["global_batch"] == SMOKE.big_batch and big["applied"] and math.isfinite(big["loss"])
    assert 0 <= big["i2t_acc"] <= 1 and 0 <= big["t2i_acc"] <= 1 and big["host_peak_rss_bytes"] > big["input_bytes"]

    verify = results["verify_exactness"]
    assert verify["passed"] and verify["exit_code"] == 0 and verify["global_batch"] == SMOKE.verify_batch
    assert {"image tower", "text tower", "image projection", "text projection"} <= set(verify["groups"])

    table = subprocess.run([sys.executable, "-m", "zvl_ds.bench", "gpu-table", str(out)], capture_output=True,
                           text=True, timeout=300, env=child_env())
    assert table.returncode == 0, table.stderr[-2000:]
    assert f"commit `{report['commit']}`" in table.stdout and "PASS at batch" in table.stdout
    checkout = tmp_path / "checkout"  # a copy of the repository root's README, which a smoke report must not reach
    (checkout / "docs").mkdir(parents=True)
    shutil.copy(os.path.join(REPO_ROOT, "README.md"), checkout / "README.md")
    refused = subprocess.run([sys.executable, "-m", "zvl_ds.bench", "gpu-table", str(out), "--write"],
                             capture_output=True, text=True, timeout=300, env=child_env(), cwd=checkout)
    assert refused.returncode == 2 and "smoke" in refused.stderr
    assert not (checkout / "docs" / "gpu-report.json").exists()
    with open(os.path.join(REPO_ROOT, "README.md"), encoding="utf-8") as handle:
        assert (checkout / "README.md").read_text() == handle.read()
