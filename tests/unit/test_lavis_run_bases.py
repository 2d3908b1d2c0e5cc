"""LAVIS ``run:`` keys across ``_base_`` files: the child's value wins whichever spelling (LAVIS ``run.<key>`` or the
zvl_ds key) each file uses; only one file giving both spellings with different values is a conflict."""
import os

import pytest
import yaml

from tests.helpers.paths import REPO_ROOT
from zvl_ds.config import ConfigError, load_config
from zvl_ds.config.compat import LAVIS_RUN_MAP

# For every LAVIS run key: a base's value and a child's different value, as LAVIS writes them, and what each
# becomes in the resolved config (written out here, not derived from LAVIS_RUN_MAP's converters).
BASE_AND_CHILD = {
    "lr_sched": (("constant", "constant"), ("linear_warmup_cosine_lr", "linear_warmup_cosine_lr")),
    "init_lr": ((0.5, 0.5), (0.25, 0.25)),
    "min_lr": ((0.001, 0.001), (0.002, 0.002)),
    "warmup_lr": ((0.003, 0.003), (0.004, 0.004)),
    "lr_decay_rate": ((0.8, 0.8), (0.7, 0.7)),
    "warmup_steps": ((10, 10), (20, 20)),
    "max_epoch": ((3, 3), (5, 5)),
    "weight_decay": ((0.05, 0.05), (0.01, 0.01)),
    "batch_size_train": ((32, 32), (64, 64)),
    "batch_size_eval": ((128, 128), (256, 256)),
    "seed": ((3, 3), (4, 4)),
    "output_dir": (("out/base", "out/base"), ("out/child", "out/child")),
    "resume_ckpt_path": (("out/base_run", "out/base_run"), ("out/child_run", "out/child_run")),
    "evaluate": ((True, True), (False, False)),
    "train_splits": ((["train"], ["train"]), (["train", "extra"], ["train", "extra"])),
    "valid_splits": ((["valid"], ["valid"]), (["test"], ["test"])),
    "test_splits": ((["test"], ["test"]), (["test2"], ["test2"])),
    "device": (("cpu", "cpu"), ("cuda", "cuda")),
    "world_size": ((2, 2), (4, 4)),
    "dist_url": (("env://", "env://"), ("tcp://host:1234", "tcp://host:1234")),
    "distributed": ((True, True), (False, False)),
    "amp": ((True, "fp16"), (False, "fp32")),
    "task": (("retrieval", "retrieval"), ("retrieval", "retrieval")),  # the only task there is
}


def test_the_table_covers_every_lavis_run_key():
    assert sorted(BASE_AND_CHILD) == sorted(LAVIS_RUN_MAP)


def resolved(cfg, dotted):
    node = cfg.to_dict()
    for part in dotted.split("."):
        node = node[part]
    return node


def nested(dotted, value):
    """``a.b.c`` -> {a: {b: {c: value}}}: the zvl_ds spelling of a key in a YAML file."""
    tree = value
    for part in reversed(dotted.split(".")):
        tree = {part: tree}
    return tree


def write_pair(tmp_path, base, child):
    base_path = tmp_path / "base.yaml"
    base_path.write_text(yaml.safe_dump(base))
    child_path = tmp_path / "child.yaml"
    child_path.write_text(yaml.safe_dump({"_base_": "base.yaml", **child}))
    return str(child_path)


@pytest.mark.parametrize("key", sorted(LAVIS_RUN_MAP))
@pytest.mark.parametrize("base_spelling,child_spelling", [("zvl_ds", "run"), ("run", "zvl_ds"), ("run", "run")])
def test_the_child_wins_over_its_base_whichever_spelling_each_uses(tmp_path, key, base_spelling, child_spelling):
    target = LAVIS_RUN_MAP[key][0]
    (base_lavis, base_value), (child_lavis, child_value) = BASE_AND_CHILD[key]

    def spelt(spelling, lavis_value, value):
        return {"run": {key: lavis_value}} if spelling == "run" else nested(target, value)

    path = write_pair(tmp_path, spelt(base_spelling, base_lavis, base_value),
                      spelt(child_spelling, child_lavis, child_value))
    assert resolved(load_config(path), target) == child_value
    # and the base alone gives its own value: the child really changed it
    assert resolved(load_config(str(tmp_path / "base.yaml")), target) == base_value


def test_one_file_giving_both_spellings_different_values_is_still_a_conflict_naming_the_file(tmp_path):
    path = write_pair(tmp_path, {"seed": 1}, {"seed": 3, "run": {"seed": 4}})
    with pytest.raises(ConfigError, match=r"child\.yaml: run\.seed=4 conflicts with seed=3 in the same file"):
        load_config(path)
    base_conflict = write_pair(tmp_path, {"optim": {"lr": {"init": 0.1}}, "run": {"init_lr": 0.2}}, {"seed": 5})
    with pytest.raises(ConfigError, match=r"base\.yaml: run\.init_lr=0\.2 conflicts with optim\.lr\.init=0\.1"):
        load_config(base_conflict)
    agreeing = write_pair(tmp_path, {"seed": 1}, {"seed": 4, "run": {"seed": 4}})
    assert load_config(agreeing).seed == 4


def test_a_lavis_schedule_on_the_demo_config_as_the_issue_wrote_it(tmp_path):
    """The report: ``_base_: configs/demo.yaml`` (optim.lr.name set there) with a run: schedule exited 2."""
    demo = os.path.join(REPO_ROOT, "configs", "demo.yaml")
    child = tmp_path / "lavis_on_demo.yaml"
    child.write_text(f"_base_: {demo}\nrun:\n  lr_sched: linear_warmup_cosine_lr\n  init_lr: 0.002\n"
                     "  min_lr: 0.0001\n  warmup_lr: 0.0005\n  warmup_steps: 7\n")
    base = load_config(demo)
    cfg = load_config(str(child))
    assert base.optim.lr.name != "linear_warmup_cosine_lr"  # the base sets another schedule: a real override
    assert cfg.optim.lr.name == "linear_warmup_cosine_lr" and cfg.optim.lr.init == 0.002
    assert (cfg.optim.lr.min_lr, cfg.optim.lr.warmup_lr, cfg.optim.lr.warmup_steps) == (0.0001, 0.0005, 7)
    assert cfg.data == base.data and cfg.model == base.model  # everything else still comes from the base


def test_a_run_key_on_the_command_line_wins_over_the_file_like_any_override(tmp_path):
    path = write_pair(tmp_path, {"optim": {"lr": {"init": 0.1}}}, {"run": {"seed": 9}})
    cfg = load_config(path, ["run.init_lr=0.3", "run.seed=11", "run.amp=true"])
    assert (cfg.optim.lr.init, cfg.seed, cfg.precision) == (0.3, 11, "fp16")
    with pytest.raises(ConfigError, match="did you mean run.init_lr"):
        load_config(path, ["run.init_lrr=0.3"])
