"""Patch dropout: what is kept, training only, replayed from the RNG state, refused where there is no slot."""
import pytest
import torch

import zvl_ds  # noqa: F401  (torchvision shim before timm)
from zvl_ds.config import ConfigError, load_config
from zvl_ds.model.build import build_model
from zvl_ds.model.patch_dropout import set_patch_dropout


def tiny(*overrides):
    cfg = load_config(None, ["model.arch=tiny", *overrides])
    torch.manual_seed(0)
    return build_model(cfg.model, cfg.loss)


def tokens_after_patch_drop(model, images):
    seen = {}
    handle = model.image_tower.patch_drop.register_forward_hook(lambda m, i, o: seen.update(i=i[0], o=o))
    model.image_features(images)
    handle.remove()
    return seen["i"], seen["o"]


def test_training_keeps_the_class_token_and_a_share_of_patches_of_each_image():
    model = tiny("model.image_encoder.patch_dropout=0.25").train()
    before, after = tokens_after_patch_drop(model, torch.randn(3, 3, 32, 32))
    assert before.shape[1] == 1 + 16 and after.shape[1] == 1 + 12  # 16 patches at 32 px, patch 8: keep 12
    assert torch.equal(after[:, 0], before[:, 0])  # the class token stays first
    for image in range(3):  # every kept token is one of this image's patches, none twice
        kept = [int((before[image, 1:] == token).all(-1).nonzero()) for token in after[image, 1:]]
        assert len(set(kept)) == 12
    model.eval()
    before, after = tokens_after_patch_drop(model, torch.randn(3, 3, 32, 32))
    assert torch.equal(before, after)


def test_the_same_rng_state_drops_the_same_patches():
    model = tiny("model.image_encoder.patch_dropout=0.5").train()
    images = torch.randn(4, 3, 32, 32)
    state = torch.get_rng_state()
    first = model.image_features(images)
    second = model.image_features(images)
    torch.set_rng_state(state)
    replayed = model.image_features(images)
    assert torch.equal(first, replayed) and not torch.allclose(first, second)


def test_a_tower_without_a_patch_drop_slot_is_refused():
    import timm

    with pytest.raises(ConfigError, match="patch_dropout=0.5.*no patch_drop slot"):
        set_patch_dropout(timm.create_model("resnet10t", num_classes=0), 0.5)
    with pytest.raises(ConfigError, match=r"in \[0, 1\)"):
        load_config(None, ["model.arch=tiny", "model.image_encoder.patch_dropout=1.0"])
