"""Bounded reads of every input: YAML aliases, image files (FIFOs, devices, huge or sparse files, links out of the
image folder), float images, crafted model folders. Faults are planted with real files."""
import os

import pytest

from tests.helpers.paths import REPO_ROOT
from zvl_ds.config import ConfigError, load_config
from zvl_ds.config.load import MAX_EXPANDED_YAML_NODES


def alias_bomb(levels=9, width=9):
    lines = ["model:", "  text_encoder:", "    config:", "      a0: &a0 [" + ",".join(['"lol"'] * width) + "]"]
    lines += [f"      a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * width) + "]" for i in range(1, levels + 1)]
    return "\n".join(lines) + "\n"


def test_yaml_aliases_are_bounded_in_config_files_and_overrides(tmp_path):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(f"_base_: {os.path.join(REPO_ROOT, 'configs', 'demo.yaml')}\n" + alias_bomb())
    with pytest.raises(ConfigError, match=r"bomb\.yaml: YAML aliases .* more than 100000 values"):
        load_config(str(bomb))
    recursive = tmp_path / "recursive.yaml"
    recursive.write_text("model:\n  text_encoder:\n    config: &me {inner: *me}\n")
    with pytest.raises(ConfigError, match="refers to a value that contains it"):
        load_config(str(recursive))
    # an override cannot smuggle one in either: it is read by the same loader
    with pytest.raises(ConfigError):
        load_config(None, ["model.text_encoder.config=" + alias_bomb().split("config:")[1].replace("\n", " ")])


def test_ordinary_anchors_still_load(tmp_path):
    config = tmp_path / "anchors.yaml"
    config.write_text(f"_base_: {os.path.join(REPO_ROOT, 'configs', 'demo.yaml')}\n"
                      "transforms:\n  normalize:\n    mean: &half [0.5, 0.5, 0.5]\n    std: *half\n")
    cfg = load_config(str(config))
    assert cfg.transforms.normalize.std == [0.5, 0.5, 0.5]
    # the limit counts expanded values: a document just under it loads
    wide = tmp_path / "wide.yaml"
    wide.write_text("model:\n  text_encoder:\n    config:\n      a: &a [" + ",".join(["1"] * 99) + "]\n"
                    "      b: [" + ",".join(["*a"] * (MAX_EXPANDED_YAML_NODES // 120)) + "]\n")
    assert len(load_config(str(wide)).model.text_encoder.config["b"]) == MAX_EXPANDED_YAML_NODES // 120
