"""Reinforced shards (``distill.source: stored``): the teacher's embeddings written beside each shard by
``python -m zvl_ds.reinforce_shards`` (run in-process), read back by the training loader and checked by a run.

The reference for every stored number is the teacher itself: the tiny Hugging Face CLIP teacher (48 px, its own
tokenizer) run here on its evaluation view of the same samples (``load_teacher``, its validation transforms and
normalisation) and on each caption. Faults are planted: a deleted file, a killed write, another teacher, a shard
that grew, a corrupt image.
"""
import json
import os
import shutil

import pytest
import torch

from tests.helpers.data_fixtures import make_config, sample_members, write_dataset, write_tar
from zvl_ds.base.errors import UserError
from zvl_ds.data.teacher_store import (FILE_SUFFIX, ShardEmbeddings, StoredTeacherError, embeddings_path,
                                       read_header)

CAPTIONS = 3
TRAIN_SHARDS, VALID_SHARDS = (5, 4), (6,)
FP16 = dict(rtol=2e-3, atol=2e-3)  # float16 rounding of unit vectors


def student_config(root, teacher, **extra):
    overrides = {"loss.name": "NCE", "distill.teacher": teacher, "distill.source": "stored", **extra}
    return make_config(root, train=["flat"], valid=["val"], batch_size=4, extra=overrides)


def write_config(cfg, path):
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(cfg.to_yaml())
    return str(path)


def reinforce(cfg_path, *flags):
    from zvl_ds.reinforce_shards import main

    return main(["--cfg", cfg_path, "--workers", "0", "--batch-size", "4", "--quiet", *flags])


def stored_files(root):
    """Every stored file under ``root``."""
    return sorted(os.path.join(folder, name) for folder, _, names in os.walk(root) for name in names
                  if name.endswith(FILE_SUFFIX))


def contents(path):
    """A stored file's tensors and header (safetensors writes its header's keys in no fixed order, so the bytes of
    two equal files may differ)."""
    stored = ShardEmbeddings.load(path[:-len(FILE_SUFFIX)] + ".tar")
    return stored.image, stored.text, stored.offsets, stored.header


def same_contents(first, second):
    return all(torch.equal(a, b) for a, b in zip(first[:3], second[:3])) and first[3] == second[3]


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    from tools.tiny_checkpoints import write_tiny_teacher_folder

    root = tmp_path_factory.mktemp("teachers")
    return write_tiny_teacher_folder(str(root / "a"), "hf_clip"), write_tiny_teacher_folder(str(root / "b"),
                                                                                            "hf_clip", seed=5)


@pytest.fixture(scope="module")
def reinforced(tmp_path_factory, teachers):
    """Shards with 3 captions per sample (training: 2 shards; validation: 1), reinforced once with 2 workers."""
    root = tmp_path_factory.mktemp("reinforced")
    write_dataset(str(root), "flat", "train", TRAIN_SHARDS, captions_per_image=CAPTIONS)
    write_dataset(str(root), "val", "valid", VALID_SHARDS, captions_per_image=CAPTIONS, id_offset=100)
    cfg = student_config(str(root), teachers[0])
    from zvl_ds.reinforce_shards import main

    assert main(["--cfg", write_config(cfg, root / "cfg.yaml"), "--workers", "2", "--batch-size", "4"]) == 0
    return root, cfg


@pytest.fixture
def copy(reinforced, tmp_path):
    """A copy of the reinforced shards to damage, with its own config."""
    root, cfg = reinforced
    shutil.copytree(root, tmp_path / "shards")
    cfg = student_config(str(tmp_path / "shards"), cfg.distill.teacher)
    return tmp_path / "shards", cfg, write_config(cfg, tmp_path / "copy.yaml")


def teacher_reference(cfg):
    """The teacher and its evaluation view of a sample (image bytes, captions), computed here."""
    import random

    from zvl_ds.data.transforms import ImageTransform, normalize_images, to_uint8_chw, tokenize
    from zvl_ds.model.teacher import load_teacher

    teacher = load_teacher(cfg, torch.device("cpu"), torch.float32)
    view = teacher.evaluation_config(cfg).transforms
    transform = ImageTransform(view.valid_transforms, view)

    def embed(jpeg: bytes, captions):
        pixels = normalize_images(to_uint8_chw(transform(jpeg, random.Random(0)))[None], teacher.normalize, "cpu")
        ids, mask = tokenize(teacher.tokenizer, captions, teacher.max_length)
        with torch.no_grad():
            out = teacher.module(images=pixels, input_ids=ids, attention_mask=mask)
        return out["image_embeds"][0], out["text_embeds"]

    return teacher, embed


def shard_samples(path):
    """(key, jpeg bytes, captions) of every sample of a tar, read with tarfile."""
    import tarfile

    samples = {}
    with tarfile.open(path) as archive:
        for member in archive.getmembers():
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {})[ext] = archive.extractfile(member).read()
    return [(key, fields["jpg"], json.loads(fields["json"])["captions"]) for key, fields in samples.items()]


def test_each_sample_gets_the_teachers_evaluation_view_embeddings_of_its_image_and_every_caption(reinforced):
    root, cfg = reinforced
    teacher, embed = teacher_reference(cfg)
    for shard in sorted(root.glob("*/*.tar")):
        stored = ShardEmbeddings.load(str(shard))
        samples = shard_samples(shard)
        assert stored.image.dtype == torch.float16 and stored.text.dtype == torch.float16
        assert list(stored.header.keys) == [key for key, _, _ in samples]
        assert stored.header.identity == teacher.identity  # name, kind, weights file and its SHA-256
        assert stored.header.scale == pytest.approx(teacher.scale) and stored.header.bias is None
        assert stored.header.shard_bytes == os.path.getsize(shard) and stored.header.missing == {}
        for position, (_, jpeg, captions) in enumerate(samples):
            image, texts = embed(jpeg, captions)
            assert stored.captions(position).shape == (CAPTIONS, 16)
            torch.testing.assert_close(stored.image[position].float(), image, **FP16)
            torch.testing.assert_close(stored.captions(position).float(), texts, **FP16)
        assert oct(os.stat(embeddings_path(str(shard))).st_mode & 0o777) == "0o644"


def test_the_loader_hands_over_the_embedding_of_the_caption_it_picked(reinforced):
    """Each batch row's text embedding is the teacher's embedding of the caption the student got (decoded back
    from the student's tokens); with 3 captions per sample the loader picks others than the first."""
    from zvl_ds.data import build_train_loader, load_tokenizer

    root, cfg = reinforced
    _, embed = teacher_reference(cfg)
    samples = {key: (jpeg, captions) for shard in root.glob("flat/*.tar") for key, jpeg, captions in
               shard_samples(shard)}
    tokenizer = load_tokenizer(cfg.model.text_encoder)
    loader = build_train_loader(cfg, 0, 1, tokenizer)
    picked = []
    try:
        for _, batch in zip(range(4), loader):
            assert batch.teacher_image_embeds.dtype == torch.float16
            assert batch.teacher_image_embeds.shape == batch.teacher_text_embeds.shape == (4, 16)
            for row, key in enumerate(batch.keys):
                caption = tokenizer.decode(batch.input_ids[row], skip_special_tokens=True)
                jpeg, captions = samples[key]
                index = [text.lower() for text in captions].index(caption)
                image, texts = embed(jpeg, captions)
                torch.testing.assert_close(batch.teacher_image_embeds[row].float(), image, **FP16)
                torch.testing.assert_close(batch.teacher_text_embeds[row].float(), texts[index], **FP16)
                picked.append(index)
    finally:
        loader.close()
    assert len(set(picked)) > 1  # the index matters: not always caption 0


def test_a_run_checks_every_shard_and_reads_its_scale(reinforced):
    from zvl_ds.data.sources import resolve_train_datasets
    from zvl_ds.model.teacher import stored_teacher, teacher_identity

    root, cfg = reinforced
    stored = stored_teacher(cfg, resolve_train_datasets(cfg.data))
    assert stored.identity == teacher_identity(cfg) and stored.shards == len(TRAIN_SHARDS)
    assert stored.width == 16 and stored.scale == pytest.approx(20.0) and stored.bias is None  # the tiny CLIP's own
    cfg.distill.scale = 50.0
    assert stored_teacher(cfg, resolve_train_datasets(cfg.data)).scale == 50.0  # the config's, when set
    cfg.distill.scale = None


def check(cfg):
    from zvl_ds.data.sources import resolve_train_datasets
    from zvl_ds.model.teacher import stored_teacher

    return stored_teacher(cfg, resolve_train_datasets(cfg.data))


def test_another_teacher_is_refused_naming_both(copy, teachers):
    root, cfg, _ = copy
    cfg.distill.teacher = teachers[1]
    with pytest.raises(StoredTeacherError, match="another teacher") as error:
        check(cfg)
    assert "train-000000.tar" in str(error.value) and "train-000001.tar" in str(error.value)
    assert teachers[0] in str(error.value) and teachers[1] in str(error.value)
    assert "reinforce_shards" in str(error.value)


def test_missing_embeddings_are_refused_naming_the_shard(copy):
    root, cfg, _ = copy
    os.remove(embeddings_path(str(root / "flat" / "train-000001.tar")))
    with pytest.raises(StoredTeacherError, match=r"1 shard\(s\) without usable") as error:
        check(cfg)
    assert "train-000001.tar: missing" in str(error.value) and "train-000000.tar" not in str(error.value)


def test_a_shard_that_changed_after_reinforcing_is_refused(copy):
    root, cfg, _ = copy
    write_dataset(str(root), "flat", "train", (5, 6), captions_per_image=CAPTIONS)  # shard 1 gained a sample
    with pytest.raises(StoredTeacherError, match="another version of the shard") as error:
        check(cfg)
    assert "train-000001.tar" in str(error.value) and "train-000000.tar" not in str(error.value)


def test_a_damaged_file_is_refused(copy):
    root, cfg, _ = copy
    path = embeddings_path(str(root / "flat" / "train-000000.tar"))
    with open(path, "r+b") as handle:
        handle.truncate(40)
    with pytest.raises(StoredTeacherError, match="not a readable teacher embeddings file"):
        check(cfg)


def test_existing_embeddings_are_kept_only_on_request(copy):
    root, _, cfg_path = copy
    with pytest.raises(UserError, match="--resume"):
        reinforce(cfg_path)


def test_resume_writes_only_what_is_missing_and_a_killed_write_leaves_no_file(copy, monkeypatch):
    import zvl_ds.data.teacher_store as store

    root, cfg, cfg_path = copy
    before = {path: contents(path) for path in stored_files(root)}
    lost = embeddings_path(str(root / "flat" / "train-000001.tar"))
    os.remove(lost)
    os.remove(embeddings_path(str(root / "val" / "valid-000000.tar")))

    def killed(tensors, path, metadata):  # the process dies mid-write: part of the file, then the error
        with open(path, "wb") as handle:
            handle.write(b"\0" * 100)
        raise KeyboardInterrupt

    monkeypatch.setattr(store, "save_file", killed)
    with pytest.raises(KeyboardInterrupt):
        reinforce(cfg_path, "--resume")
    assert not os.path.exists(lost) and not os.path.exists(lost + ".tmp")  # neither a half file nor a temp
    monkeypatch.undo()
    with open(lost + ".tmp", "wb") as handle:  # what a process killed by a signal would leave
        handle.write(b"\0" * 100)
    modified = {path: os.stat(path).st_mtime_ns for path in stored_files(root)}
    assert reinforce(cfg_path, "--resume") == 0
    assert stored_files(root) == sorted(before)  # rewritten where missing, with the same contents
    assert all(same_contents(contents(path), expected) for path, expected in before.items())
    assert all(os.stat(path).st_mtime_ns == mtime for path, mtime in modified.items())  # kept ones untouched
    assert not os.path.exists(lost + ".tmp")
    check(cfg)  # complete again


def test_resume_redoes_another_teachers_files(copy, teachers):
    root, cfg, _ = copy
    cfg.distill.teacher = teachers[1]
    cfg_path = write_config(cfg, root / "other.yaml")
    assert reinforce(cfg_path, "--resume") == 0
    assert read_header(embeddings_path(str(root / "flat" / "train-000000.tar"))).identity["teacher"] == teachers[1]
    check(cfg)


def test_processes_split_the_shards(copy, monkeypatch):
    root, _, cfg_path = copy
    for path in stored_files(root):
        os.remove(path)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert reinforce(cfg_path) == 0  # the second of 2 processes: the second of flat 0, flat 1, val 0
    assert sorted(os.path.basename(os.path.dirname(p)) + "/" + os.path.basename(p) for p in stored_files(root)) == [
        "flat/train-000001" + FILE_SUFFIX]


def test_an_unreadable_sample_has_no_embeddings_and_the_loader_skips_samples_without_them(tmp_path, teachers):
    """A corrupt image: the teacher cannot read it, nothing is stored for it and its reason is recorded, the rest of
    the shard is stored. The loader skips (and counts) a sample without stored embeddings, as it skips a corrupt one."""
    import zvl_ds.data.teacher_store as store
    from zvl_ds.data import build_train_loader, load_tokenizer

    good = sample_members("s0", 0, ["a red circle", "a circle"], [0, 1], "bad", "train", seed=1)
    broken = [(name, b"not a jpeg" if name.endswith(".jpg") else data)
              for name, data in sample_members("s1", 1, ["a blue square"], [2], "bad", "train", seed=2)]
    later = sample_members("s2", 2, ["two squares"], [3], "bad", "train", seed=3)
    os.makedirs(tmp_path / "bad")
    shard = str(tmp_path / "bad" / "train-000000.tar")
    write_tar(shard, good + broken + later)
    with open(tmp_path / "bad" / "sizes.json", "w") as handle:
        json.dump({"train-000000.tar": 3}, handle)
    cfg = make_config(str(tmp_path), train=["bad"], valid=[], batch_size=1,
                      extra={"loss.name": "NCE", "distill.teacher": teachers[0], "distill.source": "stored",
                             "data.enable_valid": False})
    assert reinforce(write_config(cfg, tmp_path / "cfg.yaml")) == 0
    stored = ShardEmbeddings.load(shard)
    assert list(stored.header.keys) == ["s0", "s1", "s2"] and list(stored.header.missing) == ["s1"]
    assert "corrupt_image" in stored.header.missing["s1"]
    assert [stored.captions(i).shape[0] for i in range(3)] == [2, 0, 1]
    check(cfg)  # the shard is complete: every sample the teacher could read has its embeddings
    # plant a readable sample without embeddings (s2), as if the teacher had failed on it
    header = stored.header
    store.write_embeddings(shard, stored.image, stored.text[:2], [2, 0, 0], header.keys,
                           {**header.missing, "s2": "planted"}, header.identity, header.scale, header.bias)
    loader = build_train_loader(cfg, 0, 1, load_tokenizer(cfg.model.text_encoder))
    try:
        keys = [key for _, batch in zip(range(6), loader) for key in batch.keys]  # two epochs
        counts = loader.error_counts()
    finally:
        loader.close()
    assert set(keys) == {"s0"}
    assert counts["corrupt_image"] >= 1 and counts[store.MISSING_TEACHER_EMBEDDING] >= 1


def test_the_teacher_reference_from_stored_validation_embeddings_is_the_teachers_own_evaluation(copy):
    """The step-0 reference line of a stored run: the recalls of the stored validation embeddings equal those of
    evaluating the teacher itself (its evaluation view, every caption); none when the set is not reinforced."""
    from zvl_ds.evaluation.retrieval import evaluate_retrieval, stored_teacher_metrics
    from zvl_ds.model.teacher import load_teacher

    root, cfg, _ = copy
    teacher = load_teacher(cfg, torch.device("cpu"), torch.float32)
    expected = evaluate_retrieval(teacher.evaluation_config(cfg), teacher.model, teacher.tokenizer, torch.device("cpu"),
                                  torch.float32, names=["val"], progress=False)["val"]
    stored, why = stored_teacher_metrics(cfg, "val", teacher.identity)
    assert why is None and (stored["num_images"], stored["num_texts"]) == (6, 6 * CAPTIONS)
    for key in ("i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5", "rsum", "i2t_mean_rank", "t2i_mean_rank"):
        assert stored[key] == pytest.approx(expected[key]), key
    os.remove(embeddings_path(str(root / "val" / "valid-000000.tar")))
    stored, why = stored_teacher_metrics(cfg, "val", teacher.identity)
    assert stored is None and why.endswith("valid-000000.tar: missing")


def test_a_parquet_dataset_is_refused_by_the_run_and_by_reinforce_shards(tmp_path, teachers):
    """Stored embeddings sit beside tar shards; a Parquet dataset read in place has none: exit 2 naming it."""
    pytest.importorskip("pyarrow")  # the optional extra `parquet`; CI installs it
    from tests.helpers.parquet_fixtures import write_hf_snapshot

    write_hf_snapshot(str(tmp_path), "hf", "train", [[4, 4]])
    write_dataset(str(tmp_path), "val", "valid", VALID_SHARDS)
    cfg = student_config(str(tmp_path), teachers[0], **{
        "data.train_name": ["hf"], "data.datasets.hf.parquet": str(tmp_path / "hf" / "data" / "train-*.parquet")})
    with pytest.raises(StoredTeacherError, match="dataset hf is Parquet, read in place") as error:
        check(cfg)
    assert isinstance(error.value, UserError) and "make_shards --parquet" in str(error.value)
    with pytest.raises(StoredTeacherError, match="dataset hf is Parquet"):
        reinforce(write_config(cfg, tmp_path / "cfg.yaml"))
    assert not stored_files(tmp_path)
