"""Partial locking: which groups freeze, the trainable count, BatchNorm statistics, LayerNorms, wrong N, the optimizer."""
import pytest
import torch

import zvl_ds  # noqa: F401  (torchvision shim before timm)
from zvl_ds.config import ConfigError, load_config
from zvl_ds.model.build import build_model
from zvl_ds.model.dual_encoder import count_parameters
from zvl_ds.model.locking import block_groups, lock_tower
from zvl_ds.base.cli import run
from zvl_ds.runtime.optim import build_optimizer


def tiny(*overrides):
    cfg = load_config(None, ["model.arch=tiny", *overrides])
    torch.manual_seed(0)
    return build_model(cfg.model, cfg.loss), cfg


def numel(model, prefixes):
    return sum(p.numel() for name, p in model.named_parameters() if name.startswith(prefixes))


def test_vit_groups_are_timms_stem_blocks_and_final_norm_with_the_last_block():
    model, _ = tiny()
    groups = block_groups(model.image_tower)
    assert len(groups) == 3  # 2 blocks
    assert set(groups[0]) == {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"}
    assert all(name.startswith("blocks.0.") for name in groups[1])
    assert {"norm.weight", "norm.bias"} <= set(groups[2])


def test_bert_groups_are_embeddings_then_each_layer():
    model, _ = tiny()
    groups = block_groups(model.text_tower)
    assert len(groups) == 3
    assert all(name.startswith("embeddings.") for name in groups[0])
    assert all(name.startswith(f"encoder.layer.{i}.") for i in (0, 1) for name in groups[i + 1])
    assert sum(len(g) for g in groups) == len(list(model.text_tower.parameters()))


def test_unlocked_groups_leave_only_the_last_blocks_trainable_and_out_of_the_optimizer():
    model, cfg = tiny("model.image_encoder.unlocked_groups=1", "model.text_encoder.unlocked_layers=1",
                      "model.text_encoder.freeze_layer_norm=true")
    trained = (numel(model, ("image_tower.blocks.1.", "image_tower.norm.", "text_tower.encoder.layer.1."))
               + numel(model, ("image_projection.", "text_projection.", "tau")))
    assert count_parameters(model, trainable_only=True) == trained
    optimizer = build_optimizer(model, cfg.optim)
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    names = {name for name, p in model.named_parameters() if id(p) in in_optimizer}
    assert names == {name for name, p in model.named_parameters() if p.requires_grad}
    assert not any(n.startswith(("image_tower.blocks.0.", "text_tower.embeddings.")) for n in names)


def test_zero_unlocked_freezes_the_whole_tower_and_all_unlocked_freezes_nothing():
    model, _ = tiny("model.image_encoder.unlocked_groups=0")
    assert count_parameters(model.image_tower, trainable_only=True) == 0
    model, _ = tiny("model.image_encoder.unlocked_groups=3")
    assert count_parameters(model.image_tower, trainable_only=True) == count_parameters(model.image_tower)


def test_layer_norms_of_locked_layers_stay_trainable_unless_frozen_as_openclip():
    model, _ = tiny("model.text_encoder.unlocked_layers=0")
    trainable = {name for name, p in model.text_tower.named_parameters() if p.requires_grad}
    assert trainable and all("LayerNorm" in name for name in trainable)
    layer_norms = sum(1 for m in model.text_tower.modules() if isinstance(m, torch.nn.LayerNorm))
    assert len(trainable) == 2 * layer_norms  # weight and bias of each
    model, _ = tiny("model.text_encoder.unlocked_layers=0", "model.text_encoder.freeze_layer_norm=true")
    assert count_parameters(model.text_tower, trainable_only=True) == 0


def test_too_many_unlocked_groups_is_a_config_error_that_exits_2(capsys):
    with pytest.raises(ConfigError, match=r"unlocked_groups=4.*has 3 groups"):
        tiny("model.image_encoder.unlocked_groups=4")
    assert run(lambda: tiny("model.text_encoder.unlocked_layers=9")) == 2
    assert "model.text_encoder.unlocked_layers=9" in capsys.readouterr().err


@pytest.mark.parametrize("overrides,message", [
    (["model.image_encoder.unlocked_groups=-1"], "must be >= 0"),
    (["model.image_encoder.unlocked_groups=1", "model.image_encoder.trainable=false"], "nothing to unlock"),
    (["model.image_encoder.freeze_bn_stats=true"], "set model.image_encoder.unlocked_groups"),
    (["model.text_encoder.freeze_layer_norm=true"], "set model.text_encoder.unlocked_layers"),
])
def test_contradicting_locking_keys_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["model.arch=tiny", *overrides])


def test_freeze_bn_stats_keeps_the_locked_batch_norms_in_eval_mode():
    import timm

    from zvl_ds.model.locking import lock_tower

    tower = timm.create_model("resnet10t", num_classes=0)
    lock = lock_tower(tower, 2, "model.image_encoder.unlocked_groups", freeze_bn_stats=True)
    groups = block_groups(tower)
    locked = {name for group in groups[:-2] for name in group}
    assert set(lock.frozen_parameters) == locked
    assert lock.frozen_norm_modules and all(f"{name}.weight" in locked for name in lock.frozen_norm_modules)
    # trained blocks keep updating their statistics; locked ones would not (the model keeps them in eval mode)
    assert not any(name.startswith(("layer4",)) for name in lock.frozen_norm_modules)


def test_the_dual_encoder_keeps_frozen_batch_norm_statistics():
    import timm

    from zvl_ds.model.locking import lock_towers

    model, _ = tiny()
    _, cfg = tiny("model.image_encoder.unlocked_groups=1", "model.image_encoder.freeze_bn_stats=true")
    model.image_tower = timm.create_model("resnet10t", num_classes=0)  # a tower with BatchNorm
    lock_towers(model, cfg.model)
    model.train()
    frozen = [model.get_submodule(name) for name in model.frozen_norm_modules]
    assert frozen and not any(m.training for m in frozen)
    before = [m.running_mean.clone() for m in frozen]
    model.image_features(torch.randn(2, 3, 32, 32))
    assert all(torch.equal(b, m.running_mean) for b, m in zip(before, frozen))


def test_a_tower_can_tell_its_own_groups():
    class Tower(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)

        def block_groups(self):
            return [["a.weight", "a.bias"], ["b.weight", "b.bias"]]

    tower = Tower()
    lock_tower(tower, 1, "key")
    assert [p.requires_grad for p in tower.parameters()] == [False, False, True, True]
