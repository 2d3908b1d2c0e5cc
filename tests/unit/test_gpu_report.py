"""gpu-report's parts: the chunk prediction, the input fill, the stage runner under planted faults, OpenCLIP's
towers and log, README's generated GPU table, and the wheel list for a bare GPU machine."""
import importlib
import importlib.util
import json
import os
import shutil
import subprocess
from dataclasses import replace

import pytest
import torch

from tests.helpers.paths import REPO_ROOT
from zvl_ds.bench import gpu_table
from zvl_ds.bench.gpu_report import GPU, MIN_STAGE_SECONDS, SMOKE, STAGE_NAMES, STAGES, Stage, run_report
from zvl_ds.bench.gpu_report_programs import parse_verify_output
from zvl_ds.bench.gpu_report_step import fill_random_images, predict_largest_chunk
from zvl_ds.bench.openclip_train import openclip_model_config, samples_per_second, step_rates
from zvl_ds.config import load_config
from zvl_ds.base.errors import UserError

GIB = 2 ** 30


def test_the_largest_chunk_is_read_off_the_line_through_two_probes():
    # 6 GiB fixed + 1/16 GiB per sample: 85% of 80 GiB allows (68 - 6) * 16 = 992 samples, of 141 GiB 1821
    probes = {64: 10 * GIB, 128: 14 * GIB}
    h100 = predict_largest_chunk(probes, GPU.chunks, 16384, 80 * GIB)
    assert h100["chunk"] == 512 and h100["bytes_per_sample"] == GIB / 16 and h100["fixed_bytes"] == 6 * GIB
    assert predict_largest_chunk(probes, GPU.chunks, 16384, 141 * GIB)["chunk"] == 1024
    assert predict_largest_chunk(probes, GPU.chunks, 16384, 8 * GIB)["chunk"] == 128  # none fits: the smallest
    assert predict_largest_chunk(probes, (96, 256), 16384, 141 * GIB)["chunk"] == 256  # 96 does not divide 16384
    with pytest.raises(ValueError, match="divides"):
        predict_largest_chunk(probes, (3, 5), 16384, 141 * GIB)


def test_random_images_are_noise_and_no_two_are_equal():
    images = torch.zeros((9000, 3, 4, 4), dtype=torch.uint8)  # more than two copy groups, the last one partial
    fill_random_images(images, seed=3, block_bytes=1 << 20)
    rows = images.view(9000, -1)
    assert len({bytes(row.tolist()) for row in rows}) == 9000
    assert rows.float().mean().item() == pytest.approx(127.5, abs=2) and rows.min() == 0 and rows.max() == 255
    again = torch.zeros_like(images)
    fill_random_images(again, seed=3, block_bytes=1 << 20)
    assert torch.equal(images, again)


# Only a late stage waits out its budget (the others end when their interpreters do), so its budget, and the
# shortest budget a stage needs to start, are the least the runner allows (a fresh process gets at least 1 s)
LATE_BUDGET_S = 1.0
MIN_STAGE_S = 0.5


@pytest.mark.slow  # five fresh interpreters (one per stage): about 10 s, too much for the fast subset
def test_a_failing_or_late_stage_is_recorded_and_the_next_one_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [REPO_ROOT, os.environ.get("PYTHONPATH")])))
    helpers = "tests.helpers.planted_stages"
    stages = [
        Stage("raises", f"{helpers}:raises", lambda s, r, o, b: {"message": "planted failure", "chunk": 8}, "raises"),
        Stage("late", f"{helpers}:sleeps", lambda s, r, o, b: {"seconds": 600}, "sleeps past its budget"),
        Stage("oom", f"{helpers}:out_of_memory_above", lambda s, r, o, b: {"chunk": 8, "limit": 2}, "halves"),
        Stage("after", f"{helpers}:returns", lambda s, r, o, b: {"value": r["oom"]["result"]["chunk"]}, "runs"),
        Stage("no_time", f"{helpers}:returns", lambda s, r, o, b: {"value": 1}, "never starts"),
    ]
    # each stage its own budget; the last stage of a run gets what is left of it
    sizes = replace(SMOKE, budgets={"raises": 60, "late": LATE_BUDGET_S, "oom": 120, "after": 60},
                    total_seconds=10_000)
    report = run_report(str(tmp_path), sizes, smoke=True, log=lambda line: None, stages=stages[:4],
                        min_stage_seconds=MIN_STAGE_S)
    records = report["stages"]
    assert [records[name]["status"] for name in ("raises", "late", "oom", "after")] == ["failed", "timeout", "ok", "ok"]
    # a failure that is not out of memory is not run again at a smaller chunk
    assert "planted failure" in records["raises"]["error_tail"] and len(records["raises"]["attempts"]) == 1
    assert "budget" in records["late"]["error_tail"] and LATE_BUDGET_S <= records["late"]["seconds"] < 60
    assert [a["kwargs"]["chunk"] for a in records["oom"]["attempts"]] == [8, 4]  # 8 and 4 ran out, 2 fitted
    assert records["oom"]["result"] == {"chunk": 2} and records["after"]["result"] == {"value": 2}
    for name in ("raises", "late", "oom", "after"):  # each stage's file, and the report, as written
        assert json.loads((tmp_path / f"{name}.json").read_text())["status"] == records[name]["status"]
    assert json.loads((tmp_path / "report.json").read_text())["stages"].keys() == records.keys()

    # too little left after the first stage, whatever the machine's speed: it uses its whole budget (it sleeps
    # past it), which leaves less than the shortest budget a stage needs to start
    short = replace(SMOKE, budgets={"late": LATE_BUDGET_S}, total_seconds=LATE_BUDGET_S + MIN_STAGE_S / 2)
    report = run_report(str(tmp_path / "short"), short, smoke=True, log=lambda line: None,
                        stages=[stages[1], stages[4]], min_stage_seconds=MIN_STAGE_S)
    assert report["stages"]["late"]["status"] == "timeout"
    assert report["stages"]["no_time"]["status"] == "skipped"

    # the report's own shortest budget: a run with less than that in all starts nothing
    none_left = replace(SMOKE, total_seconds=MIN_STAGE_SECONDS - 1)
    report = run_report(str(tmp_path / "none_left"), none_left, smoke=True, log=lambda line: None, stages=stages[:1])
    assert report["stages"]["raises"]["status"] == "skipped" and report["stages"]["raises"]["attempts"] == []


def test_the_stage_order_puts_the_costly_compile_last():
    assert STAGE_NAMES == ["dga", "profile", "openclip", "big_step", "verify_exactness", "dga_compiled"]
    assert set(GPU.budgets) == set(STAGE_NAMES) == set(SMOKE.budgets)
    assert sum(GPU.budgets[name] for name in STAGE_NAMES[:-1]) < GPU.total_seconds <= 540
    for stage in STAGES:  # what a fresh process imports and calls
        module, _, function = stage.function.partition(":")
        assert callable(getattr(importlib.import_module(module), function)), stage.function


def test_verify_exactness_table_is_parsed():
    # the lines verify_exactness.report prints
    out = ("parameter group       max |update - ref grad|   max |ref grad|   relative\n"
           "image tower                         1.000e-07        2.000e-02   5.00e-06\n"
           "temperature                         0.000e+00        1.000e-01   0.00e+00\n"
           "PASS: tolerance 1e-04\n")
    parsed = parse_verify_output(out)
    assert parsed["passed"] and parsed["tolerance"] == 1e-4
    assert parsed["groups"]["image tower"] == {"max_abs_diff": 1e-7, "reference_max": 2e-2, "relative": 5e-6}
    assert not parse_verify_output(out.replace("PASS", "FAIL"))["passed"]


def test_openclip_log_lines_give_samples_per_second():
    # open_clip_train's step line (open_clip_train/train.py), as it printed it in a CPU run
    line = ("2026-12-02,16:56:25 | INFO | Train Epoch: 0 [32/96 (33%)] Data (t): 1.084 Batch (t): 9.274, "
            "3.45038/s, 3.45038/s/gpu LR: 0.000100 Logit Scale: 14.286 Contrastive_loss: 3.5331 (3.5331)")
    log = "\n".join([line, line.replace("3.45038/s,", "2.0/s,"), line.replace("3.45038/s,", "4.0/s,")])
    assert step_rates(log) == [3.45038, 2.0, 4.0]
    assert samples_per_second(step_rates(log)) == 3.0  # the median after the first (warm-up) step
    assert samples_per_second([5.0]) == 5.0
    with pytest.raises(ValueError, match="no training step"):
        samples_per_second(step_rates("Start epoch 0\n"))


def test_openclip_gets_the_papers_towers():
    cfg = load_config(None, list(GPU.towers))
    model_cfg = openclip_model_config(cfg, "/text")
    assert model_cfg["embed_dim"] == 512
    assert model_cfg["vision_cfg"] == {"timm_model_name": "vit_base_patch16_224.augreg_in21k",
                                       "timm_model_pretrained": False, "timm_pool": "token", "timm_proj": "linear",
                                       "timm_proj_bias": False, "image_size": 224}
    assert model_cfg["text_cfg"]["context_length"] == 25
    assert model_cfg["text_cfg"]["hf_pooler_type"] == "cls_last_hidden_state_pooler"
    with pytest.raises(ValueError, match="kwargs"):
        openclip_model_config(load_config(None, ["model.arch=tiny"]), "/text")


def test_openclip_builds_the_same_towers_as_zvl_ds(tmp_path):
    pytest.importorskip("open_clip")
    import open_clip

    from zvl_ds.bench.openclip_train import write_model_folder
    from zvl_ds.model.build import build_model

    cfg = load_config(None, list(SMOKE.towers))
    name = write_model_folder(cfg, str(tmp_path / "model"))
    theirs = open_clip.create_model(name)
    ours = build_model(cfg.model, cfg.loss)

    def shapes(module):
        return sorted(tuple(p.shape) for p in module.parameters())

    assert shapes(theirs.visual.trunk) == shapes(ours.image_tower)
    assert shapes(theirs.text.transformer) == shapes(ours.text_tower)
    assert theirs.visual.head.proj.weight.shape == ours.image_projection.weight.shape
    assert theirs.text.proj.weight.shape == ours.text_projection.weight.shape
    tokens = open_clip.get_tokenizer(name)(["a red circle"])
    assert tokens.shape == (1, cfg.model.max_length)


def test_readme_gpu_table_is_the_one_the_committed_report_gives():
    with open(os.path.join(REPO_ROOT, "README.md"), encoding="utf-8") as handle:
        block = gpu_table.readme_block(handle.read())
    assert block == gpu_table.render_table(gpu_table.committed_report(REPO_ROOT)), (
        "README's GPU table is stale: run `python -m zvl_ds.bench gpu-table --write` in the repository root")
    if gpu_table.committed_report(REPO_ROOT) is None:  # no GPU run yet: no figure at all
        for line in block.splitlines()[4:]:
            assert line.endswith("| not measured |"), line


def _report(status="ok"):
    """A report as gpu-report writes it, with round figures."""
    dga = {"chunk": 1024, "variants": {
        "rows": {"samples_per_sec": 3000.0, "mfu_useful": 0.35, "mfu_hardware": 0.4667, "peak_memory_bytes": 70 * GIB},
        "tiled": {"samples_per_sec": 3100.0, "mfu_useful": 0.36, "mfu_hardware": 0.48, "peak_memory_bytes": 69 * GIB}}}
    stages = {
        "dga": {"status": status, "result": dga if status == "ok" else None},
        "openclip": {"status": "ok", "result": {"samples_per_sec": 2000.0, "accum_freq": 16, "precision": "amp_bf16",
                                                 "ratio_zvl_ds_to_openclip": 1.55}},
        "big_step": {"status": "timeout", "result": None},
    }
    return {"smoke": False, "gpu": "NVIDIA H200", "cpu": "x86_64, 16 CPUs", "torch": "2.9.1+cu128", "cuda": "12.8",
            "commit": "abc123def456", "started": "2027-01-01T00:00:00+00:00", "stages": stages}


def test_the_table_names_machine_torch_commit_and_each_stage_outcome():
    table = gpu_table.render_table(_report())
    assert "NVIDIA H200" in table and "torch 2.9.1+cu128" in table and "`abc123def456`" in table
    assert "3,000 samples/s, MFU 35.0% useful / 46.7% with the recompute, peak 70.0 GiB" in table
    assert "2,000 samples/s (`--accum-freq 16`, amp_bf16); zvl_ds / OpenCLIP = 1.55x" in table
    assert "not measured (stage `big_step`: timeout)" in table
    assert "| where one step's time goes | not measured |" in table  # a stage the report does not hold
    assert "not measured (stage `dga`: failed)" in gpu_table.render_table(_report("failed"))


def test_gpu_table_write_stores_the_report_and_rewrites_readme(tmp_path):
    (tmp_path / "docs").mkdir()
    shutil.copy(os.path.join(REPO_ROOT, "README.md"), tmp_path / "README.md")
    run = tmp_path / "gpu_report"
    run.mkdir()
    (run / "report.json").write_text(json.dumps(_report()))
    block = gpu_table.write_table(str(tmp_path), str(run))
    assert json.loads((tmp_path / "docs" / "gpu-report.json").read_text()) == _report()
    assert gpu_table.readme_block((tmp_path / "README.md").read_text()) == block and "NVIDIA H200" in block
    (run / "report.json").write_text(json.dumps({**_report(), "smoke": True}))
    with pytest.raises(UserError, match="smoke"):
        gpu_table.write_table(str(tmp_path), str(run))


def _pin_environment():
    """tools/pin_environment.py, which writes both lock files, as a module."""
    spec = importlib.util.spec_from_file_location("pin_environment",
                                                  os.path.join(REPO_ROOT, "tools", "pin_environment.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_wheel_list_is_pinned_at_the_versions_of_the_full_lock():
    pins = _pin_environment()
    locked = pins.read_pins(os.path.join(REPO_ROOT, "constraints.txt"))
    listed = pins.read_pins(os.path.join(REPO_ROOT, "tools", "gpu_report_requirements.txt"))
    assert listed, "tools/gpu_report_requirements.txt lists no package"
    assert not set(listed) & pins.GPU_MACHINE_OWN
    differ = {name: (version, locked.get(name)) for name, version in listed.items() if locked.get(name) != version}
    assert not differ, f"wheel list version != constraints.txt version: {differ}"


def test_the_wheel_list_holds_every_package_the_report_needs():
    """The closure of install_requires + open_clip_torch, read from the installed metadata, compared like with
    like: only where the installed versions are the pinned ones (tools/install.sh installs against the lock)."""
    pytest.importorskip("open_clip")
    pins = _pin_environment()
    locked = pins.read_pins(os.path.join(REPO_ROOT, "constraints.txt"))
    listed = pins.read_pins(os.path.join(REPO_ROOT, "tools", "gpu_report_requirements.txt"))
    needed = pins.dependency_closure(pins.install_requires(REPO_ROOT) + ["open_clip_torch"], pins.GPU_MACHINE_OWN)
    installed = pins.installed_versions()
    unpinned = {name: (installed.get(name), locked.get(name)) for name in needed
                if installed.get(name) != locked.get(name)}
    if unpinned:
        message = (f"this environment is not the one constraints.txt pins (installed, pinned): {unpinned}; "
                   "install with bash tools/install.sh")
        if os.environ.get("ZVL_REQUIRE_TEST_DEPS") == "1":  # CI installs against the lock: a difference is a fault
            pytest.fail(message)
        pytest.skip(message)
    assert needed <= set(listed), ("add to tools/gpu_report_requirements.txt (bash tools/regenerate_constraints.sh): "
                                   f"{sorted(needed - set(listed))}")


def test_the_gpu_scripts_parse():
    for script in ("gpu_report.sh", "gpu_report_bundle.sh"):
        subprocess.run(["bash", "-n", os.path.join(REPO_ROOT, "tools", script)], check=True)
