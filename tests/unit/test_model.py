"""The dual encoder on the tiny preset: shapes, normalisation, temperature, freezing, pooling, mixup,
gradient checkpointing, projections, and loading weights files (by name, adapted, by position, from cache)."""
import copy
import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from zvl_ds.config import ImageEncoderConfig, TemperatureConfig, TextEncoderConfig, config_from_dict
from zvl_ds.model.mixing import MixupDraw
from zvl_ds.model.build import build_model
from zvl_ds.model.dual_encoder import DualEncoder, parameter_summary
from zvl_ds.model.towers import build_image_tower, build_projection, build_text_tower
from zvl_ds.model.weights_files import read_state_dict

TINY_VIT = {"tag": "vit_tiny_patch16_224", "pretrained": False, "img_size": 32,
            "kwargs": {"patch_size": 8, "depth": 2, "embed_dim": 64, "num_heads": 2}}


def tiny_cfg(**model_overrides):
    model = {"arch": "tiny"}
    model.update(model_overrides)
    return config_from_dict({"model": model, "loss": {"temperature": {"name": "parameter", "value": 0.07}}})


def batch(n=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 32, 32, generator=gen)
    input_ids = torch.randint(1, 288, (n, 16), generator=gen)
    attention_mask = torch.ones(n, 16, dtype=torch.long)
    attention_mask[0, 10:] = 0
    return images, input_ids, attention_mask


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = tiny_cfg()
    return build_model(cfg.model, cfg.loss).eval()


def test_shapes_and_unit_norm(model):
    images, input_ids, attention_mask = batch()
    out = model(images=images, input_ids=input_ids, attention_mask=attention_mask)
    assert out["image_embeds"].shape == (4, 64) and out["text_embeds"].shape == (4, 64)
    for key in ("image_embeds", "text_embeds"):
        assert torch.allclose(out[key].norm(dim=-1), torch.ones(4), atol=1e-5)
    only_images = model(images=images)
    assert only_images["text_embeds"] is None and torch.allclose(only_images["image_embeds"], out["image_embeds"])
    assert model(input_ids=input_ids, attention_mask=attention_mask)["image_embeds"] is None
    assert isinstance(model.image_projection, nn.Linear) and model.image_projection.bias is None
    summary = parameter_summary(model)
    assert summary["all"]["total"] == sum(p.numel() for p in model.parameters())


def test_learnable_temperature_has_shape_one_and_is_clamped(model):
    assert isinstance(model.tau, nn.Parameter) and model.tau.shape == (1,)
    assert model.temperature().shape == (1,)
    assert model.temperature().item() == pytest.approx(0.07)
    assert "tau" in model.state_dict()
    original = model.tau.detach().clone()
    try:
        with torch.no_grad():
            model.tau.fill_(5.0)
        assert model.temperature().item() == pytest.approx(0.5)  # loss.temperature.max
        with torch.no_grad():
            model.tau.fill_(0.0)
        assert model.temperature().item() == pytest.approx(0.001)  # loss.temperature.min
    finally:
        with torch.no_grad():
            model.tau.copy_(original)


def test_constant_temperature_is_not_a_parameter():
    towers = dict(image_tower=nn.Identity(), text_tower=nn.Identity(), image_projection=nn.Linear(2, 2),
                  text_projection=nn.Linear(2, 2))
    constant = DualEncoder(**towers, temperature=TemperatureConfig(name="constant", value=0.02))
    tau = constant.temperature()
    assert tau.shape == (1,) and tau.dtype == torch.float32 and not tau.requires_grad
    assert tau.item() == pytest.approx(0.02)
    assert not any("tau" in name for name, _ in constant.named_parameters())
    assert not any("tau" in key for key in constant.state_dict())
    clamped = DualEncoder(**towers, temperature=TemperatureConfig(name="constant", value=0.9, min=0.01, max=0.5))
    assert clamped.temperature().item() == pytest.approx(0.5)


def test_trainable_false_freezes_the_tower_and_keeps_it_in_eval():
    cfg = tiny_cfg(image_encoder={"trainable": False})
    frozen = build_model(cfg.model, cfg.loss).train()
    assert not any(p.requires_grad for p in frozen.image_tower.parameters())
    assert all(p.requires_grad for p in frozen.text_tower.parameters())
    assert not frozen.image_tower.training and frozen.text_tower.training
    images, input_ids, attention_mask = batch()
    out = frozen(images=images, input_ids=input_ids, attention_mask=attention_mask)
    (out["image_embeds"] * out["text_embeds"]).sum().backward()
    assert all(p.grad is None for p in frozen.image_tower.parameters())
    assert frozen.image_projection.weight.grad is not None  # the head above a locked tower still learns
    assert any(p.grad is not None for p in frozen.text_tower.parameters())


class _LookupTextTower(nn.Module):
    """A text 'tower' whose hidden state is a fixed lookup of the ids, so pooling can be checked by hand."""

    def __init__(self):
        super().__init__()
        self.table = nn.Embedding(10, 2)
        with torch.no_grad():
            self.table.weight.copy_(torch.arange(20, dtype=torch.float32).reshape(10, 2))

    def forward(self, input_ids, attention_mask):
        return SimpleNamespace(last_hidden_state=self.table(input_ids))


@pytest.mark.parametrize("pooling,index,expected", [
    ("cls", 0, [[2.0, 3.0], [8.0, 9.0]]),  # row of id 1 and id 4
    ("cls", 1, [[4.0, 5.0], [10.0, 11.0]]),  # second token: ids 2 and 5
    # masked means: ids (1, 2) -> ((2+4)/2, (3+5)/2); ids (4, 5, 6) -> (10, 11)
    ("mean", 0, [[3.0, 4.0], [10.0, 11.0]]),
])
def test_pooling_hand_checked(pooling, index, expected):
    encoder = DualEncoder(nn.Identity(), _LookupTextTower(), nn.Identity(), nn.Identity(), TemperatureConfig(),
                          text_pooling=pooling, target_token_idx=index)
    input_ids = torch.tensor([[1, 2, 9], [4, 5, 6]])
    attention_mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert encoder.text_features(input_ids, attention_mask).tolist() == expected
    expected_t = torch.tensor(expected)
    assert torch.allclose(encoder.encode_text(input_ids, attention_mask),
                          expected_t / expected_t.norm(dim=-1, keepdim=True))


def test_image_side_mixup_mixes_pixels_of_this_batch(model):
    images, input_ids, attention_mask = batch()
    draw = MixupDraw(0.3, "image")
    mixed = model.encode_image(images, mixup=draw)
    by_hand = model.encode_image(0.3 * images + 0.7 * images.flip(0))
    assert torch.allclose(mixed, by_hand, atol=1e-6)
    assert not torch.allclose(mixed, model.encode_image(images), atol=1e-3)
    # a text-side draw leaves images alone, and an image-side draw leaves texts alone
    assert torch.equal(model.encode_image(images, mixup=MixupDraw(0.3, "text")), model.encode_image(images))
    assert torch.equal(model.encode_text(input_ids, attention_mask, mixup=draw),
                       model.encode_text(input_ids, attention_mask))


def test_text_side_mixup_mixes_projected_embeddings_before_normalising(model):
    _, input_ids, attention_mask = batch()
    draw = MixupDraw(0.8, "text")
    projected = model.text_projection(model.text_features(input_ids, attention_mask))
    mixed = 0.8 * projected + 0.2 * projected.flip(0)
    by_hand = mixed / mixed.norm(dim=-1, keepdim=True)
    assert torch.allclose(model.encode_text(input_ids, attention_mask, mixup=draw), by_hand, atol=1e-6)
    out = model(input_ids=input_ids, attention_mask=attention_mask, mixup=draw)
    assert torch.allclose(out["text_embeds"], by_hand, atol=1e-6)


def _count_calls(module):
    calls = []
    # a PRE-hook: non-reentrant checkpointing stops its recompute early, so post-hooks may not fire
    module.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls


def test_grad_checkpointing_gives_identical_gradients():
    torch.manual_seed(0)
    cfg = tiny_cfg()
    plain = build_model(cfg.model, cfg.loss).train()
    ckpt_cfg = tiny_cfg(image_encoder={"grad_checkpointing": True}, text_encoder={"grad_checkpointing": True})
    checkpointed = build_model(ckpt_cfg.model, ckpt_cfg.loss).train()
    checkpointed.load_state_dict(plain.state_dict())
    # hooks on modules INSIDE the checkpointed blocks (the recompute calls the block's function directly)
    image_block_calls = _count_calls(checkpointed.image_tower.blocks[0].mlp)
    text_layer_calls = _count_calls(checkpointed.text_tower.encoder.layer[0].intermediate)
    images, input_ids, attention_mask = batch()
    grads = []
    for net in (plain, checkpointed):
        torch.manual_seed(123)  # BERT dropout is on (p=0.1): the same stream for both, replayed by checkpointing
        out = net(images=images, input_ids=input_ids, attention_mask=attention_mask)
        ((out["image_embeds"] @ out["text_embeds"].t()).diag().sum() / out["temperature"]).sum().backward()
        grads.append({n: p.grad for n, p in net.named_parameters()})
    # each checkpointed block ran twice: forward, then recomputed in backward
    assert len(image_block_calls) == 2 and len(text_layer_calls) == 2
    for name, grad in grads[0].items():
        assert torch.allclose(grads[1][name], grad, rtol=1e-5, atol=1e-7), name


def test_mlp_projection():
    head = build_projection("mlp", 8, 4)
    assert [type(m) for m in head] == [nn.Linear, nn.GELU, nn.Linear]
    assert head(torch.randn(3, 8)).shape == (3, 4) and head[2].bias is None
    with pytest.raises(ValueError, match="unknown projection"):
        build_projection("complex", 8, 4)
    cfg = tiny_cfg(projection={"name": "mlp", "dim": 32})
    mlp_model = build_model(cfg.model, cfg.loss)
    images, input_ids, attention_mask = batch()
    assert mlp_model(images=images)["image_embeds"].shape == (4, 32)


def test_projection_trainable_flags():
    cfg = tiny_cfg(projection={"image_projector_trainable": False})
    net = build_model(cfg.model, cfg.loss)
    assert not net.image_projection.weight.requires_grad and net.text_projection.weight.requires_grad


# ---------------------------------------------------------------------------------------------- weights files


def _tiny_vit(**overrides):
    fields = copy.deepcopy(TINY_VIT)
    fields.update(overrides)
    return build_image_tower(ImageEncoderConfig(**fields))


def test_weights_file_by_name_ignores_a_classifier(tmp_path):
    torch.manual_seed(1)
    source, _, _ = _tiny_vit()
    state = dict(source.state_dict())
    state["head.weight"] = torch.randn(10, 64)  # a classifier the num_classes=0 tower does not have
    path = tmp_path / "vit.pth"
    torch.save({"state_dict": state}, path)
    torch.manual_seed(2)
    tower, width, report = _tiny_vit(pretrained=str(path))
    assert width == 64 and report.mode == "by_name" and report.ignored == ["head.weight"]
    for key, value in source.state_dict().items():
        assert torch.equal(tower.state_dict()[key], value), key


def test_weights_file_other_img_size_is_adapted_by_timm(tmp_path):
    torch.manual_seed(1)
    source, _, _ = _tiny_vit()
    path = tmp_path / "vit.safetensors"
    from safetensors.torch import save_file

    save_file(source.state_dict(), str(path))
    tower, _, report = _tiny_vit(pretrained=str(path), img_size=48)
    assert report.mode == "by_name_adapted" and report.adapted == ["pos_embed"]
    assert tower.pos_embed.shape == (1, 1 + 36, 64)
    assert torch.equal(tower.patch_embed.proj.weight, source.patch_embed.proj.weight)
    assert torch.equal(tower.pos_embed[0, 0], source.pos_embed[0, 0])  # the class token's embedding is kept


def test_weights_file_by_position_when_names_differ(tmp_path):
    torch.manual_seed(1)
    source, _, _ = _tiny_vit()
    renamed = {f"layer_{i:03d}": v for i, v in enumerate(source.state_dict().values())}
    renamed["zz_fc.weight"] = torch.zeros(5, 64)
    path = tmp_path / "renamed.pth"
    torch.save(renamed, path)
    tower, _, report = _tiny_vit(pretrained=str(path))
    assert report.mode == "by_position" and report.ignored == ["zz_fc.weight"]
    assert report.loaded == len(source.state_dict())
    for key, value in source.state_dict().items():
        assert torch.equal(tower.state_dict()[key], value), key


def test_weights_file_that_does_not_fit_is_refused(tmp_path):
    source, _, _ = _tiny_vit()
    shuffled = {f"w{i}": v for i, v in enumerate(reversed(list(source.state_dict().values())))}
    path = tmp_path / "bad.pth"
    torch.save(shuffled, path)
    with pytest.raises(ValueError, match="matching by position fails"):
        _tiny_vit(pretrained=str(path))
    with pytest.raises(FileNotFoundError, match="not found"):
        _tiny_vit(pretrained=str(tmp_path / "missing.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="weights-only"):
        _tiny_vit(pretrained=str(tmp_path / "junk.pth"))


def test_pretrained_true_reads_the_local_cache_only(tmp_path, monkeypatch):
    import huggingface_hub.constants
    from safetensors.torch import save_file

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch_hub"))
    with pytest.raises(FileNotFoundError, match="Nothing is downloaded"):
        _tiny_vit(pretrained=True)
    torch.manual_seed(3)
    source, _, _ = _tiny_vit()
    repo = source.pretrained_cfg["hf_hub_id"]
    folder = tmp_path / ("models--" + repo.replace("/", "--"))
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("0123abcd")
    (folder / "snapshots" / "0123abcd").mkdir(parents=True)
    save_file(source.state_dict(), str(folder / "snapshots" / "0123abcd" / "model.safetensors"))
    tower, _, report = _tiny_vit(pretrained=True)
    assert report.mode == "by_name" and report.source.endswith("model.safetensors")
    assert torch.equal(tower.pos_embed, source.pos_embed)


def test_build_errors_are_clear():
    with pytest.raises(ValueError, match="timm cannot build"):
        build_image_tower(ImageEncoderConfig(tag="no_such_model_xyz", pretrained=False))
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        build_text_tower(TextEncoderConfig(tag="no-such-org/no-such-model", pretrained=True))
    with pytest.raises(ValueError, match="pooling"):
        DualEncoder(nn.Identity(), nn.Identity(), nn.Identity(), nn.Identity(), TemperatureConfig(),
                    text_pooling="max")


def test_read_state_dict_strips_module_prefix(tmp_path):
    path = tmp_path / "ddp.pth"
    torch.save({"model": {"module.a": torch.ones(1), "module.b": torch.zeros(2)}}, path)
    assert sorted(read_state_dict(str(path))) == ["a", "b"]
    assert os.path.exists(path)


def test_paper_preset_refuses_to_download(tmp_path, monkeypatch):
    # vit_b16_bert_base wants ImageNet-21k ViT-B/16 and bert-base-uncased weights; with an empty cache it must
    # say so instead of fetching them
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch_hub"))
    cfg = config_from_dict({"model": {"arch": "vit_b16_bert_base"}})
    assert cfg.model.image_encoder.tag == "vit_base_patch16_224.augreg_in21k"
    with pytest.raises(FileNotFoundError, match="Nothing is downloaded"):
        build_model(cfg.model, cfg.loss)
