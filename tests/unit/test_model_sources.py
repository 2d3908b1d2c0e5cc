"""Hugging Face CLIP / SigLIP folders and OpenCLIP models as model sources (model.arch hf_clip, hf_siglip,
open_clip): embeddings equal the original library's before any step, the scale (and bias) are the checkpoint's,
the folder sets the tokenizer and preprocessing, bad sources are refused by name, and the towers' blocks take
freezing, layer decay and gradient checkpointing. Tiny random checkpoints are written to tmp folders."""
import json
import logging
import math
import os
import shutil

import pytest
import torch
import torch.nn.functional as F

import zvl_ds  # noqa: F401  (before transformers / open_clip)
from zvl_ds.config import ConfigError, load_config
from zvl_ds.data import load_tokenizer, tokenize
from zvl_ds.model.build import build_model
from tools.tiny_checkpoints import (CLIP_TEMPERATURE, IMAGE_SIZE, MEAN, SIGLIP_BIAS, SIGLIP_SCALE, STD,
                                           write_tiny_hf_folder, write_tiny_open_clip_folder)
from zvl_ds.runtime.optim import layer_decay_scales

CAPTIONS = ["a red circle", "two blue squares on a green field", "a yellow triangle", "an orange star"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    return {kind: write_tiny_hf_folder(str(root / kind), kind) for kind in ("hf_clip", "hf_siglip")}


def hf_source(kind, folder, *overrides):
    cfg = load_config(None, [f"model.arch={kind}", f"model.hf_folder={folder}", *overrides])
    torch.manual_seed(0)
    return cfg, build_model(cfg.model, cfg.loss).eval()


def images(n=4, size=IMAGE_SIZE):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def features(output):
    """transformers 5 returns get_*_features as an output object (projected features in pooler_output)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def max_difference(a, b):
    return float((a - b).abs().max())


@pytest.mark.parametrize("kind", ["hf_clip", "hf_siglip"])
def test_embeddings_equal_transformers_before_any_step(folders, kind):
    from transformers import CLIPModel, SiglipModel

    cfg, model = hf_source(kind, folders[kind])
    library = (CLIPModel if kind == "hf_clip" else SiglipModel).from_pretrained(folders[kind], dtype=torch.float32)
    library.eval()
    tokenizer = load_tokenizer(cfg.model.text_encoder)
    input_ids, attention_mask = tokenize(tokenizer, CAPTIONS, cfg.model.max_length)
    pixels = images()
    with torch.no_grad():
        ours_image = model.encode_image(pixels)
        ours_text = model.encode_text(input_ids, attention_mask)
        theirs_image = F.normalize(features(library.get_image_features(pixel_values=pixels)), dim=-1)
        # CLIP: the tokenizer's mask (causal anyway); SigLIP: every token, pads included, as it was trained
        mask = attention_mask if kind == "hf_clip" else None
        theirs_text = F.normalize(features(library.get_text_features(input_ids=input_ids, attention_mask=mask)),
                                  dim=-1)
    image_diff, text_diff = max_difference(ours_image, theirs_image), max_difference(ours_text, theirs_text)
    print(f"{kind}: max |image embedding diff| {image_diff:.2e}, max |text embedding diff| {text_diff:.2e}")
    assert image_diff <= 1e-5 and text_diff <= 1e-5
    assert ours_text.std(dim=0).max() > 1e-3  # the captions embed differently: a real comparison
    if kind == "hf_clip":
        assert float(model.temperature().detach()) == pytest.approx(math.exp(-float(library.logit_scale.detach())), rel=1e-6)
        assert float(model.temperature().detach()) == pytest.approx(CLIP_TEMPERATURE, rel=1e-6)
    else:
        scale, bias = model.logit_scale_bias().tolist()
        assert scale == pytest.approx(math.exp(float(library.logit_scale.detach())), rel=1e-6)
        assert bias == pytest.approx(float(library.logit_bias.detach()), rel=1e-6)
        assert (scale, bias) == pytest.approx((SIGLIP_SCALE, SIGLIP_BIAS), rel=1e-5)


def test_open_clip_embeddings_equal_open_clip_before_any_step(tmp_path):
    open_clip = pytest.importorskip("open_clip")
    folder = write_tiny_open_clip_folder(str(tmp_path / "oc"))
    cfg = load_config(None, ["model.arch=open_clip", f"model.open_clip.name=local-dir:{folder}"])
    model = build_model(cfg.model, cfg.loss).eval()
    library = open_clip.create_model(f"local-dir:{folder}").eval()
    library_tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    input_ids, attention_mask = tokenize(load_tokenizer(cfg.model.text_encoder), CAPTIONS, cfg.model.max_length)
    assert torch.equal(input_ids, library_tokenizer(CAPTIONS))  # OpenCLIP's own tokens
    pixels = images()
    with torch.no_grad():
        image_diff = max_difference(model.encode_image(pixels), library.encode_image(pixels, normalize=True))
        text_diff = max_difference(model.encode_text(input_ids, attention_mask),
                                   library.encode_text(input_ids, normalize=True))
    print(f"open_clip: max |image embedding diff| {image_diff:.2e}, max |text embedding diff| {text_diff:.2e}")
    assert image_diff <= 1e-5 and text_diff <= 1e-5
    assert float(model.temperature().detach()) == pytest.approx(math.exp(-float(library.logit_scale.detach())), rel=1e-6)


def test_the_folder_sets_tokenizer_preprocessing_and_loss_unless_the_config_does(folders):
    cfg = load_config(None, ["model.arch=hf_clip", f"model.hf_folder={folders['hf_clip']}"])
    resolved = cfg.to_dict()  # what the run records as its config.yaml
    assert resolved["model"]["text_encoder"]["tokenizer"] == folders["hf_clip"]
    assert resolved["model"]["max_length"] == 16
    assert resolved["transforms"]["normalize"] == {"mean": MEAN, "std": STD}
    assert resolved["transforms"]["valid_transforms"] == ["resize", "center_crop"]
    assert resolved["transforms"]["center_crop"]["size"] == IMAGE_SIZE == resolved["transforms"]["input_size"]
    assert resolved["loss"]["temperature"]["name"] == "parameter"
    siglip = load_config(None, ["model.arch=hf_siglip", f"model.hf_folder={folders['hf_siglip']}"])
    assert siglip.loss.name == "SigLIP" and siglip.transforms.valid_transforms == ["resize"]
    explicit = load_config(None, ["model.arch=hf_clip", f"model.hf_folder={folders['hf_clip']}",
                                  "model.max_length=8", "transforms.normalize.mean=[0.1,0.2,0.3]"])
    assert explicit.model.max_length == 8 and explicit.transforms.normalize.mean == [0.1, 0.2, 0.3]
    assert explicit.transforms.normalize.std == STD


def test_wrong_sources_are_refused_by_name(folders, tmp_path):
    with pytest.raises(ConfigError, match=r"model_type 'clip' is not 'siglip'.*use model.arch=hf_clip"):
        load_config(None, ["model.arch=hf_siglip", f"model.hf_folder={folders['hf_clip']}"])
    with pytest.raises(ConfigError, match="not a local folder"):
        load_config(None, ["model.arch=hf_clip", "model.hf_folder=openai/clip-vit-base-patch16"])
    with pytest.raises(ConfigError, match="needs model.hf_folder"):
        load_config(None, ["model.arch=hf_clip"])
    for missing in ("config.json", "preprocessor_config.json", "tokenizer.json"):
        broken = shutil.copytree(folders["hf_clip"], tmp_path / missing)
        os.remove(broken / missing)
        if missing == "tokenizer.json":
            os.remove(broken / "tokenizer_config.json")
            missing = "the tokenizer files"
        with pytest.raises(ConfigError, match=f"missing {missing}"):
            load_config(None, ["model.arch=hf_clip", f"model.hf_folder={broken}"])
    remote = shutil.copytree(folders["hf_clip"], tmp_path / "remote")
    config = json.loads((remote / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "modeling_evil.EvilModel"}
    (remote / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="auto_map.*trust_remote_code"):
        load_config(None, ["model.arch=hf_clip", f"model.hf_folder={remote}"])
    with pytest.raises(ConfigError, match="model.hf_folder is set but model.arch='tiny'"):
        load_config(None, ["model.arch=tiny", f"model.hf_folder={folders['hf_clip']}"])
    with pytest.raises(ConfigError, match="hub names are refused"):
        load_config(None, ["model.arch=open_clip", "model.open_clip.name=hf-hub:timm/ViT-B-16-SigLIP"])


def test_a_temperature_outside_the_clamp_range_is_refused(folders):
    with pytest.raises(ConfigError, match=r"checkpoint's temperature .* = 0\.05.*loss\.temperature\.min=0\.1"):
        hf_source("hf_clip", folders["hf_clip"], "loss.temperature.min=0.1", "loss.temperature.value=0.2")


def test_a_folder_without_weights_builds_random_weights_and_says_so(tmp_path, caplog):
    folder = write_tiny_hf_folder(str(tmp_path / "no_weights"), "hf_clip", weights=False)
    assert not os.path.exists(os.path.join(folder, "model.safetensors"))
    with caplog.at_level(logging.WARNING):
        _, model = hf_source("hf_clip", folder)
    assert "RANDOM weights" in caplog.text
    assert torch.isfinite(model.encode_image(images(2))).all()


def test_weights_that_do_not_fit_the_config_are_refused(folders, tmp_path):
    from safetensors.torch import load_file, save_file

    broken = shutil.copytree(folders["hf_clip"], tmp_path / "partial")
    state = load_file(broken / "model.safetensors")
    save_file({k: v for k, v in state.items() if "layers.1." not in k}, broken / "model.safetensors")
    with pytest.raises(ConfigError, match=r"does not fit the folder's config.json: \d+ missing"):
        hf_source("hf_clip", broken)


def test_freezing_layer_decay_and_gradient_checkpointing_on_library_blocks(folders):
    cfg, model = hf_source("hf_clip", folders["hf_clip"], "model.image_encoder.trainable=false",
                           "model.text_encoder.grad_checkpointing=true", "optim.layer_decay.text_tower=0.5",
                           "optim.layer_decay.image_tower=0.5")
    assert not any(p.requires_grad for p in model.image_tower.parameters())
    assert model.text_tower.is_gradient_checkpointing
    scales = layer_decay_scales(model, cfg.optim)
    # 2 blocks: embeddings 0.5 ** 3, block 0 0.5 ** 2, block 1 0.5, the final norm 1
    assert scales["text_tower.embeddings.token_embedding.weight"] == 0.125
    assert scales["text_tower.encoder.layers.0.mlp.fc1.weight"] == 0.25
    assert scales["text_tower.encoder.layers.1.mlp.fc1.weight"] == 0.5
    assert scales["text_tower.final_layer_norm.weight"] == 1.0
    assert scales["image_tower.pre_layrnorm.weight"] == 0.125
    model.train()
    ids, mask = tokenize(load_tokenizer(cfg.model.text_encoder), CAPTIONS, cfg.model.max_length)
    loss = (model.encode_text(ids, mask) * model.encode_image(images())).sum()
    loss.backward()
    assert all(p.grad is None for p in model.image_tower.parameters())
    assert model.text_tower.encoder.layers[0].mlp.fc1.weight.grad.abs().sum() > 0


def test_open_clip_blocks_take_layer_decay(tmp_path):
    pytest.importorskip("open_clip")
    folder = write_tiny_open_clip_folder(str(tmp_path / "oc"))
    cfg = load_config(None, ["model.arch=open_clip", f"model.open_clip.name=local-dir:{folder}",
                             "optim.layer_decay.image_tower=0.5", "optim.layer_decay.text_tower=0.5"])
    model = build_model(cfg.model, cfg.loss)
    scales = layer_decay_scales(model, cfg.optim)
    assert scales["image_tower.conv1.weight"] == 0.125
    assert scales["image_tower.transformer.resblocks.1.mlp.c_fc.weight"] == 0.5
    assert scales["text_tower.token_embedding.weight"] == 0.125
    assert scales["text_tower.transformer.resblocks.0.attn.in_proj_weight"] == 0.25
    assert scales["text_tower.ln_final.weight"] == 1.0


def test_open_clip_sources_are_refused_by_name(tmp_path):
    pytest.importorskip("open_clip")
    folder = write_tiny_open_clip_folder(str(tmp_path / "oc"), weights=False)
    source = ["model.arch=open_clip", f"model.open_clip.name=local-dir:{folder}"]
    with pytest.raises(ConfigError, match="caption_aug.enable=true with model.arch=open_clip"):
        load_config(None, source + ["transforms.caption_aug.enable=true"])
    with pytest.raises(ConfigError, match="not an OpenCLIP architecture"):
        load_config(None, ["model.arch=open_clip", "model.open_clip.name=ViT-Nonexistent"])
    with pytest.raises(ConfigError, match="pretrained tags are refused"):
        load_config(None, ["model.arch=open_clip", "model.open_clip.name=ViT-B-32", "model.open_clip.pretrained=openai"])
    os.remove(os.path.join(folder, "open_clip_config.json"))
    with pytest.raises(ConfigError, match="missing open_clip_config.json"):
        load_config(None, source)
