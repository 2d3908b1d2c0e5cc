"""The wiring of ``python -m zvl_ds.bench distill-quality`` (the measurement itself takes minutes and is not run here):
its commands are the user's, with config overrides that load, the same steps for every student, the three variants
for every seed; the figures are read back from the runs' ``eval_metrics.jsonl``; a failing stage stops it."""
import json
import os
import sys

import pytest

from tests.helpers.paths import REPO_ROOT
from zvl_ds.bench.distill_quality import Stage, collect, format_table, make_plan, run_stage
from zvl_ds.config import load_config

TEACHER_CFG = os.path.join(REPO_ROOT, "configs", "finetune_small.yaml")
STUDENT_CFG = os.path.join(REPO_ROOT, "configs", "demo.yaml")


@pytest.fixture
def plan(tmp_path):
    return make_plan(str(tmp_path), TEACHER_CFG, STUDENT_CFG, teacher_steps=7, student_steps=11, seeds=[3, 4],
                     train_size=50)


def overrides_of(stage):
    return [word for word in stage.command if "=" in word and not word.startswith("-")]


def config_of(stage):
    command = stage.command
    return load_config(command[command.index("--cfg") + 1], overrides_of(stage))


def test_every_student_trains_the_same_steps_three_ways_for_every_seed(plan):
    students = [stage for stage in plan.stages if stage.name.startswith("student")]
    assert len(students) == 6
    seen = set()
    for stage in students:
        cfg = config_of(stage)
        assert stage.command[1:3] == ["-m", "zvl_ds.train"] and cfg.model.arch == "tiny"
        assert (cfg.runner.train_steps, cfg.loss.name, cfg.data.data_path) == (11, "NCE", plan.stages[1].command[-3])
        variant = ("no teacher" if not cfg.distill.enabled else
                   "pure distillation" if cfg.distill.contrastive_weight == 0 else "distilled")
        if cfg.distill.enabled:
            assert (cfg.distill.teacher, cfg.distill.source, cfg.distill.weight) == (plan.teacher_model, "stored", 1.0)
            assert cfg.distill.contrastive_weight in (0.0, 1.0)
        seen.add((variant, cfg.seed))
        assert os.path.join(cfg.ckpt.dir, cfg.data.exp_name) == plan.students[variant][cfg.seed]
    assert seen == {(variant, seed) for variant in ("no teacher", "distilled", "pure distillation") for seed in (3, 4)}


def test_the_teacher_is_the_finetune_recipe_exported_and_stored_beside_the_students_shards(plan):
    names = [stage.name for stage in plan.stages]
    assert names[:5] == ["demo data", "shards", "teacher: train", "teacher: export", "teacher: reinforce the shards"]
    teacher = config_of(plan.stages[2])
    assert teacher.model.image_encoder.tag == "efficientnet_lite0" and teacher.runner.train_steps == 7
    assert os.path.join(teacher.ckpt.dir, teacher.data.exp_name) == plan.teacher_run
    export = plan.stages[3].command
    assert export[1:3] == ["-m", "zvl_ds.export"] and export[3] == plan.teacher_run and export[-1] == plan.teacher_model
    reinforce = plan.stages[4]
    assert reinforce.command[1:3] == ["-m", "zvl_ds.reinforce_shards"]
    stored_for = config_of(reinforce)
    student = config_of(plan.stages[-1])
    assert (stored_for.data.data_path, stored_for.data.train_name, stored_for.distill.teacher) == (
        student.data.data_path, student.data.train_name, student.distill.teacher)
    assert "--train-size" in plan.stages[0].command and "50" in plan.stages[0].command


def write_metrics(run_dir, rows):
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "eval_metrics.jsonl"), "w") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)


def test_the_figures_are_each_runs_last_evaluation(plan):
    write_metrics(plan.teacher_run, [{"step": 3, "demo_val": {"rsum": 100.0}},
                                     {"step": 7, "demo_val": {"rsum": 250.5}}])
    expected = {}
    for number, (variant, runs) in enumerate(plan.students.items()):
        for seed, run in runs.items():
            rows = [{"step": 11, "demo_val": {"rsum": 10.0 * number + seed}}]
            if variant != "no teacher":
                rows.insert(0, {"step": 0, "demo_val_teacher": {"rsum": 249.0}})
            write_metrics(run, [{"step": 5, "demo_val": {"rsum": -1.0}}] + rows)
            expected.setdefault(variant, {})[seed] = 10.0 * number + seed
    result = collect(plan)
    assert result["teacher_rsum"] == 250.5 and result["teacher_rsum_from_stored_embeddings"] == 249.0
    for variant, per_seed in expected.items():
        assert result["students"][variant]["rsum_per_seed"] == per_seed
        assert result["students"][variant]["mean"] == pytest.approx(sum(per_seed.values()) / 2)
    table = format_table(result)
    assert "| teacher | 250.5 (stored embeddings: 249.0) |" in table
    assert "| student, pure distillation | 23.0 | 24.0 | 23.5 |" in table


def test_a_failing_stage_stops_the_measurement_naming_its_log(tmp_path):
    with pytest.raises(RuntimeError, match=r"broken failed \(exit 3\); its log: .*00_broken.log"):
        run_stage(Stage("broken", [sys.executable, "-c", "print('why'); raise SystemExit(3)"]), str(tmp_path), 0)
    assert "why" in open(tmp_path / "00_broken.log").read()


def test_distillation_overrides_go_to_the_distilled_students_only(tmp_path):
    plan = make_plan(str(tmp_path), TEACHER_CFG, STUDENT_CFG, 7, 11, [0], 50, ["distill.scale=100"])
    scales = {stage.name: config_of(stage).distill.scale for stage in plan.stages if stage.name.startswith("student")}
    assert scales == {"student: no teacher, seed 0": None, "student: distilled, seed 0": 100.0,
                      "student: pure distillation, seed 0": 100.0}
