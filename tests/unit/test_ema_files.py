"""The model EMA's checkpoint files: ZeRO-3 partitions merge into whole tensors and split again for any world size."""
import pytest
import torch

from zvl_ds.config import EmaConfig
from zvl_ds.runtime.ema import EmaFileError, _partition_of, ema_decay, ema_file, merge_ema_files


def write_partitions(folder, whole, world_size):
    size = -(-whole.numel() // world_size)  # DeepSpeed's partition: ceil(numel / ranks), zero-padded at the end
    for rank in range(world_size):
        torch.save({"updates": 7, "partitioned": True, "world_size": world_size,
                    "tensors": {"w": _partition_of(whole, rank, size)}, "shapes": {"w": list(whole.shape)}},
                   folder / ema_file(rank))


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_partitions_of_any_world_size_merge_into_the_whole_tensor(tmp_path, world_size):
    whole = torch.arange(15, dtype=torch.float32).reshape(3, 5)
    write_partitions(tmp_path, whole, world_size)
    updates, merged = merge_ema_files(str(tmp_path))
    assert updates == 7 and torch.equal(merged["w"], whole)
    # split for another world size: the pieces, in rank order, are the flattened tensor with zero padding
    pieces = torch.cat([_partition_of(whole, rank, 4) for rank in range(4)])
    assert torch.equal(pieces[:15], whole.reshape(-1)) and torch.equal(pieces[15:], torch.zeros(1))


def test_a_missing_partition_is_named(tmp_path):
    write_partitions(tmp_path, torch.ones(6), 3)
    (tmp_path / ema_file(1)).unlink()
    with pytest.raises(EmaFileError, match=r"ranks \[1\] are missing"):
        merge_ema_files(str(tmp_path))


def test_no_files_means_no_ema(tmp_path):
    assert merge_ema_files(str(tmp_path)) is None


def test_warmup_ramps_the_decay_linearly():
    assert [ema_decay(EmaConfig(decay=0.9, warmup_steps=4), t) for t in (1, 2, 4, 10)] == pytest.approx(
        [0.225, 0.45, 0.9, 0.9])
    assert ema_decay(EmaConfig(decay=0.9), 1) == 0.9
