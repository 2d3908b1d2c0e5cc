"""Image transforms, normalisation, tokeniser loading, tokenisation and caption augmentation."""
import io
import os
import random

import numpy as np
import pytest
import torch
from tests.helpers.data_fixtures import image_bytes
from tests.helpers.paths import REPO_ROOT
from PIL import Image

from zvl_ds.config import CaptionAugConfig, NormalizeConfig, TextEncoderConfig, TransformsConfig
from zvl_ds.data import load_tokenizer
from zvl_ds.data import normalize_images
from zvl_ds.data import tokenize
from zvl_ds.data.transforms import (CaptionAugmenter, ImageTransform, TransformError, limit_pieces_per_word,
                                    random_resized_crop_box, to_uint8_chw)

ASSETS = os.path.join(REPO_ROOT, "zvl_ds", "assets")


def cfg(**sizes):
    c = TransformsConfig()
    c.resize.size, c.center_crop.size = sizes.get("resize", 36), sizes.get("crop", 32)
    c.random_resize_crop.size, c.random_resize_crop.scale = sizes.get("rrc", 24), [0.5, 1.0]
    return c


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(TextEncoderConfig(tag="unused-name", tokenizer="zvl_ds:demo_tokenizer"))


@pytest.mark.parametrize("names,size", [(["random_resize_crop"], 24), (["random_resize_crop", "autoaug"], 24),
                                        (["resize", "center_crop"], 32), (["resize"], 36),
                                        (["center_crop", "normalize"], 32), (["autoaug", "resize"], 36)])
def test_outputs_are_fixed_size_uint8(names, size):
    transform = ImageTransform(names, cfg())
    assert transform.size == size
    for seed, shape in enumerate([(50, 40), (40, 60), (300, 200)]):
        out = to_uint8_chw(transform(image_bytes(seed, shape), random.Random(seed)))
        assert out.dtype == torch.uint8 and tuple(out.shape) == (3, size, size)


def test_grayscale_and_png_inputs_become_rgb():
    gray = io.BytesIO()
    Image.new("L", (30, 30), 77).save(gray, format="JPEG")
    png = io.BytesIO()
    Image.new("RGBA", (30, 30), (1, 2, 3, 4)).save(png, format="PNG")
    for data in (gray.getvalue(), png.getvalue()):
        image = ImageTransform(["resize"], cfg(resize=8))(data, random.Random(0))
        assert image.mode == "RGB" and image.size == (8, 8)


def test_resize_and_center_crop_match_hand_computation():
    data = image_bytes(3, (50, 40), fmt="PNG")  # lossless, so the reference sees the same pixels
    source = Image.open(io.BytesIO(data)).convert("RGB")
    out = ImageTransform(["resize", "center_crop"], cfg(resize=36, crop=20))(data, random.Random(0))
    resized = np.asarray(source.resize((36, 36), Image.BILINEAR))
    np.testing.assert_array_equal(np.asarray(out), resized[8:28, 8:28])
    padded = ImageTransform(["center_crop"], cfg(crop=60))(data, random.Random(0))  # larger than the image
    expected = np.zeros((60, 60, 3), np.uint8)
    expected[10:50, 5:55] = np.asarray(source)
    np.testing.assert_array_equal(np.asarray(padded), expected)


def test_random_resized_crop_box_follows_scale_and_ratio():
    rng = random.Random(1)
    for _ in range(300):
        left, top, w, h = random_resized_crop_box(200, 150, (0.3, 0.9), rng)
        assert 0 <= left and left + w <= 200 and 0 <= top and top + h <= 150
        assert 0.3 * 30000 * 0.9 <= w * h <= 0.9 * 30000 * 1.1  # rounding slack
        assert 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1
    # an impossible target falls back to the largest central crop within the ratio range
    assert random_resized_crop_box(100, 10, (1.0, 1.0), random.Random(0)) == (43, 0, 13, 10)


def test_random_resize_crop_is_the_crop_of_its_box():
    data = image_bytes(5, (64, 48), fmt="PNG")
    out = ImageTransform(["random_resize_crop"], cfg(rrc=16))(data, random.Random(9))
    left, top, w, h = random_resized_crop_box(64, 48, (0.5, 1.0), random.Random(9))
    source = Image.open(io.BytesIO(data)).convert("RGB")
    expected = source.resize((16, 16), Image.BILINEAR, box=(left, top, left + w, top + h))
    np.testing.assert_array_equal(np.asarray(out), np.asarray(expected))


def test_randomness_comes_only_from_the_given_rng():
    data = image_bytes(1, (80, 64))
    transform = ImageTransform(["random_resize_crop", "autoaug"], cfg())
    outs = []
    for seed in (4, 4, 5):
        torch.manual_seed(12345 + len(outs))  # the global state must not matter
        outs.append(np.asarray(transform(data, random.Random(seed))))
    np.testing.assert_array_equal(outs[0], outs[1])
    assert not np.array_equal(outs[0], outs[2])


def test_unknown_or_sizeless_transform_lists_are_errors():
    with pytest.raises(TransformError, match="unknown transform 'blur'"):
        ImageTransform(["resize", "blur"], cfg())
    with pytest.raises(TransformError, match="varying size"):
        ImageTransform(["autoaug", "normalize"], cfg())


def test_normalize_images_against_hand_computation():
    images = torch.tensor([[[[0, 255]], [[51, 102]], [[128, 7]]]], dtype=torch.uint8)  # [1, 3, 1, 2]
    norm = NormalizeConfig(mean=[0.5, 0.25, 0.0], std=[0.5, 0.2, 2.0])
    expected = torch.tensor([[[[(0 / 255 - 0.5) / 0.5, (1 - 0.5) / 0.5]],
                              [[(51 / 255 - 0.25) / 0.2, (102 / 255 - 0.25) / 0.2]],
                              [[(128 / 255) / 2.0, (7 / 255) / 2.0]]]])
    out = normalize_images(images, norm, "cpu")
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    half = normalize_images(images, norm, torch.device("cpu"), torch.bfloat16)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), expected, rtol=1e-2, atol=1e-2)
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        normalize_images(images[0], norm, "cpu")


def test_demo_tokenizer_loads_and_pads(tokenizer):
    vocab = open(os.path.join(ASSETS, "demo_tokenizer", "vocab.txt"), encoding="utf-8").read().split("\n")
    ids, mask = tokenize(tokenizer, ["A dog", "a dog " * 20], max_length=10)
    assert ids.dtype == torch.long and mask.dtype == torch.long and ids.shape == mask.shape == (2, 10)
    cls, sep, pad = (vocab.index(t) for t in ("[CLS]", "[SEP]", "[PAD]"))
    assert ids[0].tolist() == [cls, vocab.index("a"), vocab.index("dog"), sep] + [pad] * 6
    assert mask[0].tolist() == [1] * 4 + [0] * 6
    assert ids[1, -1].item() == sep and mask[1].sum().item() == 10  # truncated, [SEP] kept
    with pytest.raises(OSError, match="no-such-tokenizer.*nothing is downloaded"):
        load_tokenizer(TextEncoderConfig(tag="no-such-tokenizer"))
    with pytest.raises(FileNotFoundError, match="no packaged folder"):
        load_tokenizer(TextEncoderConfig(tokenizer="zvl_ds:nothing_here"))


def test_caption_augmentation_rules(tokenizer):
    caption = "a dog running on the grass"
    off = CaptionAugmenter(CaptionAugConfig(select_prob=0.0), tokenizer)
    assert off(caption, random.Random(0)) == caption
    mask_all = CaptionAugmenter(CaptionAugConfig(select_prob=1.0, mask_prob=1.0, random_prob=0.0,
                                                 delete_prob=0.0), tokenizer)
    pieces = tokenizer.tokenize(caption)
    assert tokenizer.tokenize(mask_all(caption, random.Random(0))) == ["[MASK]"] * len(pieces)
    delete_all = CaptionAugmenter(CaptionAugConfig(select_prob=1.0, mask_prob=0.0, random_prob=0.0,
                                                   delete_prob=1.0), tokenizer)
    assert delete_all(caption, random.Random(0)) == ""
    random_all = CaptionAugmenter(CaptionAugConfig(select_prob=1.0, mask_prob=0.0, random_prob=1.0,
                                                   delete_prob=0.0), tokenizer)
    replaced = random_all(caption, random.Random(3))
    assert "[" not in replaced and replaced != caption
    assert limit_pieces_per_word(["q", "##u", "##i", "##c", "a", "##b"], 3) == ["q", "##u", "##i", "a", "##b"]
    # ZeroVL's default: about 10% masked, 2% random, 8% deleted
    default = CaptionAugmenter(CaptionAugConfig(max_pieces_per_word=100), tokenizer)
    rng = random.Random(0)
    text = "a dog on the grass " * 40
    n = len(tokenizer.tokenize(text))
    masked = sum(tokenizer.tokenize(default(text, rng)).count("[MASK]") for _ in range(50))
    assert abs(masked / (50 * n) - 0.10) < 0.02
    with pytest.raises(ValueError, match="must be <= 1"):
        CaptionAugmenter(CaptionAugConfig(mask_prob=0.6, random_prob=0.3, delete_prob=0.4), tokenizer)


# --------------------------------------------------------------------------------------------------
# Caption preparation (LAVIS's blip_caption)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("caption, expected", [
    ("A Dog running on the BEACH.", "a dog running on the beach"),
    ('He said "hi!" (twice)', "he said hi twice"),
    ("one*two#three:four;five~six", "one two three four five six"),
    ("keeps, commas - and 'quotes' & ?", "keeps, commas - and 'quotes' & ?"),
    ("  spaced    out \t words\n", "spaced out words"),
    ("...!!!", ""),
])
def test_caption_cleaning_cases(caption, expected):
    from zvl_ds.config import CaptionTextConfig
    from zvl_ds.data.transforms import prepare_caption

    assert prepare_caption(caption, CaptionTextConfig(clean=True)) == expected


def test_caption_max_words_and_prompt():
    from zvl_ds.config import CaptionTextConfig
    from zvl_ds.data.transforms import prepare_caption

    caption = "A man, riding a Horse: on the beach at sunset."
    assert prepare_caption(caption, CaptionTextConfig(clean=True, max_words=4)) == "a man, riding a"
    assert (prepare_caption(caption, CaptionTextConfig(clean=True, max_words=3, prompt="a picture of "))
            == "a picture of a man, riding")
    assert prepare_caption("two words", CaptionTextConfig(clean=True, max_words=50)) == "two words"
    # without cleaning: words are cut as written, case and punctuation kept
    assert prepare_caption("Big. Red! Car", CaptionTextConfig(max_words=2)) == "Big. Red!"
    assert prepare_caption("Big. Red! Car", CaptionTextConfig(prompt="photo: ")) == "photo: Big. Red! Car"


def test_caption_preparer_is_none_by_default_and_pickles_when_on():
    import pickle

    from zvl_ds.config import CaptionTextConfig
    from zvl_ds.data.transforms import caption_preparer

    assert caption_preparer(CaptionTextConfig()) is None
    prepare = pickle.loads(pickle.dumps(caption_preparer(CaptionTextConfig(clean=True, prompt="p "))))
    assert prepare("A (B)") == "p a b"
