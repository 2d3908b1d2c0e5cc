"""The distillation teacher: the ``distill:`` keys and their refusals, each kind of teacher loaded frozen with its own
preprocessing and tokenizer, the refusals of a teacher (exit code 2, naming the problem), its identity on resume,
and the loader's second view and second tokenization."""
import json
import os

import pytest
import torch

from tests.helpers.data_fixtures import make_config, sample_members, write_tar
from zvl_ds.base.checksums import file_sha256
from zvl_ds.base.errors import UserError
from zvl_ds.config import ConfigError, load_config
from zvl_ds.data import TeacherInputs, build_train_loader, load_tokenizer
from zvl_ds.data.transforms import ImageTransform, resize_down, scaled_train_transforms
from zvl_ds.model.teacher import TeacherError, check_teacher_identity, load_teacher

STUDENT = ["model.arch=tiny", "transforms.random_resize_crop.size=32"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny teacher of every accepted kind."""
    from tools.tiny_checkpoints import write_tiny_open_clip_folder, write_tiny_teacher_folder
    from zvl_ds.export.model_folder import write_model_folder
    from zvl_ds.model.build import build_model

    root = tmp_path_factory.mktemp("teachers")
    cfg = load_config(None, STUDENT + ["transforms.input_size=32", "transforms.resize.size=36",
                                       "transforms.center_crop.size=32", "loss.temperature.value=0.04"])
    torch.manual_seed(0)
    zvl = write_model_folder(str(root / "zvl"), cfg, build_model(cfg.model, cfg.loss),
                             load_tokenizer(cfg.model.text_encoder), {"run": "test"})
    return {"zvl_ds": zvl, "hf_clip": write_tiny_teacher_folder(str(root / "clip"), "hf_clip"),
            "hf_siglip": write_tiny_teacher_folder(str(root / "siglip"), "hf_siglip"),
            "open_clip": write_tiny_open_clip_folder(str(root / "open_clip")), "root": str(root)}


def teacher_of(name, *extra):
    cfg = load_config(None, STUDENT + [f"distill.teacher={name}", *extra])
    return load_teacher(cfg, torch.device("cpu"), torch.float32)


# ------------------------------------------------------------------------------------------------ the config keys


@pytest.mark.parametrize("overrides,message", [
    (["distill.weight=2"], "distill.weight is set but distill.teacher is not"),
    (["distill.source=stored"], "distill.source is set but distill.teacher is not"),
    (["distill.teacher=T", "loss.name=MixUpNCE"], "MixUpNCE"),
    (["distill.teacher=T", "distill.weight=0"], "distill.weight=0"),
    (["distill.teacher=T", "distill.weight=-1"], "distill.weight: must be >= 0"),
    (["distill.teacher=T", "distill.contrastive_weight=-0.5"], "distill.contrastive_weight: must be >= 0"),
    (["distill.teacher=T", "distill.scale=0"], "distill.scale: must be > 0"),
    (["distill.teacher=T", "distill.bias=-10"], "SigLIP students only"),
    (["distill.teacher=T", "distill.sigmoid_target=mobileclip2"], "a softmax student distils"),
    (["distill.teacher=T", "runner.name=clip", "loss.nce_loss.gather_backward=false"], "gather_backward"),
    (["distill.teacher= "], "distill.teacher: empty"),
    (["distill.teacher=T", "distill.source=offline"], "distill.source"),
    (["distill.teacher=T", "distill.sigmoid_target=kl"], "distill.sigmoid_target"),
])
def test_config_refusals_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, STUDENT + overrides)


def test_distillation_is_off_by_default_and_the_keys_resolve():
    assert not load_config(None, STUDENT).distill.enabled
    cfg = load_config(None, STUDENT + ["distill.teacher=/models/t", "distill.contrastive_weight=0",
                                       "distill.scale=50", "loss.name=SigLIP", "loss.temperature.name=constant",
                                       "distill.bias=-5", "distill.sigmoid_target=mobileclip2", "distill.source=stored"])
    assert cfg.distill.enabled and cfg.distill.contrastive_weight == 0 and cfg.distill.sigmoid_target == "mobileclip2"
    assert cfg.distill.source == "stored"
    # the default sigmoid target is the binary cross-entropy against the teacher's probabilities (the term)
    assert load_config(None, STUDENT + ["distill.teacher=T"]).distill.sigmoid_target == "bce"
    # the teacher is not read when the config loads: a saved config stays readable after the teacher has moved
    assert cfg.to_dict()["distill"]["teacher"] == "/models/t"


# ------------------------------------------------------------------------------------------------ loading teachers


@pytest.mark.parametrize("kind,size,length,scale", [("zvl_ds", 32, 16, 1 / 0.04), ("hf_clip", 48, 20, 20.0),
                                                    ("open_clip", 32, 16, 20.0)])
def test_every_kind_of_teacher_loads_frozen_with_its_own_inputs(folders, kind, size, length, scale):
    name = f"local-dir:{folders[kind]}" if kind == "open_clip" else folders[kind]
    teacher = teacher_of(name)
    assert teacher.identity["kind"] == kind and teacher.identity["teacher"] == name
    assert teacher.identity["sha256"] == file_sha256(teacher.identity["weights"])
    assert teacher.image_size == size and teacher.max_length == length
    assert teacher.scale == pytest.approx(scale, rel=1e-5) and teacher.bias is None  # a softmax student: no bias
    assert not teacher.module.training and not any(p.requires_grad for p in teacher.module.parameters())
    ids = torch.full((2, length), 5)
    out = teacher.model(images=torch.zeros(2, 3, size, size), input_ids=ids, attention_mask=torch.ones_like(ids))
    assert torch.allclose(out["image_embeds"].norm(dim=1), torch.ones(2))


def test_an_open_clip_folder_given_as_a_path_is_read_as_local_dir(folders):
    assert teacher_of(folders["open_clip"]).identity["kind"] == "open_clip"


def test_teacher_has_its_own_tokenizer_and_normalisation(folders):
    teacher = teacher_of(folders["hf_clip"])
    student = load_tokenizer(load_config(None, STUDENT).model.text_encoder)
    caption = "two red circles on the left"
    assert teacher.tokenizer(caption)["input_ids"] != student(caption)["input_ids"]
    assert teacher.normalize.mean == [0.48, 0.46, 0.41]


def test_sigmoid_teacher_scale_and_bias_are_its_own_unless_set(folders):
    siglip = ["loss.name=SigLIP", "loss.temperature.name=constant"]
    own = teacher_of(folders["hf_siglip"], *siglip)
    assert (own.scale, own.bias) == (pytest.approx(8.0), pytest.approx(-6.0))
    fixed = teacher_of(folders["hf_siglip"], *siglip, "distill.scale=12", "distill.bias=-4")
    assert (fixed.scale, fixed.bias) == (12.0, -4.0)
    with pytest.raises(TeacherError, match="no logit bias"):
        teacher_of(folders["hf_clip"], *siglip)
    assert teacher_of(folders["hf_clip"], *siglip, "distill.bias=-10").bias == -10.0


def test_loading_a_teacher_leaves_the_random_stream_alone(folders):
    torch.manual_seed(5)
    teacher_of(folders["hf_clip"])
    after = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(torch.rand(3), after)


def _remote_code_folder(folders):
    folder = os.path.join(folders["root"], "remote")
    if not os.path.isdir(folder):
        import shutil

        shutil.copytree(folders["hf_clip"], folder)
        path = os.path.join(folder, "config.json")
        config = json.load(open(path))
        config["auto_map"] = {"AutoModel": "modeling_evil.EvilModel"}
        json.dump(config, open(path, "w"))
    return folder


def _without_weights(folders):
    folder = os.path.join(folders["root"], "no_weights")
    if not os.path.isdir(folder):
        import shutil

        shutil.copytree(folders["hf_clip"], folder)
        os.remove(os.path.join(folder, "model.safetensors"))
    return folder


@pytest.mark.parametrize("make,extra,message", [
    (lambda f: "/no/such/teacher", [], "no such local folder"),
    (lambda f: "openai/clip-vit-base-patch32", [], "hub names are refused"),
    (lambda f: "hf-hub:timm/ViT-B-16-SigLIP", [], "nothing is downloaded"),
    (lambda f: "ViT-B-32", [], "distill.pretrained"),
    (lambda f: "ViT-B-32", ["distill.pretrained=/no/such/file.safetensors"], "distill.pretrained=.* not a local file"),
    (lambda f: "local-dir:/no/such/folder", [], "not a local folder"),
    (lambda f: f["root"], [], "not a model folder"),
    (lambda f: os.path.join(f["hf_clip"], "config.json"), [], "a file, not a model folder"),
    (_without_weights, [], "no weights file"),
    (_remote_code_folder, [], "trust_remote_code"),
])
def test_teacher_refusals_name_the_problem_and_exit_2(folders, make, extra, message):
    with pytest.raises(UserError, match=message) as raised:  # UserError: the entry points exit with code 2
        teacher_of(make(folders), *extra)
    assert "distill.teacher=" in str(raised.value)


def test_a_zvl_ds_folder_with_a_missing_file_is_refused(folders):
    import shutil

    broken = os.path.join(folders["root"], "zvl_broken")
    shutil.copytree(folders["zvl_ds"], broken)
    shutil.rmtree(os.path.join(broken, "tokenizer"))
    with pytest.raises(UserError, match="missing tokenizer"):
        teacher_of(broken)


def test_a_run_resumes_only_with_its_own_teacher():
    first = {"teacher": "/a/teacher", "kind": "hf_clip", "weights": "/a/teacher/model.safetensors", "sha256": "ab"}
    moved = dict(first, teacher="/b/teacher", weights="/b/teacher/model.safetensors")
    check_teacher_identity(first, moved, "run/step_1")  # the same weights elsewhere
    check_teacher_identity(None, None, "run/step_1")  # no distillation either time
    for saved, current in ((first, dict(first, sha256="cd")), (None, first), (first, None)):
        with pytest.raises(TeacherError, match="cannot resume run/step_1"):
            check_teacher_identity(saved, current, "run/step_1")


# ------------------------------------------------------------------------------------------------ the two views


def test_resize_down_never_up_and_leaves_the_own_size_alone():
    images = torch.rand(2, 3, 48, 48)
    assert resize_down(images, 48) is images
    expected = torch.nn.functional.interpolate(images, size=(32, 32), mode="bilinear", antialias=True)
    assert torch.equal(resize_down(images, 32), expected)
    with pytest.raises(ValueError, match="without upsampling"):
        resize_down(images, 64)


def test_scaled_transforms_draw_the_same_crop_at_another_size():
    """The 48 px crop resized down to 32 px is the 32 px crop, up to resampling: the same box from the same random
    numbers, and the random stream left in the same state."""
    import io
    import random

    import numpy as np
    from PIL import Image

    cfg = load_config(None, STUDENT + ["transforms.train_transforms=[random_resize_crop]",
                                       "transforms.random_resize_crop.scale=[0.3,0.6]"])
    ramp = np.linspace(0, 255, 120, dtype=np.float32)
    pixels = np.stack([ramp[None, :].repeat(90, 0), ramp[:90, None].repeat(120, 1), 255 - ramp[None, :].repeat(90, 0)],
                      axis=-1).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    small = ImageTransform(cfg.transforms.train_transforms, cfg.transforms)
    large = ImageTransform(cfg.transforms.train_transforms, scaled_train_transforms(cfg.transforms, 48))
    assert (small.size, large.size) == (32, 48)
    for seed in range(5):
        rng_small, rng_large = random.Random(seed), random.Random(seed)
        view = torch.from_numpy(np.array(small(buffer.getvalue(), rng_small))).permute(2, 0, 1).float()
        big = torch.from_numpy(np.array(large(buffer.getvalue(), rng_large))).permute(2, 0, 1).float()
        made = resize_down(big[None], 32)[0]
        assert float((made - view).abs().mean()) < 2.0  # grey levels of 255: resampling, not another crop
        assert rng_small.random() == rng_large.random()
    cfg = load_config(None, STUDENT + ["transforms.train_transforms=[resize,center_crop]", "transforms.resize.size=36",
                                       "transforms.center_crop.size=32"])
    scaled = scaled_train_transforms(cfg.transforms, 48)
    assert (scaled.resize.size, scaled.center_crop.size) == (54, 48) and cfg.transforms.resize.size == 36


def _shards(root):
    folder = os.path.join(root, "flat")
    os.makedirs(folder)
    captions = ["a red circle", "two blue squares on the left", "a small green triangle", "one large red square"]
    members = [m for i in range(8) for m in sample_members(f"s{i:03d}", i, [captions[i % 4]], [i], "flat", "train",
                                                            seed=i)]
    write_tar(os.path.join(folder, "train-000000.tar"), members)
    json.dump({"train-000000.tar": 8}, open(os.path.join(folder, "sizes.json"), "w"))


def test_the_loader_hands_over_the_larger_view_and_the_teachers_tokens(tmp_path, folders):
    _shards(str(tmp_path))
    cfg = make_config(str(tmp_path), batch_size=4, extra={"model.max_length": 16,
                                                          "transforms.random_resize_crop.size": 32})
    student = load_tokenizer(cfg.model.text_encoder)
    teacher = teacher_of(folders["hf_clip"])
    plain = next(iter(build_train_loader(cfg, 0, 1, student)))
    batch = next(iter(build_train_loader(cfg, 0, 1, student, TeacherInputs(48, teacher.tokenizer, 20))))
    assert plain.images.shape[-1] == 32 and batch.images.shape[-1] == 48 and plain.teacher_input_ids is None
    assert batch.keys == plain.keys and torch.equal(batch.input_ids, plain.input_ids)  # the same samples, captions
    assert batch.teacher_input_ids.shape == (4, 20)
    for own, theirs in zip(batch.input_ids, batch.teacher_input_ids):
        assert student.decode(own, skip_special_tokens=True) == teacher.tokenizer.decode(theirs,
                                                                                         skip_special_tokens=True)
