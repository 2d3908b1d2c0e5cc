"""LAVIS's model options: ``model.model_type`` variants of a preset, and whole-model weights
(``model.load_pretrained`` / ``model.pretrained``, ``model.load_finetuned`` / ``model.finetuned``) loaded by
zvl_ds.model.init_weights with shape checks and a report of missing and unexpected tensors."""
import logging
import os

import pytest
import torch
from safetensors.torch import save_file

from zvl_ds.config import ConfigError, config_from_dict
from zvl_ds.config.compat import LAVIS_MODEL_COUNTERPARTS
from zvl_ds.config.reference import config_keys
from zvl_ds.model.init_weights import InitWeightsError, initialise_from_config, load_whole_model, read_source
from zvl_ds.config.presets import DEFAULT_VARIANT, MODEL_PRESETS, MODEL_VARIANTS

LEARNED_TEMPERATURE = {"temperature": {"name": "parameter", "value": 0.05}}


def tiny_config(**model_keys):
    return config_from_dict({"model": {"arch": "tiny", **model_keys}, "loss": LEARNED_TEMPERATURE})


def tiny_model(seed, **model_keys):
    from zvl_ds.model.build import build_model

    cfg = tiny_config(**model_keys)
    torch.manual_seed(seed)
    return build_model(cfg.model, cfg.loss)


def cloned_state(model):
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


# -------------------------------------------------------------------------------------------------- model_type


def model_source_keys(arch, folder):
    """The keys naming a model source (model.arch hf_clip / hf_siglip / open_clip): a tiny one without weights."""
    from zvl_ds.config.presets import SOURCE_ARCHS
    from tools.tiny_checkpoints import write_tiny_hf_folder, write_tiny_open_clip_folder

    if arch not in SOURCE_ARCHS:
        return {}
    if arch == "open_clip":
        pytest.importorskip("open_clip")
        return {"open_clip": {"name": f"local-dir:{write_tiny_open_clip_folder(str(folder), weights=False)}"}}
    return {"hf_folder": write_tiny_hf_folder(str(folder), arch, weights=False)}


@pytest.mark.parametrize("arch", sorted(MODEL_VARIANTS))
def test_every_variant_overlays_its_keys_on_the_preset(arch, tmp_path):
    assert DEFAULT_VARIANT[arch] in MODEL_VARIANTS[arch] and set(MODEL_VARIANTS) == set(MODEL_PRESETS)
    source = model_source_keys(arch, tmp_path / arch)
    for variant, overlay in MODEL_VARIANTS[arch].items():
        model = config_from_dict({"model": {"arch": arch, "model_type": variant, **source}}).to_dict()["model"]
        assert model["model_type"] == variant

        def check(expected, got, path):  # every key the variant sets, else the preset's value
            for key, value in expected.items():
                if isinstance(value, dict) and key != "config":
                    check(value, got[key], f"{path}.{key}")
                else:
                    assert got[key] == value, (arch, variant, f"{path}.{key}")

        preset_then_variant = {**MODEL_PRESETS[arch]}
        for key, value in overlay.items():
            if isinstance(value, dict):
                merged = dict(preset_then_variant.get(key, {}))
                for sub, sub_value in value.items():
                    merged[sub] = ({**merged.get(sub, {}), **sub_value} if isinstance(sub_value, dict)
                                   else sub_value)
                preset_then_variant[key] = merged
            else:
                preset_then_variant[key] = value
        check(preset_then_variant, model, "model")


def test_tiny_patch4_variant_and_default_variant():
    patch4 = tiny_config(model_type="patch4").model
    assert patch4.image_encoder.kwargs["patch_size"] == MODEL_VARIANTS["tiny"]["patch4"]["image_encoder"]["kwargs"][
        "patch_size"] == 4
    assert patch4.image_encoder.kwargs["depth"] == MODEL_PRESETS["tiny"]["image_encoder"]["kwargs"]["depth"]
    default = tiny_config().model
    assert default.model_type == DEFAULT_VARIANT["tiny"]
    assert default.image_encoder.kwargs["patch_size"] == MODEL_PRESETS["tiny"]["image_encoder"]["kwargs"]["patch_size"]
    # explicit keys win over the variant
    explicit = tiny_config(model_type="patch4", image_encoder={"kwargs": {"patch_size": 16}}).model
    assert explicit.image_encoder.kwargs["patch_size"] == 16


def test_unknown_variant_names_the_arch_and_the_variants():
    with pytest.raises(ConfigError) as caught:
        tiny_config(model_type="patch2")
    message = str(caught.value)
    assert "model.model_type" in message and "model.arch=tiny" in message and "'patch2'" in message
    assert all(variant in message for variant in MODEL_VARIANTS["tiny"])
    assert "did you mean 'patch4'" in message


def test_model_type_without_arch_is_refused():
    with pytest.raises(ConfigError, match=r"model.model_type='base' without model.arch.*set model.arch"):
        config_from_dict({"model": {"model_type": "base"}})


def test_model_type_written_as_a_number_is_a_name():
    with pytest.raises(ConfigError, match=r"invalid choice '384'"):
        config_from_dict({"model": {"arch": "vit_b16_bert_base", "model_type": 384}})


# -------------------------------------------------------------------------------------------------- config checks


@pytest.mark.parametrize("key", sorted(LAVIS_MODEL_COUNTERPARTS))
def test_lavis_model_keys_without_a_counterpart_name_the_zvl_ds_key(key):
    with pytest.raises(ConfigError) as caught:
        config_from_dict({"model": {"arch": "tiny", key: 1}})
    message = str(caught.value)
    assert message.startswith(f"unknown config key model.{key}")
    assert f"model.{key} is a LAVIS model option that zvl_ds does not read: use {LAVIS_MODEL_COUNTERPARTS[key]}" \
        in message
    # the counterpart is a real key of the schema, or an entry of one of its mappings (image_encoder.kwargs)
    named = LAVIS_MODEL_COUNTERPARTS[key].split()[0]
    keys = {k for k, _ in config_keys()}
    assert named in keys or (named.rsplit(".", 1)[0] in keys and named.rsplit(".", 1)[0].endswith("kwargs")), named


def test_an_unknown_model_key_that_is_not_lavis_gets_no_lavis_hint():
    with pytest.raises(ConfigError) as caught:
        config_from_dict({"model": {"queue_sizes": 1}})
    assert "LAVIS" not in str(caught.value)


@pytest.mark.parametrize("url", ["http://example.com/model.safetensors", "https://example.com/m",
                                 "s3://bucket/model", "hf://org/name", "hf-hub:org/name"])
@pytest.mark.parametrize("switch,key", [("load_pretrained", "pretrained"), ("load_finetuned", "finetuned")])
def test_urls_are_refused(url, switch, key):
    with pytest.raises(ConfigError, match=rf"model.{key}=.*nothing is downloaded"):
        tiny_config(**{switch: True, key: url})
    with pytest.raises(InitWeightsError, match="nothing is downloaded"):
        read_source(url, f"model.{key}")


@pytest.mark.parametrize("switch,key", [("load_pretrained", "pretrained"), ("load_finetuned", "finetuned")])
def test_load_switch_without_a_source_is_refused(switch, key):
    with pytest.raises(ConfigError, match=rf"model.{switch}=true but model.{key} is not set"):
        tiny_config(**{switch: True})


def test_evaluating_finetuned_weights_and_a_resume_checkpoint_is_refused():
    with pytest.raises(ConfigError, match="give the weights to evaluate one way"):
        config_from_dict({"evaluate": True, "resume_ckpt_path": "out/run", "model": {
            "arch": "tiny", "load_finetuned": True, "finetuned": "exported"}})
    # training from finetuned weights and resuming is a normal run: the resume wins, checked by the trainer
    config_from_dict({"resume_ckpt_path": "out/run", "model": {"arch": "tiny", "load_finetuned": True,
                                                               "finetuned": "exported"}})


# -------------------------------------------------------------------------------------------------- loading


def test_single_safetensors_file_loads_every_tensor_exactly(tmp_path):
    source = tiny_model(1)
    path = str(tmp_path / "weights.safetensors")
    save_file(cloned_state(source), path)
    cfg = tiny_config(load_pretrained=True, pretrained=path)
    target = tiny_model(2)
    assert not torch.equal(target.image_projection.weight, source.image_projection.weight)
    report = initialise_from_config(target, cfg)
    assert report.loaded == len(source.state_dict()) and not report.missing and not report.unexpected
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key
    # the learnable temperature is a weight like the others
    assert float(target.tau.detach()) == float(source.tau.detach())


def test_exported_model_folder_loads_exactly(tmp_path):
    from zvl_ds.data import load_tokenizer
    from zvl_ds.export.model_folder import write_model_folder

    cfg = tiny_config()
    source = tiny_model(3)
    with torch.no_grad():
        source.tau.fill_(0.031)  # not the configured 0.05: the value must come from the folder
    folder = write_model_folder(str(tmp_path / "exported"), cfg, source, load_tokenizer(cfg.model.text_encoder),
                                {"run_dir": "test", "tag": "none"})
    target = tiny_model(4)
    report = initialise_from_config(target, tiny_config(load_finetuned=True, finetuned=folder))
    assert report.config_key == "model.finetuned" and not report.missing and not report.unexpected
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key
    assert float(target.temperature().detach()) == pytest.approx(0.031)


def test_finetuned_wins_over_pretrained(tmp_path):
    first, second = tiny_model(5), tiny_model(6)
    save_file(cloned_state(first), str(tmp_path / "pretrained.safetensors"))
    save_file(cloned_state(second), str(tmp_path / "finetuned.safetensors"))
    cfg = tiny_config(load_pretrained=True, pretrained=str(tmp_path / "pretrained.safetensors"),
                      load_finetuned=True, finetuned=str(tmp_path / "finetuned.safetensors"))
    target = tiny_model(7)
    initialise_from_config(target, cfg)
    assert torch.equal(target.text_projection.weight, second.text_projection.weight)
    assert not torch.equal(target.text_projection.weight, first.text_projection.weight)


def test_nothing_selected_loads_nothing():
    target = tiny_model(8)
    before = cloned_state(target)
    assert initialise_from_config(target, tiny_config(pretrained="unused/while/load_pretrained/is/false")) is None
    assert all(torch.equal(target.state_dict()[k], v) for k, v in before.items())


def test_shape_mismatch_names_the_key_and_both_shapes(tmp_path):
    source = tiny_model(9, projection={"dim": 32})
    target = tiny_model(10)
    before = cloned_state(target)
    with pytest.raises(InitWeightsError) as caught:
        load_whole_model(target, cloned_state(source), "model.pretrained", "src")
    message = str(caught.value)
    assert "model.pretrained=src" in message and "2 tensor(s)" in message
    assert "image_projection.weight: (32, 64) in the source, (64, 64) in the model" in message
    assert "text_projection.weight: (32, 64) in the source, (64, 64) in the model" in message
    assert all(torch.equal(target.state_dict()[k], v) for k, v in before.items()), "nothing may be loaded"


def test_missing_and_unexpected_tensors_are_reported_and_the_rest_loaded_exactly(caplog):
    source, target = tiny_model(11), tiny_model(12)
    before = cloned_state(target)
    state = cloned_state(source)
    dropped = sorted(k for k in state if k.startswith("text_projection") or k == "tau")
    for key in dropped:
        del state[key]
    state["classifier.weight"] = torch.zeros(3, 64)
    state["classifier.bias"] = torch.zeros(3)
    with caplog.at_level(logging.INFO, logger="zvl_ds"):
        report = load_whole_model(target, state, "model.pretrained", "partial.safetensors")
    assert report.missing == [k for k in before if k in dropped] and len(report.missing) == len(dropped) == 2
    assert sorted(report.unexpected) == ["classifier.bias", "classifier.weight"]
    assert report.loaded == len(before) - 2
    text = caplog.text
    assert "2 model tensor(s) missing from the source keep their initial values: " in text
    assert all(key in text for key in dropped)
    assert "2 tensor(s) of the source are not in the model and were ignored: classifier.weight, classifier.bias" in text
    assert report.summary() in text
    after = target.state_dict()
    for key, value in state.items():
        if key in after:
            assert torch.equal(after[key], value), key
    for key in dropped:
        assert torch.equal(after[key], before[key]), key


def test_a_source_without_any_model_tensor_is_refused(tmp_path):
    tower_only = {f"blocks.0.{k}": v for k, v in tiny_model(13).image_tower.state_dict().items()}
    with pytest.raises(InitWeightsError, match=r"none of its \d+ tensors .* model.image_encoder.pretrained"):
        load_whole_model(tiny_model(14), tower_only, "model.pretrained", "tower.safetensors")


def test_bad_sources_give_clear_errors(tmp_path):
    with pytest.raises(InitWeightsError, match=r"model.pretrained: .*nope does not exist"):
        read_source(str(tmp_path / "nope"), "model.pretrained")
    (tmp_path / "plain").mkdir()
    with pytest.raises(InitWeightsError, match=r"neither an exported model folder .* run folder .* checkpoint"):
        read_source(str(tmp_path / "plain"), "model.finetuned")
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(InitWeightsError, match=r"model.pretrained: "):
        read_source(str(tmp_path / "broken.safetensors"), "model.pretrained")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "latest").write_text("step_00000002")
    with pytest.raises(InitWeightsError, match=r"model.pretrained: .*step_00000002"):
        read_source(str(tmp_path / "run"), "model.pretrained")


def test_pickled_code_in_a_weights_file_is_not_run(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = str(tmp_path / "evil.pt")
    torch.save({"image_projection.weight": torch.zeros(64, 64), "x": Payload()}, path)
    with pytest.raises(InitWeightsError, match="weights-only"):
        read_source(path, "model.pretrained")
    assert not marker.exists()


def test_exported_config_of_a_run_with_these_keys_loads_back(tmp_path):
    """An exported folder records the model section; the preset, its variant and the weights sources are merged or
    spent, so it must load without them."""
    from zvl_ds.data import load_tokenizer
    from zvl_ds.export.model_folder import write_model_folder
    from zvl_ds.model.inference import load_model

    cfg = tiny_config(model_type="patch4", load_pretrained=True, pretrained=str(tmp_path / "gone"))
    from zvl_ds.model.build import build_model

    model = build_model(cfg.model, cfg.loss)
    folder = write_model_folder(str(tmp_path / "exported"), cfg, model, load_tokenizer(cfg.model.text_encoder),
                                {"run_dir": "test", "tag": "none"})
    loaded = load_model(folder)
    assert loaded.config.model.image_encoder.kwargs["patch_size"] == 4
    assert loaded.config.model.model_type is None and not loaded.config.model.load_pretrained
