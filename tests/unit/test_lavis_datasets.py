"""LAVIS's ``datasets:`` block: processors onto transforms and caption keys, storage onto shard locations, refusals."""
import copy

import pytest

from zvl_ds.config import ConfigError, config_from_dict
from zvl_ds.config.lavis_datasets import IMAGE_PROCESSORS, TEXT_PROCESSORS
from zvl_ds.config.reference import lavis_datasets_markdown

# CLIP's statistics as LAVIS's processors default to them (written out here, not imported)
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def load(datasets, **extra):
    return config_from_dict({"datasets": datasets, **extra})


def coco(**entry):
    return {"coco_retrieval": entry}


def test_blip_processors_and_caption_map_onto_our_keys():
    cfg = load(coco(vis_processor={"train": {"name": "blip_image_train", "image_size": 384},
                                   "eval": {"name": "blip_image_eval", "image_size": 384}},
                    text_processor={"train": {"name": "blip_caption", "prompt": "a picture of ", "max_words": 30},
                                    "eval": {"name": "blip_caption"}}))
    t = cfg.transforms
    assert t.train_transforms == ["random_resize_crop", "autoaug"]
    assert t.random_resize_crop.size == 384 and t.random_resize_crop.scale == [0.5, 1.0]
    assert t.input_size == 384
    assert t.valid_transforms == ["resize"] and t.resize.size == 384
    assert t.normalize.mean == CLIP_MEAN and t.normalize.std == CLIP_STD
    assert (t.caption_train.clean, t.caption_train.max_words, t.caption_train.prompt) == (True, 30, "a picture of ")
    assert (t.caption_eval.clean, t.caption_eval.max_words, t.caption_eval.prompt) == (True, 50, "")


def test_clip_processors_with_their_own_options():
    own = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    cfg = load(coco(vis_processor={"train": {"name": "clip_image_train", "image_size": 64, "min_scale": 0.8, **own},
                                   "eval": {"name": "clip_image_eval", "image_size": 64, **own}}))
    t = cfg.transforms
    assert t.train_transforms == ["random_resize_crop"]
    assert t.random_resize_crop.size == 64 and t.random_resize_crop.scale == [0.8, 1.0] and t.input_size == 64
    assert t.valid_transforms == ["resize", "center_crop"] and t.resize.size == 64 and t.center_crop.size == 64
    assert t.normalize.mean == [0.5, 0.5, 0.5] and t.normalize.std == [0.25, 0.25, 0.25]


def test_clip_train_defaults_to_lavis_sizes():
    cfg = load(coco(vis_processor={"train": {"name": "clip_image_train"}}))
    assert cfg.transforms.random_resize_crop.size == 224 and cfg.transforms.random_resize_crop.scale == [0.9, 1.0]
    assert cfg.transforms.valid_transforms == ["resize", "center_crop"]  # our default: the eval slot was not given


def test_without_a_block_nothing_changes():
    plain = config_from_dict({})
    assert plain.transforms.caption_train.clean is False and plain.transforms.caption_eval.prompt == ""
    assert plain.transforms.caption_eval.max_words is None
    assert plain.data.train_name == ["sbu", "cc3m"] and plain.data.datasets == {}


@pytest.mark.parametrize("kind, slot, accepted", [
    ("vis_processor", "train", ["blip_image_train", "blip_image_eval", "clip_image_train", "clip_image_eval"]),
    ("text_processor", "eval", ["blip_caption"]),
])
def test_unknown_processor_name_is_refused_with_the_accepted_ones(kind, slot, accepted):
    with pytest.raises(ConfigError) as error:
        load(coco(**{kind: {slot: {"name": "alpro_video_train"}}}))
    message = str(error.value)
    assert f"datasets.coco_retrieval.{kind}.{slot}.name" in message and "alpro_video_train" in message
    for name in accepted:
        assert name in message


def test_missing_processor_name_lists_the_accepted_ones():
    with pytest.raises(ConfigError, match=r"vis_processor\.train\.name: missing.*blip_image_train"):
        load(coco(vis_processor={"train": {"image_size": 224}}))


@pytest.mark.parametrize("entry, path", [
    ({"vis_processor": {"train": {"name": "blip_image_train", "nmae": 1}}},
     "datasets.coco_retrieval.vis_processor.train.nmae"),
    ({"vis_processor": {"trian": {"name": "blip_image_train"}}}, "datasets.coco_retrieval.vis_processor.trian"),
    ({"txt_processor": {}}, "datasets.coco_retrieval.txt_processor"),
    ({"text_processor": {"train": {"name": "blip_caption", "max_word": 3}}},
     "datasets.coco_retrieval.text_processor.train.max_word"),
    ({"build_info": {"image": {"storage": "x"}}}, "datasets.coco_retrieval.build_info.image"),
    ({"build_info": {"images": {"storge": "x"}}}, "datasets.coco_retrieval.build_info.images.storge"),
])
def test_unknown_keys_are_named_by_path_with_close_matches(entry, path):
    with pytest.raises(ConfigError, match="unknown config key " + path.replace(".", r"\.")) as error:
        load(coco(**entry))
    assert "did you mean" in str(error.value)


@pytest.mark.parametrize("options, message", [
    ({"image_size": "big"}, r"vis_processor\.train\.image_size: expected a whole number"),
    ({"image_size": 0}, r"vis_processor\.train\.image_size"),
    ({"min_scale": 0.9, "max_scale": 0.5}, "min_scale=0.9 is above max_scale=0.5"),
    ({"min_scale": 1.5}, r"vis_processor\.train\.min_scale: expected a fraction"),
    ({"mean": [0.5, 0.5]}, r"vis_processor\.train\.mean: expected three numbers"),
])
def test_bad_processor_options_are_named_by_their_lavis_path(options, message):
    with pytest.raises(ConfigError, match=message):
        load(coco(vis_processor={"train": {"name": "blip_image_train", **options}}))


def test_bad_caption_options_are_refused():
    with pytest.raises(ConfigError, match=r"text_processor\.train\.max_words: expected a whole number of words"):
        load(coco(text_processor={"train": {"name": "blip_caption", "max_words": 0}}))
    with pytest.raises(ConfigError, match=r"transforms\.caption_eval\.max_words: must be >= 1"):
        config_from_dict({"transforms": {"caption_eval": {"max_words": 0}}})


def test_datasets_whose_processors_disagree_are_refused_naming_both():
    with pytest.raises(ConfigError) as error:
        load({"coco": {"vis_processor": {"train": {"name": "blip_image_train", "image_size": 384}}},
              "flickr": {"vis_processor": {"train": {"name": "blip_image_train", "image_size": 224}}}})
    message = str(error.value)
    assert "datasets.coco.vis_processor.train" in message and "datasets.flickr.vis_processor.train" in message
    assert "384" in message and "224" in message and "must agree" in message


def test_datasets_with_different_captions_are_refused():
    with pytest.raises(ConfigError, match="text_processor.train.*text_processor.train"):
        load({"coco": {"text_processor": {"train": {"name": "blip_caption", "prompt": "a picture of "}}},
              "flickr": {"text_processor": {"train": {"name": "blip_caption"}}}})


def test_train_and_eval_processors_must_agree_on_normalisation():
    with pytest.raises(ConfigError, match="normalize.mean"):
        load(coco(vis_processor={"train": {"name": "blip_image_train"},
                                 "eval": {"name": "blip_image_eval", "mean": [0.5, 0.5, 0.5]}}))


def test_datasets_that_agree_are_accepted_and_all_used():
    same = {"vis_processor": {"train": {"name": "clip_image_train", "image_size": 96}}}
    cfg = load({"coco": copy.deepcopy(same), "flickr": copy.deepcopy(same)})
    assert cfg.transforms.random_resize_crop.size == 96
    assert cfg.data.train_name == ["coco", "flickr"] and cfg.data.valid_name == ["coco", "flickr"]


def test_a_value_given_also_as_our_key_must_be_equal():
    entry = coco(vis_processor={"train": {"name": "blip_image_train", "image_size": 384}})
    agreeing = load(entry, transforms={"random_resize_crop": {"size": 384}})
    assert agreeing.transforms.random_resize_crop.size == 384
    with pytest.raises(ConfigError) as error:
        load(entry, transforms={"random_resize_crop": {"size": 224}})
    message = str(error.value)
    assert "datasets.coco_retrieval.vis_processor.train" in message
    assert "transforms.random_resize_crop.size=384" in message and "224" in message


def test_our_dataset_names_win_over_the_blocks():
    cfg = load(coco(), data={"train_name": ["cc3m"], "valid_name": ["coco_retrieval"]})
    assert cfg.data.train_name == ["cc3m"] and cfg.data.valid_name == ["coco_retrieval"]


def test_no_validation_names_without_validation_splits():
    cfg = load(coco(), run={"valid_splits": []})
    assert cfg.data.train_name == ["coco_retrieval"] and cfg.data.valid_name == []


@pytest.mark.parametrize("storage, key", [
    ("/data/shards/coco_retrieval", "folder"),
    ("shards/coco_retrieval/", "folder"),
    ("/data/coco/train-{000000..000009}.tar", "shards"),
    ("/data/coco/*.tar", "shards"),
    ("/data/coco/shards.txt", "shards"),
    ("https://example.invalid/coco-{0..3}.tar", "shards"),
    ("/data/a.tar::/data/b.tar", "shards"),
])
def test_storage_maps_to_a_shard_folder_or_a_shard_spec(storage, key):
    cfg = load(coco(build_info={"images": {"storage": storage}}))
    source = cfg.data.datasets["coco_retrieval"]
    assert getattr(source, key) == storage
    assert getattr(source, "shards" if key == "folder" else "folder") == ""


@pytest.mark.parametrize("storage", ["/data/coco/annotations/coco_karpathy_train.json", "/data/coco/train.CSV",
                                     "/data/cc.jsonl"])
def test_annotation_files_as_storage_are_refused_with_the_make_shards_hint(storage):
    with pytest.raises(ConfigError) as error:
        load(coco(build_info={"images": {"storage": storage}}))
    message = str(error.value)
    assert "datasets.coco_retrieval.build_info.images.storage" in message and "zvl_ds.make_shards" in message


def test_annotations_entry_is_refused_with_the_make_shards_hint():
    annotations = {"train": {"url": "https://example.invalid/a.json", "storage": "coco/annotations/train.json"}}
    with pytest.raises(ConfigError, match=r"build_info\.annotations: .*zvl_ds\.make_shards"):
        load(coco(build_info={"annotations": annotations, "images": {"storage": "/data/coco/images"}}))


@pytest.mark.parametrize("storage", ["", 3, None])
def test_empty_or_non_text_storage_is_refused(storage):
    with pytest.raises(ConfigError, match=r"build_info\.images\.storage: expected a shard folder"):
        load(coco(build_info={"images": {"storage": storage}}))


def test_storage_conflicting_with_our_own_shards_key_is_refused():
    with pytest.raises(ConfigError, match="conflicts with data.datasets.coco_retrieval.shards"):
        load(coco(build_info={"images": {"storage": "/a/*.tar"}}),
             data={"datasets": {"coco_retrieval": {"shards": "/b/*.tar"}}})


def test_shards_and_folder_together_are_refused():
    with pytest.raises(ConfigError, match=r"data\.datasets\.coco: give its shards one way"):
        config_from_dict({"data": {"datasets": {"coco": {"shards": "/a/*.tar", "folder": "/a"}}}})


def test_other_data_types_and_block_shapes_are_refused():
    with pytest.raises(ConfigError, match=r"datasets\.msrvtt\.data_type: invalid choice 'videos'"):
        load({"msrvtt": {"data_type": "videos"}})
    with pytest.raises(ConfigError, match="datasets: must be a mapping"):
        load(["coco"])
    with pytest.raises(ConfigError, match=r"datasets\.coco\.vis_processor: expected a mapping"):
        load({"coco": {"vis_processor": "blip_image_train"}})


def test_lavis_yaml_with_run_and_datasets_blocks_loads(tmp_path):
    from zvl_ds.config import load_config

    path = tmp_path / "lavis.yaml"
    path.write_text(
        "model: {arch: tiny}\n"
        "run: {task: retrieval, valid_splits: [valid], init_lr: 1.0e-4}\n"
        "datasets:\n"
        "  coco_retrieval:\n"
        "    vis_processor:\n"
        "      train: {name: clip_image_train, image_size: 32}\n"
        "      eval: {name: clip_image_eval, image_size: 32}\n"
        "    text_processor:\n"
        "      train: {name: blip_caption, prompt: 'a picture of ', max_words: 30}\n"
        "      eval: {name: blip_caption}\n"
        "    build_info:\n"
        "      images: {storage: /data/shards/coco_retrieval}\n")
    cfg = load_config(str(path), ["data.batch_size=8"])
    assert cfg.data.datasets["coco_retrieval"].folder == "/data/shards/coco_retrieval"
    assert cfg.data.valid_splits == ["valid"] and cfg.optim.lr.init == 1e-4
    assert cfg.transforms.caption_train.prompt == "a picture of " and cfg.transforms.center_crop.size == 32


def test_generated_table_lists_every_processor_with_its_defaults():
    table = lavis_datasets_markdown()
    for kind, processors in (("vis_processor", IMAGE_PROCESSORS), ("text_processor", TEXT_PROCESSORS)):
        for name, processor in processors.items():
            rows = [line for line in table.splitlines() if f"`{kind}: {{name: {name}}}`" in line]
            assert len(rows) == 1, name
            for option in processor.defaults:
                assert f"`{option}: " in rows[0], (name, option)
    for key in ("vis_processor.train", "vis_processor.eval", "text_processor.train", "text_processor.eval",
                "build_info.images.storage", "build_info.annotations"):
        assert f"`datasets.<name>.{key}`" in table
