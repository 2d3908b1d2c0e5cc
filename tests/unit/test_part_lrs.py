"""Per-part learning rates and layer-wise decay: the scale of each parameter against the formula written out by
hand, and config refusals. The real DeepSpeed engine applying them: tests/dist/test_part_lrs.py."""
import re

import pytest
from torch import nn

from zvl_ds.config import ConfigError, load_config

GLOBAL_BATCH = 8  # of the engine tests in tests/dist/test_part_lrs.py, which build their runs with make_cfg
PART_OVERRIDES = [
    "loss.temperature.name=parameter", "loss.temperature.value=0.1",
    "optim.lr_mult.image_tower=0.5", "optim.lr_abs.text_tower=0.6", "optim.lr_mult.projection=2.0",
    "optim.lr_mult.temperature=0.1", "optim.layer_decay.image_tower=0.5", "optim.layer_decay.text_tower=0.8",
]


def expected_scale(name):
    """The formula, written out for the tiny preset (2 ViT blocks, 2 BERT layers) and PART_OVERRIDES with
    optim.lr.init = 0.2: part multiplier x decay ** (L + 1 - layer)."""
    if name == "tau":
        return 0.1
    if name.startswith(("image_projection.", "text_projection.")):
        return 2.0
    if name.startswith("image_tower."):
        rest = name[len("image_tower."):]
        block = re.match(r"blocks\.(\d+)\.", rest)
        layer = 0 if rest.startswith(("cls_token", "pos_embed", "patch_embed.")) else (
            int(block.group(1)) + 1 if block else 3)
        return 0.5 * 0.5 ** (3 - layer)
    assert name.startswith("text_tower."), name
    rest = name[len("text_tower."):]
    block = re.match(r"encoder\.layer\.(\d+)\.", rest)
    layer = 0 if rest.startswith("embeddings.") else (int(block.group(1)) + 1 if block else 3)
    return (0.6 / 0.2) * 0.8 ** (3 - layer)


def make_cfg(extra=()):
    return load_config(None, ["model.arch=tiny", "seed=5", f"data.batch_size={GLOBAL_BATCH}", "optim.name=SGD",
                              "optim.param.weight_decay=0.0", "optim.lr.init=0.2",
                              "optim.lr.name=linear_warmup_cosine_lr", "optim.lr.warmup_steps=1",
                              "optim.lr.warmup_lr=0.05", "optim.lr.min_lr=0.01",
                              "model.text_encoder.config.hidden_dropout_prob=0.0",
                              "model.text_encoder.config.attention_probs_dropout_prob=0.0",
                              *PART_OVERRIDES, *extra])


def test_each_parameter_gets_the_formula_scale():
    from zvl_ds.model.build import build_model
    from zvl_ds.runtime.optim import optimizer_groups

    cfg = make_cfg()
    model = build_model(cfg.model, cfg.loss)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = optimizer_groups(model, cfg.optim)
    seen = 0
    for group in groups:
        for param in group["params"]:
            assert group["lr_scale"] == pytest.approx(expected_scale(names[id(param)]), rel=1e-12), names[id(param)]
            seen += 1
    assert seen == sum(1 for p in model.parameters() if p.requires_grad)
    # spot checks of the rule by hand: embeddings decay ** (L + 1), last block decay ** 1, final norm 1
    scale_of = {names[id(p)]: g["lr_scale"] for g in groups for p in g["params"]}
    assert scale_of["image_tower.pos_embed"] == pytest.approx(0.5 * 0.125)
    assert scale_of["image_tower.blocks.1.attn.qkv.weight"] == pytest.approx(0.5 * 0.5)
    assert scale_of["image_tower.norm.weight"] == pytest.approx(0.5)
    assert scale_of["text_tower.encoder.layer.0.output.dense.weight"] == pytest.approx(3.0 * 0.64)


def test_default_config_keeps_the_two_groups():
    from zvl_ds.model.build import build_model
    from zvl_ds.runtime.optim import optimizer_groups, parameter_groups

    cfg = load_config(None, ["model.arch=tiny"])
    model = build_model(cfg.model, cfg.loss)
    groups = optimizer_groups(model, cfg.optim)
    plain = parameter_groups(model, cfg.optim.param.weight_decay, cfg.optim.decay_all)
    assert [g["group_name"] for g in groups] == ["decay", "no_decay"]
    assert [g["lr_scale"] for g in groups] == [1.0, 1.0]
    assert [[id(p) for p in g["params"]] for g in groups] == [[id(p) for p in g["params"]] for g in plain]


@pytest.mark.parametrize("overrides,message", [
    (["optim.lr_abs.image_tower=0.1", "optim.lr_mult.image_tower=2.0"], "give the part's learning rate one way"),
    (["optim.lr_mult.projection=-1"], r"optim.lr_mult.projection: must be >= 0"),
    (["optim.layer_decay.text_tower=1.5"], r"optim.layer_decay.text_tower: must be in \(0, 1\]"),
    (["optim.layer_decay.image_tower=0"], r"optim.layer_decay.image_tower: must be in \(0, 1\]"),
    (["optim.lr.init=0", "optim.lr_abs.temperature=0.1"], "relative to optim.lr.init"),
])
def test_bad_part_lrs_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["model.arch=tiny", *overrides])


def test_layer_decay_on_a_tower_without_blocks_is_refused():
    from zvl_ds.runtime.optim import optimizer_groups

    class Convolutional(nn.Module):
        def __init__(self):
            super().__init__()
            self.image_tower = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3))
            self.text_tower = nn.Linear(4, 4)

    cfg = load_config(None, ["optim.layer_decay.image_tower=0.7"])
    with pytest.raises(ConfigError, match=r"layer_decay.image_tower=0.7 needs a ViT .* Sequential has no such"):
        optimizer_groups(Convolutional(), cfg.optim)
