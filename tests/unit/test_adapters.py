"""LoRA adapters through peft (``model.*.lora``, ``zvl_ds.model.adapters``), in one process: the default targets of
every tower kind, what trains (with partial locking and the projections), wrong targets and a missing extra (exit 2),
peft's dropout on the global generator, whole-model weights into adapted towers, and the merge every export uses.

The checks against independent references: a model without adapters (an adapter whose B is zero changes nothing),
the arithmetic W + alpha / r * B A written out here, and peft's own forward for the merge.
"""
import sys

import pytest
import torch

import zvl_ds  # noqa: F401  (before transformers / open_clip)
from zvl_ds.base.errors import UserError
from zvl_ds.config import ConfigError, load_config
from zvl_ds.model.adapters import (adaptable_modules, base_names, frozen_base_sha256, is_adapter_parameter,
                                   merge_adapters)
from zvl_ds.model.build import build_model
from tools.tiny_checkpoints import write_tiny_hf_folder, write_tiny_open_clip_folder

pytest.importorskip("peft")
TINY_32 = ["model.arch=tiny", "transforms.input_size=32"]
SCALARS = ("tau", "logit_scale_log", "logit_bias")


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    folders = {kind: write_tiny_hf_folder(str(root / kind), kind) for kind in ("hf_clip", "hf_siglip")}
    if pytest.importorskip("open_clip"):
        folders["open_clip"] = write_tiny_open_clip_folder(str(root / "open_clip"))
    return folders


def source_overrides(kind, sources):
    if kind == "tiny":
        return list(TINY_32)
    if kind == "open_clip":
        return ["model.arch=open_clip", f"model.open_clip.name=local-dir:{sources[kind]}"]
    return [f"model.arch={kind}", f"model.hf_folder={sources[kind]}"]


def build(overrides, seed=0):
    cfg = load_config(None, overrides)
    torch.manual_seed(seed)
    return cfg, build_model(cfg.model, cfg.loss)


def probe(model, cfg, n=3):
    generator = torch.Generator().manual_seed(7)
    images = torch.randn(n, 3, 32, 32, generator=generator)
    input_ids = torch.randint(5, 250, (n, cfg.model.max_length), generator=generator)
    mask = torch.ones_like(input_ids)
    mask[0, 5:] = 0
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(input_ids * mask, mask)


def perturb_adapters(model, seed=1, scale=0.2):
    """Give every adapter matrix random values (peft starts B at zero, where an adapter changes nothing)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if is_adapter_parameter(name):
                param.copy_(scale * torch.randn(param.shape, generator=generator))


LORA = ["model.image_encoder.lora.r=4", "model.text_encoder.lora.r=2", "model.text_encoder.lora.alpha=3"]
# tower kind -> (image tower's adapted module suffixes, text tower's)
DEFAULTS = {"tiny": (("attn.qkv", "attn.proj"), ("attention.self.query", "attention.self.value")),
            "hf_clip": (("self_attn.q_proj", "self_attn.v_proj"),) * 2,
            "hf_siglip": (("self_attn.q_proj", "self_attn.v_proj"),) * 2,
            "open_clip": (("mlp.c_fc", "mlp.c_proj"),) * 2}


@pytest.mark.parametrize("kind", list(DEFAULTS))
def test_default_targets_and_what_trains(kind, sources):
    cfg, plain = build(source_overrides(kind, sources))
    _, model = build(source_overrides(kind, sources) + LORA)
    for tower, suffixes in zip(("image_tower", "text_tower"), DEFAULTS[kind]):
        adapted = model.adapted_modules[tower]
        layers = 2  # every tiny tower has 2 blocks
        assert sorted(adapted) == sorted(name for name in adaptable_modules(getattr(plain, tower))
                                         if name.endswith(suffixes))
        assert len(adapted) == layers * len(suffixes)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    adapters = {name for name in trainable if is_adapter_parameter(name)}
    assert adapters and all(".lora_A.default." in n or ".lora_B.default." in n for n in adapters)
    rest = trainable - adapters
    # besides the adapters: the projections (OpenCLIP's are parameters of its towers) and the temperature
    expected = {name for name, _ in plain.named_parameters()
                if name.startswith(("image_projection.", "text_projection.")) or name in SCALARS}
    if kind == "open_clip":
        expected |= {"image_tower.proj", "text_tower.text_projection"}
    assert rest == expected and expected & set(SCALARS) == ({"tau"} if kind in ("hf_clip", "open_clip") else
                                                            {"logit_scale_log", "logit_bias"} if kind == "hf_siglip"
                                                            else set())
    # rank and scale per tower: A is r x in, and peft's scale is alpha / r (alpha 2r by default)
    image_a = next(p for n, p in model.named_parameters() if n.startswith("image_tower") and ".lora_A." in n)
    text_a = next(p for n, p in model.named_parameters() if n.startswith("text_tower") and ".lora_A." in n)
    assert image_a.shape[0] == 4 and text_a.shape[0] == 2
    scales = {m.scaling["default"] for n, m in model.named_modules() if hasattr(m, "lora_A")
              and n.startswith("text_tower")}
    assert scales == {1.5}
    # B starts at zero: the adapted model embeds exactly as the model without adapters
    for ours, reference in zip(probe(model.eval(), cfg), probe(plain.eval(), cfg)):
        assert torch.equal(ours, reference)


def test_efficientnet_and_minilm_towers_of_the_cpu_recipe_have_defaults():
    cfg = load_config(None, ["model.image_encoder.tag=efficientnet_lite0", "model.image_encoder.pretrained=false",
                             "model.image_encoder.img_size=null", "model.text_encoder.tag=bert-base-uncased",
                             "model.text_encoder.pretrained=false", "model.text_encoder.config.model_type=bert",
                             "model.text_encoder.config.num_hidden_layers=1", "model.text_encoder.config.hidden_size=32",
                             "model.text_encoder.config.intermediate_size=64",
                             "model.text_encoder.config.num_attention_heads=2", *LORA])
    model = build_model(cfg.model, cfg.loss)
    image = model.adapted_modules["image_tower"]
    assert image and all(name.endswith((".conv_pw", ".conv_pwl")) for name in image)
    assert sorted(model.adapted_modules["text_tower"]) == ["encoder.layer.0.attention.self.query",
                                                           "encoder.layer.0.attention.self.value"]


def test_partial_locking_unlocks_groups_beside_the_adapters():
    _, model = build(TINY_32 + LORA + ["model.text_encoder.unlocked_layers=1", "model.text_encoder.freeze_layer_norm=true"])
    text = {name for name, p in model.text_tower.named_parameters() if p.requires_grad}
    own = {name for name in text if not is_adapter_parameter(name)}
    # the last encoder layer trains whole (its adapted query / value through their base layers), nothing before it
    last_layer = {name.replace(".base_layer.", ".") for name, _ in model.text_tower.named_parameters()
                  if name.startswith("encoder.layer.1.") and not is_adapter_parameter(name)}
    assert {name.replace(".base_layer.", ".") for name in own} == last_layer
    assert "encoder.layer.1.attention.self.query.base_layer.weight" in own
    assert any(name.startswith("encoder.layer.0.") for name in text - own)  # the adapters of layer 0 train
    image_own = [n for n, p in model.image_tower.named_parameters() if p.requires_grad and not is_adapter_parameter(n)]
    assert image_own == []  # no unlocked_groups: the image tower's own weights are all frozen


@pytest.mark.parametrize("overrides,message", [
    (["model.image_encoder.lora.target_modules=[q_proj]"],
     "'q_proj' matches no module of the tower; the VisionTransformer modules an adapter can go on"),
    (["model.image_encoder.lora.target_modules=[norm1]"], "'norm1' matches only modules an adapter cannot go on"),
])
def test_a_wrong_target_is_a_config_error_listing_the_modules(overrides, message):
    cfg = load_config(None, TINY_32 + ["model.image_encoder.lora.r=4"] + overrides)
    with pytest.raises(ConfigError) as raised:
        build_model(cfg.model, cfg.loss)
    text = str(raised.value)
    assert message in text
    for name in ("blocks.N.attn.qkv", "blocks.N.attn.proj", "blocks.N.mlp.fc1", "blocks.N.mlp.fc2"):
        assert name in text
    assert isinstance(raised.value, UserError)  # exit code 2 through zvl_ds.base.cli


def test_open_clip_attention_projection_is_refused_with_the_reason(sources):
    cfg = load_config(None, source_overrides("open_clip", sources) + ["model.text_encoder.lora.r=2",
                                                                       "model.text_encoder.lora.target_modules=[out_proj]"])
    with pytest.raises(ConfigError, match="reads directly, so an adapter there would never run"):
        build_model(cfg.model, cfg.loss)


@pytest.mark.parametrize("overrides,message", [
    (["model.image_encoder.lora.r=-1"], "lora.r: a rank >= 1"),
    (["model.image_encoder.lora.r=2", "model.image_encoder.lora.dropout=1.0"], "lora.dropout"),
    (["model.image_encoder.lora.r=2", "model.image_encoder.lora.target_modules=[]"], "an empty list adapts nothing"),
    (["model.text_encoder.lora.r=2", "model.text_encoder.trainable=false"], "a frozen tower trains no adapters"),
    (["model.image_encoder.lora.r=2", "model.image_encoder.lora.alpha=0"], "lora.alpha: must be > 0"),
])
def test_bad_lora_keys_are_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, TINY_32 + overrides)


def test_without_peft_a_config_with_lora_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft now raises ImportError
    cfg = load_config(None, TINY_32 + ["model.text_encoder.lora.r=2"])
    with pytest.raises(ConfigError, match=r"pip install -e \.\[peft\]"):
        build_model(cfg.model, cfg.loss)


def test_lora_dropout_draws_from_the_global_generator():
    cfg, model = build(TINY_32 + ["model.text_encoder.lora.r=4", "model.text_encoder.lora.dropout=0.5",
                                  "model.text_encoder.config.hidden_dropout_prob=0.0",
                                  "model.text_encoder.config.attention_probs_dropout_prob=0.0"])
    perturb_adapters(model)
    model.train()
    ids = torch.randint(5, 250, (4, cfg.model.max_length), generator=torch.Generator().manual_seed(3))
    state = torch.get_rng_state()
    with torch.no_grad():
        first = model.encode_text(ids)
        torch.set_rng_state(state)
        replayed = model.encode_text(ids)
        other = model.encode_text(ids)  # the generator moved on: other masks
    assert torch.equal(first, replayed)
    assert not torch.allclose(first, other)


@pytest.mark.parametrize("kind", list(DEFAULTS))
def test_merge_folds_each_adapter_into_its_weight(kind, sources):
    cfg, model = build(source_overrides(kind, sources) + LORA + ["model.image_encoder.lora.dropout=0.3"])
    _, plain = build(source_overrides(kind, sources))
    perturb_adapters(model)
    model.eval()
    unmerged = probe(model, cfg)
    layers = {name: module for name, module in model.named_modules() if hasattr(module, "lora_A")}
    expected = {}
    for name, layer in layers.items():  # W + alpha / r * B A, written out (a Linear's weight is out x in)
        lora_a, lora_b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        delta = (lora_b.flatten(1) @ lora_a.flatten(1)).reshape(layer.base_layer.weight.shape)
        expected[f"{name}.weight"] = layer.base_layer.weight.detach() + layer.scaling["default"] * delta.detach()
    merge_adapters(model)
    assert set(model.state_dict()) == set(plain.state_dict())  # the names of a model without adapters
    state = model.state_dict()
    for key, value in expected.items():
        assert torch.allclose(state[key], value, atol=1e-6), key
    worst = max(float((a - b).abs().max()) for a, b in zip(probe(model, cfg), unmerged))
    print(f"{kind}: merged vs unmerged embeddings, max |diff| {worst:.1e}")
    assert worst <= 1e-5 and any(float((a - b).abs().max()) > 1e-3 for a, b in zip(unmerged, probe(plain.eval(), cfg)))


def test_whole_model_weights_go_into_the_adapted_modules_base_layers(tmp_path):
    from safetensors.torch import save_file

    from zvl_ds.model.init_weights import load_whole_model

    _, plain = build(TINY_32, seed=4)
    path = str(tmp_path / "weights.safetensors")
    save_file({k: v.contiguous() for k, v in plain.state_dict().items()}, path)
    _, model = build(TINY_32 + LORA, seed=9)
    from zvl_ds.model.weights_files import read_state_dict

    report = load_whole_model(model, read_state_dict(path), "model.pretrained", path)
    assert report.missing == [] and report.unexpected == []  # the adapters keep their start, unreported
    state = model.state_dict()
    for key, value in plain.state_dict().items():
        assert torch.equal(base_names({key: value}, model).popitem()[1], value)
        assert torch.equal(state[next(iter(base_names({key: value}, model)))], value), key


def test_base_hash_covers_exactly_the_frozen_tensors():
    _, model = build(TINY_32 + LORA, seed=0)
    digest, count = frozen_base_sha256(model)
    assert count == sum(1 for p in model.parameters() if not p.requires_grad)
    _, same = build(TINY_32 + LORA, seed=0)
    with torch.no_grad():  # a trainable tensor changing (training) leaves the base as it was
        same.get_parameter("image_projection.weight").add_(1.0)
        next(p for n, p in same.named_parameters() if ".lora_A." in n).add_(1.0)
    assert frozen_base_sha256(same)[0] == digest
    with torch.no_grad():  # one frozen value changing is another base
        next(p for p in same.parameters() if not p.requires_grad).view(-1)[0] += 1e-3
    assert frozen_base_sha256(same)[0] != digest
