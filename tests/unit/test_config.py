import os
import re
import subprocess
import sys

import pytest
import yaml

from tests.helpers.paths import REPO_ROOT
from zvl_ds.config import Config, ConfigError, load_config
from zvl_ds.config.compat import LAVIS_RUN_MAP

CONFIGS = os.path.join(REPO_ROOT, "configs")


def write(path, text):
    path.write_text(text)
    return str(path)


def test_zerovl_dga_seed_config_loads_verbatim():
    cfg = load_config(os.path.join(CONFIGS, "clip", "zerovl_dga.yaml"))
    assert cfg.runner.name == "clip_bsgs" and cfg.runner.stable_random == "step"
    assert cfg.data.train_type == "debias" and cfg.data.train_name == ["sbu", "cc3m"]
    assert cfg.data.batch_size == 16384 and cfg.data.batch_size_train == 1024 and cfg.data.batch_size_val == 1024
    assert cfg.loss.name == "MixUpNCE" and cfg.loss.mixup.beta == 0.1 and cfg.loss.nce_loss.gather_backward
    assert cfg.optim.param.betas == [0.9, 0.98]  # written as !!python/tuple
    assert cfg.optim.param.eps == 1e-6 and cfg.optim.lr.init == 1e-4
    assert cfg.optim.lr.param.min_lr_scale == 0.1 and cfg.optim.lr.param.num_cycles == 0.5
    assert cfg.model.image_encoder.tag == "vit_base_patch16_224_in21k"
    assert cfg.model.text_encoder.tag == "bert-base-uncased"
    assert cfg.precision == "fp16"  # ZeroVL's dist.fp16: True
    assert cfg.run_dir == os.path.join("./output", "your_exp_name")
    assert cfg.chunk_size == 1024


def test_zerovl_single_pass_seed_config_loads():
    cfg = load_config(os.path.join(CONFIGS, "clip", "zerovl.yaml"))
    assert cfg.runner.name == "clip" and cfg.data.train_type == "shuffle" and cfg.loss.name == "NCE"
    assert cfg.data.batch_size == 1024 and cfg.data.batch_size_train is None and cfg.chunk_size == 1024
    assert cfg.runner.val_interval_steps == 100


def test_python_tuple_tag_needs_no_unsafe_loader(tmp_path):
    # an unsafe tag must still be refused
    path = write(tmp_path / "bad.yaml", "seed: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_base_inheritance_depth_first_and_list(tmp_path):
    write(tmp_path / "a.yaml", "seed: 1\ndata:\n  batch_size: 8\n  num_workers: 3\n")
    write(tmp_path / "b.yaml", "_base_: a.yaml\ndata:\n  batch_size: 16\n")
    write(tmp_path / "c.yaml", "data:\n  num_workers: 5\nepoch: 7\n")
    child = write(tmp_path / "child.yaml", "_base_: [b.yaml, c.yaml]\ndata:\n  exp_name: kid\n")
    cfg = load_config(child)
    assert cfg.seed == 1 and cfg.data.batch_size == 16  # b overrides a
    assert cfg.data.num_workers == 5 and cfg.epoch == 7  # later base overrides earlier
    assert cfg.data.exp_name == "kid"


def test_base_cycle_is_an_error(tmp_path):
    write(tmp_path / "x.yaml", "_base_: y.yaml\n")
    write(tmp_path / "y.yaml", "_base_: x.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(str(tmp_path / "x.yaml"))


def test_overrides_are_yaml_typed():
    cfg = load_config(os.path.join(CONFIGS, "clip", "zerovl_dga.yaml"),
                      ["data.batch_size=4096", "loss.name=NCE", "data.train_name=[sbu,cc3m,cc12m]",
                       "optim.lr.init=3e-4", "data.batch_size_train=null", "model.image_encoder.pretrained=/w.pth"])
    assert cfg.data.batch_size == 4096 and cfg.loss.name == "NCE"
    assert cfg.data.train_name == ["sbu", "cc3m", "cc12m"]
    assert cfg.optim.lr.init == pytest.approx(3e-4)
    assert cfg.data.batch_size_train is None
    assert cfg.model.image_encoder.pretrained == "/w.pth"


def test_wrong_type_names_path_value_and_type():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["data.batch_size=abc"])
    assert "data.batch_size" in str(err.value) and "'abc'" in str(err.value) and "int" in str(err.value)
    with pytest.raises(ConfigError, match="data.enable_valid.*bool"):
        load_config(None, ["data.enable_valid=3"])


def test_unknown_key_suggests_closest():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["data.bach_size=8"])
    assert "data.bach_size" in str(err.value) and "did you mean data.batch_size" in str(err.value)
    with pytest.raises(ConfigError, match="unknown config key optimm"):
        load_config(None, ["optimm.name=SGD"])


def test_invalid_choice_lists_choices():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["data.train_type=debiased"])
    assert "debias" in str(err.value) and "shuffle" in str(err.value) and "sequential" in str(err.value)
    with pytest.raises(ConfigError, match="model.arch"):
        load_config(None, ["model.arch=vit_huge_imaginary"])


def test_invalid_combinations():
    with pytest.raises(ConfigError, match="must divide"):
        load_config(None, ["data.batch_size=100", "data.batch_size_train=30"])
    with pytest.raises(ConfigError, match="temperature"):
        load_config(None, ["loss.temperature.value=0.9"])


def test_lavis_run_block_maps_onto_canonical_keys(tmp_path):
    path = write(tmp_path / "lavis.yaml", """
run:
  lr_sched: linear_warmup_cosine_lr
  init_lr: 1e-4
  min_lr: 1e-6
  warmup_lr: 1e-7
  warmup_steps: 100
  max_epoch: 3
  weight_decay: 0.05
  batch_size_train: 32
  batch_size_eval: 64
  seed: 7
  output_dir: out/lavis
  evaluate: true
  amp: true
  train_splits: [train]
  device: cpu
  world_size: 2
  distributed: true
""")
    cfg = load_config(path)
    assert cfg.optim.lr.name == "linear_warmup_cosine_lr" and cfg.optim.lr.init == pytest.approx(1e-4)
    assert cfg.optim.lr.min_lr == pytest.approx(1e-6) and cfg.optim.lr.warmup_lr == pytest.approx(1e-7)
    assert cfg.optim.lr.warmup_steps == 100 and cfg.epoch == 3 and cfg.optim.param.weight_decay == 0.05
    assert cfg.data.batch_size_train == 32 and cfg.data.batch_size_val == 64 and cfg.seed == 7
    assert cfg.ckpt.dir == "out/lavis" and cfg.evaluate is True and cfg.precision == "fp16"
    assert cfg.device == "cpu" and cfg.runner.world_size == 2 and cfg.data.train_splits == ["train"]


def test_lavis_conflict_and_unknown(tmp_path):
    path = write(tmp_path / "c.yaml", "seed: 3\nrun:\n  seed: 4\n")
    with pytest.raises(ConfigError, match="run.seed=4 conflicts with seed=3"):
        load_config(path)
    same = write(tmp_path / "s.yaml", "seed: 4\nrun:\n  seed: 4\n")
    assert load_config(same).seed == 4
    with pytest.raises(ConfigError, match="did you mean run.init_lr"):
        load_config(write(tmp_path / "u.yaml", "run:\n  init_lrr: 0.1\n"))


def test_every_lavis_key_targets_a_real_key():
    defaults = Config().to_dict()
    for lavis_key, (target, _) in LAVIS_RUN_MAP.items():
        node = defaults
        for part in target.split("."):
            assert part in node, f"run.{lavis_key} maps to missing {target}"
            node = node[part]


def test_model_preset_with_explicit_override():
    cfg = load_config(None, ["model.arch=tiny", "model.projection.dim=32"])
    assert cfg.model.image_encoder.img_size == 32 and cfg.model.projection.dim == 32
    assert cfg.model.text_encoder.tokenizer == "zvl_ds:demo_tokenizer"


def test_resolved_yaml_round_trips(tmp_path):
    cfg = load_config(os.path.join(CONFIGS, "demo.yaml"), ["seed=5"])
    dumped = write(tmp_path / "resolved.yaml", cfg.to_yaml())
    again = load_config(dumped)
    assert again == cfg


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "zvl_ds.config", *args], capture_output=True, text=True,
                          cwd=REPO_ROOT, timeout=120)


@pytest.mark.slow
def test_cli_prints_resolved_config_and_exits_2_on_errors():
    ok = run_cli("configs/clip/zerovl_dga.yaml")
    assert ok.returncode == 0, ok.stderr
    assert yaml.safe_load(ok.stdout)["data"]["batch_size"] == 16384
    bad_type = run_cli("configs/clip/zerovl_dga.yaml", "data.batch_size=abc")
    assert bad_type.returncode == 2 and "data.batch_size" in bad_type.stderr and "int" in bad_type.stderr
    assert "Traceback" not in bad_type.stderr
    typo = run_cli("configs/clip/zerovl_dga.yaml", "data.bach_size=8")
    assert typo.returncode == 2 and "data.batch_size" in typo.stderr


def test_tiny_preset_vocabulary_matches_the_packaged_demo_tokenizer():
    from zvl_ds.data import load_tokenizer

    cfg = load_config(None, ["model.arch=tiny"])
    assert cfg.model.text_encoder.config["vocab_size"] == len(load_tokenizer(cfg.model.text_encoder))


def test_unimplemented_zerovl_loss_options_are_refused_not_ignored():
    with pytest.raises(ConfigError, match="loss.smoothing=0.1.*not implemented"):
        load_config(None, ["loss.smoothing=0.1"])
    with pytest.raises(ConfigError, match="loss.group_size=8"):
        load_config(None, ["loss.group_size=8"])
    assert load_config(None, ["loss.smoothing=0.0", "loss.group_size=-1"]).loss.smoothing == 0.0


def test_lavis_constant_lr_name_is_accepted(tmp_path):
    path = write(tmp_path / "lavis.yaml", "run:\n  lr_sched: constant_lr\n  init_lr: 0.1\n")
    from zvl_ds.runtime.schedule import learning_rate

    cfg = load_config(path)
    assert [learning_rate(cfg.optim.lr, s, 100, 10) for s in (0, 50, 99)] == [0.1, 0.1, 0.1]


@pytest.mark.parametrize("key, name", [("trust_remote_code=true", "trust_remote_code"),
                                       ("auto_map.AutoModel=evil.Model", "auto_map"),
                                       ("text_config.code_revision=main", "text_config.code_revision")])
def test_keys_that_load_code_from_a_model_folder_are_refused(tmp_path, key, name):
    path = tmp_path / "cfg.yaml"
    path.write_text("model:\n  text_encoder:\n    tag: some/folder\n    config: {hidden_size: 64}\n")
    message = rf"model\.text_encoder\.config\.{re.escape(name)}: a key that makes Hugging Face load Python code"
    with pytest.raises(ConfigError, match=message):
        load_config(str(path), [f"model.text_encoder.config.{key}"])
    assert load_config(str(path)).model.text_encoder.config == {"hidden_size": 64}


def test_keys_without_effect_are_accepted_type_checked_and_kept_out_of_the_schema():
    from zvl_ds.config.compat import ACCEPTED_WITHOUT_EFFECT

    cfg = load_config(None, ["ckpt.soft_resume=true", "dist.param.opt_level=O2", "data.val_steps=5", "inference=true"])
    assert cfg == load_config(None)  # read, checked, and changing nothing
    assert "inference" not in cfg.to_dict() and "param" not in cfg.to_dict()["dist"]
    assert "soft_resume" not in cfg.to_dict()["ckpt"]
    for key, accepted in ACCEPTED_WITHOUT_EFFECT.items():
        assert load_config(None, [f"{key}={yaml.safe_dump(accepted.default).splitlines()[0]}"]) == cfg, key
    with pytest.raises(ConfigError, match="data.single_eval.*bool"):
        load_config(None, ["data.single_eval=3"])
    with pytest.raises(ConfigError, match="data.name: invalid choice 'webdataset'"):
        load_config(None, ["data.name=webdataset"])
    with pytest.raises(ConfigError, match="unknown config key dist.param.opt_levl; did you mean dist.param.opt_level"):
        load_config(None, ["dist.param.opt_levl=O1"])
    with pytest.raises(ConfigError, match="did you mean data.single_eval"):
        load_config(None, ["data.single_evl=true"])


def test_each_key_without_effect_that_a_config_sets_is_reported_once(tmp_path, monkeypatch, caplog):
    from zvl_ds.config import compat

    monkeypatch.setattr(compat, "_REPORTED", set())  # a fresh process as far as the reports go
    path = write(tmp_path / "zerovl_style.yaml", "ckpt:\n  soft_resume: true\ndist:\n  param:\n    opt_level: O2\n")
    with caplog.at_level("WARNING", logger="zvl_ds.config.compat"):
        load_config(path)
        load_config(path, ["log.interval_val=3"])
        load_config(None)
    reported = [record.getMessage() for record in caplog.records]
    assert [message.split()[2] for message in reported] == ["ckpt.soft_resume", "dist.param.opt_level",
                                                             "log.interval_val"]
    assert all("has no effect" in message for message in reported)


def test_zerovl_wandb_section_is_real_typed_config():
    """ZeroVL's ``wandb: {enable, project, entity}`` acts now (zvl_ds/observe/wandb_sink.py): typed, validated."""
    cfg = load_config(os.path.join(CONFIGS, "clip", "zerovl.yaml"))
    assert (cfg.wandb.enable, cfg.wandb.project, cfg.wandb.entity) == (False, "your_proj", "your_entity")
    assert load_config(None).wandb.enable is False  # TensorBoard alone by default
    cfg = load_config(None, ["wandb.enable=true", "wandb.project=p", "wandb.entity=null", "wandb.tags=[a, b]",
                             "wandb.mode=offline"])
    assert (cfg.wandb.enable, cfg.wandb.project, cfg.wandb.entity, cfg.wandb.tags, cfg.wandb.mode) == (
        True, "p", None, ["a", "b"], "offline")
    assert cfg.to_dict()["wandb"]["project"] == "p"  # in the resolved config a run records
    with pytest.raises(ConfigError, match="wandb.enable.*bool"):
        load_config(None, ["wandb.enable=3"])
    with pytest.raises(ConfigError, match="wandb.mode: invalid choice 'offlne'"):
        load_config(None, ["wandb.mode=offlne"])
    with pytest.raises(ConfigError, match="unknown config key wandb.enabel; did you mean wandb.enable"):
        load_config(None, ["wandb.enabel=true"])
