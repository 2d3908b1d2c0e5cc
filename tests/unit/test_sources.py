"""Shard specs, dataset names and sizes."""
import json
import os

import pytest
from tests.helpers.data_fixtures import make_config, write_dataset, write_img2dataset

from zvl_ds.config import DatasetSource
from zvl_ds.data.sources import (DataSourceError, expand_shard_spec, require_sizes, resolve_dataset,
                                 resolve_train_datasets, split_evenly)


@pytest.fixture
def root(tmp_path):
    write_dataset(str(tmp_path), "flat", "train", [3, 2, 4])
    write_dataset(str(tmp_path), "flat", "valid", [2])
    return str(tmp_path)


def shard(root, name, split, index):
    return os.path.join(root, name, f"{split}-{index:06d}.tar")


def test_spec_forms(root, tmp_path, monkeypatch):
    all_train = [shard(root, "flat", "train", i) for i in range(3)]
    assert expand_shard_spec(os.path.join(root, "flat/train-{000000..000002}.tar")) == all_train
    assert expand_shard_spec(os.path.join(root, "flat/train-*.tar")) == all_train
    assert expand_shard_spec(os.path.join(root, "flat")) == all_train + [shard(root, "flat", "valid", 0)]
    joined = expand_shard_spec(os.path.join(root, "flat/valid-*.tar") + "::" + all_train[1])
    assert joined == [shard(root, "flat", "valid", 0), all_train[1]]
    listing = tmp_path / "list.txt"
    listing.write_text("# shards\nflat/train-000002.tar\n\nflat/train-000000.tar\n")
    assert expand_shard_spec(str(listing)) == [all_train[2], all_train[0]]
    # relative entries: under data_path first, then the working folder
    assert expand_shard_spec("flat/train-00000{0,1}.tar", (root, "")) == all_train[:2]
    monkeypatch.chdir(root)
    assert expand_shard_spec("flat/train-000000.tar", ("/nonexistent", "")) == ["flat/train-000000.tar"]
    # URLs are kept as given (read through webdataset's gopen)
    urls = expand_shard_spec("https://example.invalid/s-{0..2}.tar::pipe:cat x.tar")
    assert urls == [f"https://example.invalid/s-{i}.tar" for i in range(3)] + ["pipe:cat x.tar"]


def test_a_list_file_cannot_run_a_shell_command(root, tmp_path):
    marker = tmp_path / "ran"
    listing = tmp_path / "list.lst"
    listing.write_text(f"{shard(root, 'flat', 'train', 0)}\npipe:touch {marker}; cat x.tar\n")
    with pytest.raises(DataSourceError, match=r"list\.lst, line 2: a list file cannot name a `pipe:` shard"):
        expand_shard_spec(str(listing))
    nested = tmp_path / "outer.txt"
    nested.write_text("list.lst\n")  # a list naming a list is checked the same way
    with pytest.raises(DataSourceError, match=r"list\.lst, line 2"):
        expand_shard_spec(str(nested))
    assert not marker.exists()


def test_spec_errors_name_the_spec(root):
    with pytest.raises(DataSourceError, match=r"'/nowhere/train-\{0\.\.3\}\.tar' matches nothing"):
        expand_shard_spec("/nowhere/train-{0..3}.tar")
    with pytest.raises(DataSourceError, match="matches nothing"):
        expand_shard_spec(os.path.join(root, "flat/test-*.tar"))
    os.makedirs(os.path.join(root, "empty"))
    with pytest.raises(DataSourceError, match="holds no .tar shards"):
        expand_shard_spec(os.path.join(root, "empty"))
    with pytest.raises(DataSourceError, match="empty shard spec"):
        expand_shard_spec("  ")
    # a pattern of which some shards exist keeps the missing ones (they count as unreadable when read)
    partly = expand_shard_spec(os.path.join(root, "flat/train-{000002..000004}.tar"))
    assert len(partly) == 3 and os.path.exists(partly[0]) and not os.path.exists(partly[2])


def test_dataset_by_name_and_split(root):
    cfg = make_config(root)
    flat = resolve_dataset(cfg.data, "flat", ["train"])
    assert flat.shards == tuple(shard(root, "flat", "train", i) for i in range(3))
    assert flat.shard_sizes == (3, 2, 4) and flat.size == 9
    both = resolve_dataset(cfg.data, "flat", ["train", "valid"])
    assert both.shard_sizes == (3, 2, 4, 2)
    with pytest.raises(DataSourceError, match=r"dataset 'nope': no folder .*nope.*data.datasets.nope.shards"):
        resolve_dataset(cfg.data, "nope", ["train"])
    with pytest.raises(DataSourceError, match=r"dataset 'flat': no shards match .*test-\*\.tar"):
        resolve_dataset(cfg.data, "flat", ["test"])
    # LAVIS configs say `val`; the message names the splits the folder has and the keys that pick them
    with pytest.raises(DataSourceError, match=r"the folder holds the splits \['train', 'valid'\]: .*"
                                              r"data.valid_splits \(LAVIS: run.train_splits / run.valid_splits\)"):
        resolve_dataset(cfg.data, "flat", ["val"])
    cfg.data.train_name = ["flat", "flat"]
    with pytest.raises(DataSourceError, match="twice"):
        resolve_train_datasets(cfg.data)


def test_explicit_source_and_sizes(root, tmp_path):
    web = str(tmp_path / "web")
    write_img2dataset(web, [3, 5])
    cfg = make_config(root)
    cfg.data.datasets = {"web": DatasetSource(shards="web"),  # relative to data_path
                         "sized": DatasetSource(shards=os.path.join(root, "flat/train-*.tar"), size=10),
                         "exact": DatasetSource(shards=os.path.join(root, "flat/train-*.tar"), size=9),
                         "urls": DatasetSource(shards="https://example.invalid/{0..2}.tar"),
                         "urls_sized": DatasetSource(shards="https://example.invalid/{0..2}.tar", size=8),
                         "bad": DatasetSource(shards="missing-{0..1}.tar")}
    web_ds = resolve_dataset(cfg.data, "web", ["train"])
    assert [os.path.basename(s) for s in web_ds.shards] == ["00000.tar", "00001.tar"]
    assert web_ds.shard_sizes == (3, 5)  # from *_stats.json successes
    assert resolve_dataset(cfg.data, "sized", []).shard_sizes == (4, 3, 3)  # config total, spread evenly
    assert resolve_dataset(cfg.data, "exact", []).shard_sizes == (3, 2, 4)  # config agrees with sizes.json
    urls = resolve_dataset(cfg.data, "urls", [])
    assert urls.shard_sizes is None
    with pytest.raises(DataSourceError, match=r"dataset 'urls'.*training needs its size.*data.datasets.urls.size"):
        require_sizes(urls, "training")
    assert resolve_dataset(cfg.data, "urls_sized", []).shard_sizes == (3, 3, 2)
    with pytest.raises(DataSourceError, match=r"dataset 'bad' \(data.datasets.bad.shards\).*matches nothing"):
        resolve_dataset(cfg.data, "bad", [])


def test_sizes_json_wins_over_stats_and_unknown_shards_are_named(tmp_path):
    folder = tmp_path / "d"
    write_img2dataset(str(folder), [2, 2, 2])
    (folder / "sizes.json").write_text(json.dumps({"00000.tar": 7}))
    cfg = make_config(str(tmp_path))
    cfg.data.datasets = {"d": DatasetSource(shards=str(folder))}
    assert resolve_dataset(cfg.data, "d", []).shard_sizes == (7, 2, 2)
    os.remove(folder / "00002_stats.json")
    partial = resolve_dataset(cfg.data, "d", [])
    assert partial.shard_sizes is None
    with pytest.raises(DataSourceError, match="00002.tar"):
        require_sizes(partial, "training")


def test_split_evenly():
    assert split_evenly(10, 3) == [4, 3, 3] and split_evenly(2, 4) == [1, 1, 0, 0]


def test_a_dataset_folder_is_read_by_split(root, tmp_path):
    data = make_config(str(tmp_path / "elsewhere"), train=("coco",), valid=("coco",)).data
    data.datasets = {"coco": DatasetSource(folder=os.path.join(root, "flat"))}
    train = resolve_dataset(data, "coco", ["train"])
    assert list(train.shards) == [shard(root, "flat", "train", i) for i in range(3)] and train.size == 9
    assert list(resolve_dataset(data, "coco", ["valid"]).shards) == [shard(root, "flat", "valid", 0)]
    data.datasets = {"coco": DatasetSource(folder=os.path.join(root, "missing"))}
    with pytest.raises(DataSourceError, match=r"data\.datasets\.coco\.folder .* is not a folder"):
        resolve_dataset(data, "coco", ["train"])
